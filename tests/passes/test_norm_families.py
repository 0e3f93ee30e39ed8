"""Norms found by what they compute, across transformers families (random-init tiny configs):
RMSNorm scaling by ``w`` or ``1 + w`` (Gemma), computing in fp32 and casting back (``type_as``),
QK-norms, sandwich norms. Per family and fold: what was folded, refused (with a reason) or put
online is recorded, folds are exact in float, and a residual rotation that cannot apply is a
refusal record, never a silent fallback."""
import collections
import importlib

import pytest
import torch

from finegrain.compiler.capture import capture
from finegrain.compiler.context import PassContext
from finegrain.compiler.recipe import Recipe, get_recipe
from finegrain.driver.pipeline import ANALYZE, run_passes

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
FAMILIES = {  # family: (config class, model class, extra config, smoothing sites folded per layer at least)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, 2),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}, 2),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16}, 2),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16}, 2),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}, 1),
}


def _model(family):
    cfg_name, model_name, extra, _ = FAMILIES[family]
    tf = importlib.import_module("transformers")
    torch.manual_seed(0)
    cfg = getattr(tf, cfg_name)(**COMMON, **extra)
    return getattr(tf, model_name)(cfg).eval()


def _analyze(model, recipe):
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (1, 16), generator=gen)
    calib = [(torch.randint(0, 256, (1, 24), generator=gen),) for _ in range(2)]
    gm = capture(model, (x,))
    ctx = PassContext(recipe=recipe, calibration=calib, show_progress=False)
    return run_passes(gm, ctx, ANALYZE), ctx, x


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_norm_folds_are_found_and_exact(family):
    model = _model(family)
    ref = model(torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1)), use_cache=False).logits
    gm, ctx, x = _analyze(model, Recipe(fold_norms=True))
    assert not any(n.target is torch.ops.aten.type_as.default for n in gm.graph.nodes)  # canonicalized
    folds = ctx.report["folds"]
    folded = [f for f in folds if f["action"] == "folded"]
    assert len(folded) >= 2 * 2, folds  # at least the two pre-norms of each layer
    assert all(f["detail"] for f in folds)
    if family.startswith("gemma"):
        assert all("(1 + w)" in f["detail"] for f in folded)
    torch.testing.assert_close(gm(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_smoothing_folds_at_the_norms(family):
    model = _model(family)
    gm, ctx, x = _analyze(model, get_recipe("w8a8-smooth"))
    with torch.no_grad():
        ref = model(x, use_cache=False).logits
    counts = collections.Counter(f["action"] for f in ctx.report["folds"] if f["pass"] == "fold_smoothing")
    assert counts["folded"] + counts["kept"] >= FAMILIES[family][3] * 2, ctx.report["folds"]
    refused = [f for f in ctx.report["folds"] if f["action"] == "refused"]
    assert all("o_proj" in f["site"] or "down_proj" in f["site"] for f in refused), refused
    torch.testing.assert_close(gm(x), ref, rtol=1e-4, atol=1e-4)  # ANALYZE only: the folds, in float


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_residual_rotation_is_folded_or_refused_with_a_reason(family):
    model = _model(family)
    gm, ctx, x = _analyze(model, get_recipe("w4a4-rot"))
    rot = [f for f in ctx.report["folds"] if f["pass"] == "fold_rotation" and f["action"] != "online"]
    assert rot and all(f["action"] in ("folded", "refused") and f["detail"] for f in rot), rot
    if family in ("llama", "qwen3", "phi3"):
        assert any(f["action"] == "folded" for f in rot), rot
    with torch.no_grad():
        ref = model(x, use_cache=False).logits
    torch.testing.assert_close(gm(x), ref, rtol=1e-3, atol=1e-3)  # folds + online Hadamards, in float
