"""Folding passes (fold_norms, fold_rotation, fold_smoothing): exactness on four architectures,
idempotence, structure (which nodes were added), refusals with reasons."""
import dataclasses
from collections import Counter

import pytest
import torch

from finegrain.compiler.capture import capture
from finegrain.compiler.ir import get_tensor
from finegrain.driver.pipeline import PassContext, run_passes
from finegrain.compiler.recipe import PRESETS, Recipe
from finegrain.compiler.regions import find_norms, find_streams
from finegrain.formats.hadamard import random_orthogonal_hadamard
from finegrain.compiler.ops import HADAMARD
from finegrain.passes.calibrate import calibrate
from finegrain.passes.canonicalize import canonicalize
from finegrain.passes.fold_norms import fold_norms
from finegrain.passes.fold_rotation import fold_rotation
from finegrain.passes.fold_smoothing import fold_smoothing

W8A8 = PRESETS["w8a8"]
W4A4 = PRESETS["w4a4-g128"]


def _perturb_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial norm affines (a fresh model has weight 1, bias 0, which would fold trivially)
    and a few outlier channels in the residual stream, as real LLMs have."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and p.dim() == 1:
                if name.endswith("weight"):
                    p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if emb is not None:
            emb.weight[:, :3] *= 20.0
    return model


@pytest.fixture(scope="module")
def llama():
    from finegrain.models.tiny import tiny_llama

    return _perturb_norms(tiny_llama(seed=3, layers=2, hidden=96))


@pytest.fixture(scope="module")
def opt():
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                    max_position_embeddings=128, word_embed_proj_dim=64)
    torch.manual_seed(0)
    return _perturb_norms(OPTForCausalLM(cfg).eval())


