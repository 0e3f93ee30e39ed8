"""Mixture-of-experts graphs (Mixtral- and Qwen2-MoE-style, random init from transformers configs):
grouped expert GEMMs canonicalized to ``finegrain::grouped_linear``, per-expert calibration,
quantization and bit allocation weighted by routing frequency, artifacts without transformers."""
import math

import pytest
import torch

import finegrain
from finegrain.compiler.capture import capture
from finegrain.compiler.ir import expert_key, quantizable_ops
from finegrain.formats import QuantFormat
from finegrain.compiler.ops import GROUPED_LINEAR
from finegrain.models.tiny import tiny_mixtral, tiny_qwen_moe
from finegrain.passes.canonicalize import canonicalize
from finegrain.passes.sensitivity import output_error

CANDS = ["int2-g32-asym-fp16", "int4-g32-asym-fp16", "int8-channel-sym-fp16"]
E = 4


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(1)
    example = (torch.randint(0, 256, (1, 16), generator=gen),)
    calib = [(torch.randint(0, 256, (1, 32), generator=gen),) for _ in range(4)]
    test = torch.randint(0, 256, (1, 24), generator=gen)
    return example, calib, test


@pytest.fixture(scope="module")
def mixtral():
    return tiny_mixtral(experts=E)


@pytest.fixture(scope="module")
def qwen_moe():
    return tiny_qwen_moe(experts=E)


def _recipe(**kw):
    return {"name": "moe", "rules": [{"role": "linear", "weight": "int4-g32-asym-fp16"}], "weight_candidates": CANDS,
            "sensitivity": "output", "budget_bits": 3.5, **kw}


def test_grouped_linear_matches_per_expert_linears_and_its_gradient():
    torch.manual_seed(0)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    offs = torch.tensor([2, 2, 7])  # expert 1 gets no rows
    y = GROUPED_LINEAR(x, w, offs)
    ref = torch.cat([x[:2] @ w[0].T, x[2:7] @ w[2].T])
    assert torch.allclose(y, ref)
    assert torch.autograd.gradcheck(lambda a, b: GROUPED_LINEAR(a, b, offs), (x, w))


def test_canonicalize_rewrites_expert_gemms_exactly(mixtral, data):
    example, _, test = data
    gm = canonicalize(capture(mixtral, example), None)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert not any("grouped_mm" in t for t in targets)
    ops = quantizable_ops(gm)
    grouped = [op for op in ops if op.kind == "grouped"]
    assert [op.name for op in grouped] == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                           for p in ("gate_up_proj", "down_proj")]
    assert all(op.experts == E and op.role == "linear" for op in grouped)
    assert [op.name for op in ops if op.role == "router"] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    with torch.no_grad():
        assert torch.equal(gm(test), mixtral(test).logits)


def test_per_expert_calibration_and_routing_frequency(mixtral, data):
    example, calib, _ = data
    cm = finegrain.compile(mixtral, example, recipe=_recipe(), calibration=calib, progress=False)
    layers = cm.layer_report
    rows = [layers[f"model.layers.0.mlp.experts.gate_up_proj.{e}"]["calibration_rows"] for e in range(E)]
    tokens = sum(b[0].numel() for b in calib)
    assert sum(rows) == tokens * mixtral.config.num_experts_per_tok  # every routed row seen once
    freq = cm.allocation["routing"]["model.layers.0.mlp.experts.gate_up_proj"]
    assert freq == pytest.approx([r / tokens for r in rows], abs=1e-4)
    assert sum(freq) == pytest.approx(mixtral.config.num_experts_per_tok, abs=1e-3)


def test_expert_allocation_weights_each_expert_by_its_routed_rows(mixtral, data):
    from finegrain.compiler.recipe import get_recipe
    from finegrain.driver.api import _prepare
    from finegrain.driver.pipeline import ANALYZE

    example, calib, _ = data
    prep = _prepare(mixtral, example, get_recipe(_recipe()), calib, ("input_ids",), True, False, False, ANALYZE)
    gm, ctx = prep.gm, prep.ctx
    alloc = ctx.allocation
    names = [[t.name for t in grp] for grp in alloc.groups]
    assert len(alloc.groups) == 2 * (2 + 2 * E)  # per layer: qkv, o, and each expert of gate_up and down
    assert ["model.layers.1.mlp.experts.down_proj.3"] in names
    # the value of one expert target is its rows' X^T X over all calibration tokens
    op = next(t.op for grp in alloc.groups for t in grp if t.name == "model.layers.1.mlp.experts.down_proj.2")
    g = names.index(["model.layers.1.mlp.experts.down_proj.2"])
    w = gm.get_buffer(op.weight.target)[2].float()
    st = ctx.stats[expert_key(op.activation.name, 2)]
    tokens = sum(b[0].numel() for b in calib)
    for i, c in enumerate(alloc.candidates):
        expect = output_error(c.fake_quantize(w) - w, st.xtx / tokens)
        assert alloc.values[g][i] == pytest.approx(expect, rel=1e-5)
    # fewer routed rows -> less predicted damage for the same weight error: scale by frequency
    assert st.count < tokens


