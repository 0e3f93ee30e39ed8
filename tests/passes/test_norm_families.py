"""Norms found by what they compute, across transformers families (random-init tiny configs):
RMSNorm scaling by ``w`` or ``1 + w`` (Gemma), computing in fp32 and casting back (``type_as``),
QK-norms, sandwich norms, LayerNorms written out as their arithmetic (Cohere), mixture-of-experts
layers (Mixtral, Qwen2-MoE, DeepSeek-V3 with MLA). Per family and fold:
what was folded, refused (with a reason) or put online is recorded, folds are exact in float, and a
residual rotation that cannot apply is a refusal record, never a silent fallback."""
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
# family: (config class, model class, config (COMMON unless given), norms folded at least, smoothing sites
# folded or kept at least, residual rotation folded (else refused with a reason))
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, 4, 4, True),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"head_dim": 16}, 4, 4, True),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, 4, 4, True),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}, 4, 4, True),  # QK-norm
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16}, 4, 4, False),  # 1 + w, sandwich norms
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16}, 4, 4, False),  # + QK-norm
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}, 4, 2, True),  # fused qkv / gate_up
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {"pad_token_id": 0}, 1, 2, False),  # post-norms
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}, 4, 4, True),  # 1 + w, tied head, scaled embedding
    "nemotron": ("NemotronConfig", "NemotronForCausalLM", {}, 4, 4, True),  # LayerNorm1P: layer_norm(x, 1 + w, b)
    "helium": ("HeliumConfig", "HeliumForCausalLM", {"head_dim": 16}, 4, 4, True),  # gain w.to(float32)
    # a LayerNorm written out (mean, centered variance, rsqrt), parallel attention + MLP on one norm, tied head
    "cohere": ("CohereConfig", "CohereForCausalLM", {}, 3, 4, True),
    "cohere_qk": ("CohereConfig", "CohereForCausalLM", {"use_qk_norm": True}, 3, 4, True),  # + per-head QK LayerNorms
    # mixture of experts: the post-attention norm reaches the router and, through the token dispatch (a row
    # gather), the experts' grouped linears; the stream is written through per-row routing weights and a sum
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}, 5, 2, True),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2,  # + a shared
                                                            "moe_intermediate_size": 32,  # expert, sigmoid-gated
                                                            "shared_expert_intermediate_size": 32}, 5, 2, True),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", {  # MLA (q_a / kv_a norms), shared experts
        "num_key_value_heads": 4, "head_dim": 8, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 4, "num_experts_per_tok": 2,
        "moe_intermediate_size": 32, "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1,
        "topk_group": 1}, 9, 2, True),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"num_key_value_heads": None}, 4, 4, True),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"only": dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4,
                                                            n_positions=128)}, 4, 4, True),  # Conv1D = addmm
    "opt": ("OPTConfig", "OPTForCausalLM", {"only": dict(vocab_size=256, hidden_size=64, ffn_dim=128,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         word_embed_proj_dim=64, max_position_embeddings=128,
                                                         pad_token_id=1)}, 4, 4, True),
}


def _model(family):
    cfg_name, model_name, extra = FAMILIES[family][:3]
    tf = importlib.import_module("transformers")
    torch.manual_seed(0)
    kw = extra["only"] if "only" in extra else {k: v for k, v in {**COMMON, **extra}.items() if v is not None}
    model = getattr(tf, model_name)(getattr(tf, cfg_name)(**kw)).eval()
    with torch.no_grad():  # norm weights away from their init (Gemma's and Nemotron's w = 0 in 1 + w), so a fold
        for name, p in model.named_parameters():  # that read w for 1 + w would show
            if p.dim() == 1 and ("norm" in name or "ln" in name):
                p.add_(0.2 * torch.randn(p.shape))
    return model


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
    assert len(folded) >= FAMILIES[family][3], folds
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
    assert counts["folded"] + counts["kept"] >= FAMILIES[family][4], ctx.report["folds"]
    assert all(f["detail"] for f in ctx.report["folds"])  # every refusal says why
    torch.testing.assert_close(gm(x), ref, rtol=1e-4, atol=1e-4)  # ANALYZE only: the folds, in float


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_residual_rotation_is_folded_or_refused_with_a_reason(family):
    model = _model(family)
    gm, ctx, x = _analyze(model, get_recipe("w4a4-rot"))
    rot = [f for f in ctx.report["folds"] if f["pass"] == "fold_rotation" and f["action"] != "online"]
    assert rot and all(f["action"] in ("folded", "refused") and f["detail"] for f in rot), rot
    assert any(f["action"] == "folded" for f in rot) == FAMILIES[family][5], rot
    with torch.no_grad():
        ref = model(x, use_cache=False).logits
    torch.testing.assert_close(gm(x), ref, rtol=1e-3, atol=1e-3)  # folds + online Hadamards, in float