class VitBlock(torch.nn.Module):
    """A pre-norm ViT encoder block (LayerNorm with bias, fused qkv, GELU MLP)."""

    def __init__(self, d: int = 64, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return _perturb_norms(VitBlock().eval())


def _token_inputs(vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    example = (torch.randint(0, vocab, (1, 16), generator=gen),)
    calib = [(torch.randint(0, vocab, (1, 48), generator=gen),) for _ in range(3)]
    test = [(torch.randint(0, vocab, (1, 40), generator=gen),), (torch.randint(0, vocab, (1, 7), generator=gen),)]
    return example, calib, test


def _vit_inputs():
    gen = torch.Generator().manual_seed(0)
    x = lambda t: (torch.randn(2, t, 64, generator=gen) * torch.linspace(0.2, 8, 64),)  # noqa: E731
    return x(10), [x(10) for _ in range(3)], [x(10)]  # static shapes: captured with dynamic=False


def _models(request, name):
    if name == "llama":
        m = request.getfixturevalue("llama")
        return m, *_token_inputs(m.config.vocab_size)
    if name == "opt":
        m = request.getfixturevalue("opt")
        return m, *_token_inputs(m.config.vocab_size)
    if name == "vit":
        return request.getfixturevalue("vit"), *_vit_inputs()
    m = request.getfixturevalue("minilm").model
    ex, calib, test = _token_inputs(1000)
    return m, ex, calib, test


def _fold(model, example, calib, recipe, passes, dynamic=True):
    gm = capture(model, example, dynamic=dynamic)
    ctx = PassContext(recipe=recipe, calibration=calib, show_progress=False)
    gm = canonicalize(gm, ctx)
    before = Counter(n.target for n in gm.graph.nodes if n.op == "call_function")
    pipeline = [(p.__name__, p) for p in passes]
    ref_gm = capture(model, example, dynamic=dynamic)
    return ref_gm, run_passes(gm, ctx, pipeline), ctx, before


def _assert_same(ref_gm, gm, test, rtol=2e-5):
    with torch.no_grad():
        for inputs in test:
            a, b = ref_gm(*inputs), gm(*inputs)
            a, b = (a[0] if isinstance(a, tuple) else a), (b[0] if isinstance(b, tuple) else b)
            err = float((a - b).abs().max() / a.abs().max())
            assert err < rtol, f"folded graph differs: max rel err {err:.2e}"


@pytest.mark.parametrize("arch", ["llama", "opt", "vit", "minilm"])
def test_fold_norms_exact_and_idempotent(request, arch):
    model, example, calib, test = _models(request, arch)
    recipe = Recipe(fold_norms=True)
    ref, gm, ctx, _ = _fold(model, example, calib, recipe, [fold_norms], dynamic=arch != "vit")
    _assert_same(ref, gm, test)
    folds = ctx.report["folds"]
    norms = find_norms(ref)
    if arch == "minilm":  # post-norm BERT: every LayerNorm output also feeds a residual add
        assert folds and all(f["action"] == "refused" for f in folds)
        assert all("add.Tensor" in f["detail"] or "graph output" in f["detail"] for f in folds)
        assert len(folds) == len(norms)
    else:
        assert [f["action"] for f in folds] == ["folded"] * len(norms)
        assert all(n.weight is None and n.bias is None for n in find_norms(gm))
    code = gm.code
    fold_norms(gm, PassContext(recipe=recipe, show_progress=False))
    assert gm.code == code  # second run: nothing left to fold


def test_fold_norms_unties_the_lm_head(llama):
    example, _, _ = _token_inputs(256)
    ref, gm, _, _ = _fold(llama, example, [], Recipe(fold_norms=True), [fold_norms])
    targets = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= targets
    assert torch.equal(get_tensor(gm, "model.embed_tokens.weight"), get_tensor(ref, "model.embed_tokens.weight"))


def test_random_hadamard_is_orthogonal():
    for n in (64, 96, 576, 1536):
        q, exact = random_orthogonal_hadamard(n, seed=1)
        assert exact
        assert float((q @ q.T - torch.eye(n, dtype=q.dtype)).abs().max()) < 1e-6


@pytest.mark.parametrize("act", [False, True])
def test_fold_rotation_llama_exact_structure_idempotent(llama, act):
    example, calib, test = _token_inputs(256)
    recipe = dataclasses.replace(W4A4 if act else PRESETS["w4a16-g128"], rotate=True)
    ref, gm, ctx, before = _fold(llama, example, calib, recipe, [fold_norms, fold_rotation])
    _assert_same(ref, gm, test, rtol=2e-5)
    after = Counter(n.target for n in gm.graph.nodes if n.op == "call_function")
    layers = llama.config.num_hidden_layers
    added = after - before
    removed = before - after
    assert set(added) <= {HADAMARD, torch.ops.aten.matmul.default}
    assert added[HADAMARD] == (2 * layers if act else 0)  # o_proj and down_proj inputs, only when quantized
    assert removed == Counter({torch.ops.aten.mul.Tensor: 2 * layers + 1})  # the norm affines
    # the tied LM head stays tied: the final norm weight became one d x d matmul
    assert added[torch.ops.aten.matmul.default] == 1
    emb = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.embedding.default)
    head = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default][-1]
    assert head.args[1] is emb.args[0]
    assert not any(n.op == "get_attr" and n.target == "lm_head.weight" for n in gm.graph.nodes)
    rot = [f for f in ctx.report["folds"] if f["pass"] == "fold_rotation"]
    assert rot[0]["action"] == "folded" and "4 writer linear(s)" in rot[0]["detail"]
    code = gm.code
    fold_rotation(fold_norms(gm, ctx), ctx)
    assert gm.code == code
    _assert_same(ref, gm, test, rtol=2e-5)


def test_rotation_spreads_outliers(llama):
    """The point of the rotation: the residual stream's outlier channels are spread out."""
    example, calib, _ = _token_inputs(256)
    stats = {}
    for rot in (False, True):  # static activation scales: a recipe whose passes read the calibration statistics
        recipe = dataclasses.replace(PRESETS["w8a8-static"], rotate=rot, fold_norms=True)
        _, gm, ctx, _ = _fold(llama, example, calib, recipe, [fold_norms, fold_rotation, calibrate])
        q_in = next(k for k in ctx.stats.nodes)  # the first observed input: q/k/v of layer 0
        s = ctx.stats[q_in]
        stats[rot] = float(s.absmax.max() / s.mean_sq.mean().sqrt())
    assert stats[True] < stats[False] / 3