def test_expert_allocation_mixes_formats_and_meets_the_budget(mixtral, data):
    example, calib, test = data
    cm = finegrain.compile(mixtral, example, recipe=_recipe(), calibration=calib, progress=False)
    f = cm.allocation["chosen"]["formats"]
    experts = {k: v for k, v in f.items() if ".experts." in k}
    assert len(experts) == 2 * 2 * E
    assert len(set(experts.values())) > 1  # experts of one grouped GEMM got different formats
    assert cm.quantized_bits_per_weight() <= 3.5
    for name, fmt in f.items():  # what the artifact stores is what the solver chose
        assert cm.quantized[name]["format"] == fmt
    numel = sum(math.prod(q["shape"]) for q in cm.quantized.values())
    assert cm.allocation["weights"] == numel
    with torch.no_grad():
        ref = mixtral(test).logits
    assert (cm(test) - ref).abs().max() < 0.5 * ref.abs().max()


def test_grouped_allocation_gives_one_format_per_grouped_gemm(mixtral, data):
    example, calib, _ = data
    cm = finegrain.compile(mixtral, example, recipe=_recipe(expert_allocation="grouped"), calibration=calib,
                           progress=False)
    assert cm.allocation["groups"] == 2 * 4
    chosen = cm.allocation["chosen"]["formats"]
    for layer in (0, 1):
        for proj in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{layer}.mlp.experts.{proj}"
            assert len({cm.quantized[f"{name}.{e}"]["format"] for e in range(E)}) == 1
            assert cm.quantized[f"{name}.0"]["format"] == chosen[name]
    assert cm.quantized_bits_per_weight() <= 3.5


def test_byte_budget_counts_every_expert(mixtral, data):
    example, calib, _ = data
    top = finegrain.compile(mixtral, example, recipe=_recipe(), calibration=calib, progress=False)
    budget = top.model_bytes() - 2000
    cm = finegrain.compile(mixtral, example, recipe=_recipe(budget_bits=None, budget_bytes=budget), calibration=calib,
                           progress=False)
    assert cm.model_bytes() <= budget
    stored = sum(QuantFormat.parse(q["format"]).stored_bytes(tuple(q["shape"])) for q in cm.quantized.values())
    assert cm.allocation["chosen"]["cost"] + (cm.model_bytes() - stored) == cm.model_bytes()


def test_fisher_runs_through_the_expert_gemms(mixtral, data):
    example, calib, _ = data
    cm = finegrain.compile(mixtral, example, recipe=_recipe(sensitivity="fisher"), calibration=calib, progress=False)
    assert cm.allocation["sensitivity"] == "fisher"
    assert cm.quantized_bits_per_weight() <= 3.5
    assert cm.allocation["chosen"]["predicted"] > 0


def test_gptq_per_expert_and_artifact_without_transformers(mixtral, data, tmp_path):
    example, calib, test = data
    # no budget: every linear keeps the rule's int4 g32; the candidates make RTN collect X^T X too,
    # so both records' output SQNR use the full per-expert Hessian
    rtn = finegrain.compile(mixtral, example, recipe=_recipe(budget_bits=None), calibration=calib, progress=False)
    gq = finegrain.compile(mixtral, example, recipe=_recipe(budget_bits=None, weight_algorithm="gptq"),
                           calibration=calib, progress=False)
    recs = [gq.layer_report[f"model.layers.0.mlp.experts.down_proj.{e}"] for e in range(E)]
    assert all(r["algorithm"] == "gptq" and r["format"] == "int4-g32-asym-fp16" for r in recs if r["calibration_rows"])
    assert all(r["sequential"] for r in recs)  # per-expert Hessians measured on the replayed graph
    rtn_db = [rtn.layer_report[f"model.layers.0.mlp.experts.down_proj.{e}"]["output_sqnr_db"] for e in range(E)]
    assert all(r["output_sqnr_db"] > d for r, d in zip(recs, rtn_db) if r["calibration_rows"])
    gq.save(tmp_path / "a")
    assert "transformers" not in (tmp_path / "a" / "graph.json").read_text()
    back = finegrain.load(tmp_path / "a")
    assert torch.equal(back(test), gq(test))