def test_gpt2_conv1d_weights_are_quantized():
    """GPT-2's Conv1D (addmm on a [K, N] constant) becomes a linear: its weights are quantized."""
    import finegrain

    model = _model("gpt2")
    x = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    cm = finegrain.compile(model, (x,), recipe="w8a16", progress=False)
    names = {q["weight"] for q in cm.quantized.values()}
    assert {"transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"} <= names
    with torch.no_grad():
        ref = model(x, use_cache=False).logits
    assert torch.nn.functional.cosine_similarity(cm(x).flatten(), ref.flatten(), dim=0) > 0.999


def test_falcon_linear_weights_are_quantized():
    """Falcon's ``FalconLinear`` computes ``x @ W.T`` instead of calling ``nn.Linear``: canonicalize makes
    it a linear, so its weights are quantized (before 2026-12-07 nothing was, with only a warning)."""
    import transformers as tf

    import finegrain

    torch.manual_seed(0)
    model = tf.FalconForCausalLM(tf.FalconConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, new_decoder_architecture=True,
                                                 num_kv_heads=2)).eval()
    x = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    cm = finegrain.compile(model, (x,), recipe="w8a16", progress=False)
    names = {q["weight"] for q in cm.quantized.values()}
    assert {f"transformer.h.{i}.{m}.weight" for i in range(2) for m in (
        "self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")} <= names
    assert not cm.warnings
    with torch.no_grad():
        ref = model(x, use_cache=False).logits
    out = cm(x)
    assert 0 < float((out - ref).abs().max()) and torch.nn.functional.cosine_similarity(
        out.flatten(), ref.flatten(), dim=0) > 0.999


def _encoder(family):
    import transformers as tf

    torch.manual_seed(0)
    if family == "bert":  # post-LN: every norm's output also feeds the residual
        m = tf.BertModel(tf.BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=128, max_position_embeddings=64), add_pooling_layer=False)
        ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, 8:] = 0
        return m.eval(), (ids, mask), [(ids, mask)] * 2
    m = tf.ViTModel(tf.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128), add_pooling_layer=False)  # pre-LN, a conv patch embedding
    gen = torch.Generator().manual_seed(1)
    return m.eval(), (torch.randn(1, 3, 32, 32, generator=gen),), [(torch.randn(1, 3, 32, 32, generator=gen),)] * 2


# family: (norms folded, norms refused, smoothing sites folded at least, input name)
ENCODERS = {"bert": (0, 5, 0, "input_ids"), "vit": (4, 1, 4, "pixel_values")}


@pytest.mark.parametrize("family", sorted(ENCODERS))
def test_encoder_families(family):
    """BERT (post-LN: no norm folds exactly, each refusal says so) and ViT (pre-LN; pixel inputs
    named from the signature; the patch-embedding conv quantized by the conv preset)."""
    import finegrain

    model, example, calib = _encoder(family)
    folded, refused, smoothed, name = ENCODERS[family]
    with torch.no_grad():
        ref = model(*example).last_hidden_state
    cm = finegrain.compile(model, example, Recipe(name="fold", fold_norms=True), calib, progress=False)
    counts = collections.Counter(f["action"] for f in cm.folds if f["pass"] == "fold_norms")
    assert (counts["folded"], counts["refused"]) == (folded, refused) and all(f["detail"] for f in cm.folds)
    assert cm.input_specs[0]["name"] == name
    torch.testing.assert_close(cm(*example), ref, rtol=1e-4, atol=1e-4)
    sm = finegrain.compile(model, example, "w8a8-smooth", calib, progress=False)
    counts = collections.Counter(f["action"] for f in sm.folds if f["pass"] == "fold_smoothing")
    assert counts["folded"] >= smoothed and sum(counts.values()) == 8 and all(f["detail"] for f in sm.folds)
    conv = finegrain.compile(model, example, "w8a8-conv", calib, progress=False)
    assert len(conv.quantized) == 12 + (family == "vit")
    if family == "vit":
        assert "embeddings.patch_embeddings.projection" in conv.quantized
    assert (conv(*example) - ref).abs().max() <= 0.05 * ref.abs().max()