def test_fold_rotation_opt_layernorm_stream(opt):
    """Pre-norm LayerNorm model: the stream is made mean-free, its LayerNorms become RMSNorms,
    then it rotates; the function is unchanged."""
    example, calib, test = _token_inputs(opt.config.vocab_size)
    recipe = dataclasses.replace(W4A4, rotate=True)
    ref, gm, ctx, before = _fold(opt, example, calib, recipe, [fold_norms, fold_rotation])
    _assert_same(ref, gm, test, rtol=5e-5)
    rot = [f for f in ctx.report["folds"] if f["pass"] == "fold_rotation"]
    assert rot[0]["action"] == "folded" and "5 LayerNorms made RMSNorms" in rot[0]["detail"]
    after = Counter(n.target for n in gm.graph.nodes if n.op == "call_function")
    assert after[torch.ops.aten.layer_norm.default] == 0 and after[torch.ops.aten.rsqrt.default] == 5
    assert all(n.kind == "rms" and n.weight is None for n in find_norms(gm))
    code = gm.code
    fold_rotation(fold_norms(gm, ctx), ctx)
    assert gm.code == code


def test_fold_rotation_refuses_post_norm_bert(minilm):
    example, calib, test = _token_inputs(1000)
    recipe = dataclasses.replace(W4A4, rotate=True)
    ref, gm, ctx, _ = _fold(minilm.model, example, calib, recipe, [fold_norms, fold_rotation])
    _assert_same(ref, gm, test)
    rot = [f for f in ctx.report["folds"] if f["pass"] == "fold_rotation" and f["action"] != "online"]
    assert rot and all(f["action"] == "refused" for f in rot)
    # the embedding sum ends in a LayerNorm whose affine fold_norms refused (its output is residual)
    assert "still has an affine weight" in rot[0]["detail"]


@pytest.mark.parametrize("method", ["smoothquant", "os+"])
@pytest.mark.parametrize("arch", ["llama", "opt", "vit"])
def test_fold_smoothing_exact(request, arch, method):
    model, example, calib, test = _models(request, arch)
    recipe = dataclasses.replace(W8A8, smoothing=method)
    ref, gm, ctx, _ = _fold(model, example, calib, recipe, [calibrate, fold_smoothing], dynamic=arch != "vit")
    _assert_same(ref, gm, test, rtol=5e-5)
    sm = [f for f in ctx.report["folds"] if f["pass"] == "fold_smoothing"]
    folded = [f for f in sm if f["action"] == "folded"]
    assert folded, sm
    assert all(f["error_after"] <= f["error_before"] for f in folded)
    refused = [f for f in sm if f["action"] == "refused"]
    assert any("scaled_dot_product_attention" in f["detail"] or "transpose" in f["detail"] or
               "permute" in f["detail"] or "view" in f["detail"] or "reshape" in f["detail"] for f in refused)
    assert not ctx.stats.nodes  # statistics of the old activations are gone
    code = gm.code
    calibrate(gm, ctx)
    fold_smoothing(gm, ctx)
    assert gm.code == code  # smoothed sites are not smoothed twice


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_fold_awq_exact_and_lowers_weight_error(request, arch):
    """AWQ on a weight-only recipe: the fold is exact in float, every norm- and up_proj-fed site is
    folded or kept (never worse on the calibration rows), down_proj's site folds into up_proj on
    Llama's SwiGLU, and o_proj's (out of attention) is refused by name."""
    model, example, calib, test = _models(request, arch)
    recipe = PRESETS["w4a16-g128-awq"]
    ref, gm, ctx, _ = _fold(model, example, calib, recipe, [calibrate, fold_smoothing])
    _assert_same(ref, gm, test, rtol=5e-5)
    sm = [f for f in ctx.report["folds"] if f["pass"] == "fold_smoothing"]
    folded = [f for f in sm if f["action"] == "folded"]
    assert folded and all(f["error_after"] <= f["error_before"] for f in folded), sm
    assert all("awq (alpha=" in f["detail"] for f in folded)
    assert any("o_proj" in f["site"] or "out_proj" in f["site"] for f in sm if f["action"] == "refused")
    if arch == "llama":
        assert any("into product" in f["detail"] and "down_proj" in f["site"] for f in sm if f["action"] == "folded") \
            or any("down_proj" in f["site"] and f["action"] == "kept" for f in sm)
    # on perturbed norms (outlier channels) AWQ finds real gains at the norm sites
    gains = [f["error_before"] / f["error_after"] for f in folded if "into norm" in f["detail"]]
    assert gains and max(gains) > 1.05, gains