def test_shared_expert_and_router(qwen_moe, data):
    example, calib, test = data
    cm = finegrain.compile(qwen_moe, example, recipe=_recipe(), calibration=calib, progress=False)
    f = cm.allocation["chosen"]["formats"]
    for layer in (0, 1):
        p = f"model.layers.{layer}.mlp"
        # the shared expert's gate/up read the same tensor (and so does its sigmoid gate): one format
        assert f[f"{p}.shared_expert.gate_proj"] == f[f"{p}.shared_expert.up_proj"] == f[f"{p}.shared_expert_gate"]
        assert f"{p}.gate" not in cm.quantized  # routers stay in float under role="linear" rules
        assert all(f"{p}.experts.down_proj.{e}" in f for e in range(E))
    with torch.no_grad():
        ref = qwen_moe(test).logits
    assert (cm(test) - ref).abs().max() < 0.5 * ref.abs().max()


def test_experts_no_calibration_token_reached():
    m = tiny_mixtral(experts=E, top_k=1)
    gen = torch.Generator().manual_seed(3)
    example = (torch.randint(0, 256, (1, 16), generator=gen),)
    calib = [(torch.randint(0, 256, (1, 2), generator=gen),)]  # 2 tokens, top-1: at most 2 of 4 experts
    cm = finegrain.compile(m, example, recipe=_recipe(weight_algorithm="gptq", budget_bits=6.0), calibration=calib,
                           progress=False)
    recs = {e: cm.layer_report[f"model.layers.0.mlp.experts.down_proj.{e}"] for e in range(E)}
    idle = [e for e, r in recs.items() if r["calibration_rows"] == 0]
    assert len(idle) >= 2
    assert all(recs[e]["algorithm"] == "rtn" for e in idle)  # no Hessian: rounded to nearest
    assert all(r["algorithm"] == "gptq" for e, r in recs.items() if e not in idle)
    freq = cm.allocation["routing"]["model.layers.0.mlp.experts.down_proj"]
    assert all(freq[e] == 0.0 for e in idle)
    # no routed token, no predicted damage: the solver spends nothing on them
    assert all(recs[e]["format"] == CANDS[0] for e in idle)


def test_gpt_oss_experts_stored_k_by_n_are_quantized():
    """GPT-OSS multiplies its expert weights as stored, ``[E, K, N]`` (no transpose): canonicalize
    stores them ``[E, N, K]`` and makes them grouped linears, so they are quantized (before: only the
    attention's 8 linears were, with no warning), the post-attention norms fold through the token
    dispatch into the router and the experts, and the residual rotation folds with the experts' biases
    (gathered per routed row and added in place) rotated like embedding rows."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.GptOssForCausalLM(tf.GptOssConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                                 sliding_window=8, max_position_embeddings=128)).eval()
    x = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x, use_cache=False).logits
    cm = finegrain.compile(model, (x,), recipe="w8a16", progress=False)
    names = {q["weight"] for q in cm.quantized.values()}
    assert {f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")} <= names
    out = cm(x)  # INT8 per output channel: close (a transposed weight quantized along the wrong axis is not)
    assert 0 < float((out - ref).abs().max()) and torch.nn.functional.cosine_similarity(
        out.flatten(), ref.flatten(), dim=0) > 0.999
    folded = finegrain.compile(model, (x,), recipe=finegrain.Recipe(name="fold", fold_norms=True), progress=False)
    assert [f["action"] for f in folded.folds if f["pass"] == "fold_norms"] == ["folded"] * 5, folded.folds
    torch.testing.assert_close(folded(x), ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the experts' down-projection biases (added in place, per routed row) away from 0,
        for i in range(2):  # so a rotation that left them unrotated would show
            model.model.layers[i].mlp.experts.down_proj_bias.normal_(0, 0.5)
        ref = model(x, use_cache=False).logits
    rot = finegrain.compile(model, (x,), recipe=finegrain.Recipe(name="rot", rotate=True), progress=False)
    (st,) = [f for f in rot.folds if f["pass"] == "fold_rotation"]
    assert st["action"] == "folded" and "3 embedding(s)" in st["detail"], st  # the embedding and 2 bias tables
    torch.testing.assert_close(rot(x), ref, rtol=1e-4, atol=1e-4)