def test_smoothing_lowers_quantized_error_on_outliers(llama):
    """On a stream with 20x outlier channels, SmoothQuant lowers W8A8's output error of the
    norm-fed sites (measured on held-out rows by the pass itself)."""
    example, calib, _ = _token_inputs(256)
    recipe = dataclasses.replace(W8A8, smoothing="smoothquant")
    _, _, ctx, _ = _fold(llama, example, calib, recipe, [calibrate, fold_smoothing])
    norm_sites = [f for f in ctx.report["folds"] if f["action"] == "folded" and "into norm" in f["detail"]]
    assert len(norm_sites) >= 2
    assert all(f["error_after"] < 0.7 * f["error_before"] for f in norm_sites)


def test_smoothing_after_rotation_and_recalibration(llama):
    """w4a4-rot-smooth with static activation scales: smoothing invalidates the statistics and the
    pipeline re-collects them before Q/DQ insertion uses them."""
    from finegrain.driver.pipeline import PIPELINE
    from finegrain.formats import QuantFormat
    from finegrain.compiler.recipe import Rule

    example, calib, test = _token_inputs(256)
    static = QuantFormat(bits=8, granularity="tensor", symmetric=True, scale="fp32")
    recipe = Recipe(name="t", rules=(Rule(role="linear", weight=PRESETS["w4a16-g128"].rules[0].weight,
                                          activation=static),), rotate=True, smoothing="smoothquant")
    gm = canonicalize(capture(llama, example), None)
    ctx = PassContext(recipe=recipe, calibration=calib, show_progress=False)
    gm = run_passes(gm, ctx, PIPELINE)
    assert ctx.report["stats_invalidated_by"] == "fold_smoothing"
    assert ctx.stats.nodes  # refilled by recalibrate
    observed = {n.name for n in gm.graph.nodes if n.meta.get("finegrain_observed")}
    assert set(ctx.stats.nodes) <= observed | set(ctx.stats.nodes)
    with torch.no_grad():
        ref = llama(test[0][0]).logits
        out = gm(test[0][0])
    assert float((out - ref).pow(2).mean() / ref.pow(2).mean()) < 0.05


def test_streams_found_from_graph(llama, opt):
    for model, layers in ((llama, 2), (opt, 2)):
        gm = canonicalize(capture(model, _token_inputs(256)[0]), None)
        (st,) = find_streams(gm)
        assert st.refusal is None
        assert len(st.writers) == 2 * layers and len(st.norms) == 2 * layers + 1


def test_online_rotation_mode_leaves_norms_and_stream_alone(llama):
    """rotation_mode='online': a Hadamard before every activation-quantized linear (q/k/v and
    gate/up share one per input), nothing folded into the residual stream or the norms."""
    example, calib, test = _token_inputs(256)
    recipe = PRESETS["w4a4-hadamard"]
    ref, gm, ctx, before = _fold(llama, example, calib, recipe, [fold_norms, fold_rotation])
    _assert_same(ref, gm, test, rtol=2e-5)
    added = Counter(n.target for n in gm.graph.nodes if n.op == "call_function") - before
    assert added == Counter({HADAMARD: 4 * llama.config.num_hidden_layers})
    assert all(n.weight is not None for n in find_norms(gm))
    assert not [f for f in ctx.report["folds"] if f["action"] == "folded"]
    code = gm.code
    fold_rotation(gm, ctx)
    assert gm.code == code
