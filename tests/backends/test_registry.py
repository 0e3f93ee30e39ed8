"""The backend contract: one table (backends/registry.py) read by the API, finegrain.load and the
CLI; every registered backend passes the same conformance suite (outputs vs the torch reference,
or refusals that name the layer / input, raised before any work); a new backend is one module
plus one table line (a toy backend shows it); the capability matrix comes from the same functions
as the refusals."""
import json

import pytest
import torch

import finegrain
from finegrain.backends import registry
from finegrain.backends.base import Artifact, BackendBase, Refusal, Session
from finegrain.errors import FinegrainError
from tests.backends.targets import BUILD

BACKEND_PARAMS = [pytest.param(n, marks=[getattr(pytest.mark, n)] if n in ("onnx", "tvm") else [])
                  for n in registry.names()]


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(8 * 8 * 8, 16)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def models(compiled, minilm):
    """name -> (CompiledModel, inputs to compare on)."""
    from finegrain.jobs import compile_loaded

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    conv = ConvNet().eval()
    x = torch.randn(1, 3, 8, 8, generator=gen)
    conv_cm = finegrain.compile(conv, (x,), recipe="w8a16", progress=False)
    mini = compile_loaded(minilm, "w8a16", samples=8, seq_len=32, progress=False)
    enc = minilm.tokenizer(["a short sentence", "another one, longer than the first"], padding="max_length",
                           max_length=16, return_tensors="pt")
    mini_inputs = tuple(enc[k][:1] if mini.input_specs[0]["shape"][0] == 1 else enc[k]
                        for k in ("input_ids", "attention_mask"))
    return {"tiny-llama w4a16": (compiled("w4a16-g128"), (torch.randint(0, 256, (1, 11), generator=gen),)),
            "tiny-llama w8a8": (compiled("w8a8"), (torch.randint(0, 256, (1, 7), generator=gen),)),
            "minilm w8a16": (mini, mini_inputs),
            "convnet w8a16": (conv_cm, (torch.randn(1, 3, 8, 8, generator=gen),))}


EXPECTED_REFUSALS = {("tvm", "minilm w8a16")}  # two token-id inputs (TVM: one token-id input, or float tensors)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("model", ["tiny-llama w4a16", "tiny-llama w8a8", "minilm w8a16", "convnet w8a16"])
def test_conformance(models, backend, model, tmp_path):
    cm, inputs = models[model]
    refusals = cm.check(backend)
    assert ((backend, model) in EXPECTED_REFUSALS) == bool(refusals), refusals
    if refusals:
        assert all(isinstance(r, Refusal) and r.where and r.why for r in refusals)
        with pytest.raises(FinegrainError) as e:
            cm.session(backend)
        assert str(refusals[0]) in str(e.value)
        return
    ref = cm(*inputs)
    options = {"max_seq_len": 64, "target": BUILD} \
        if backend == "tvm" else {}
    with cm.session(backend, **options) as s:
        assert s.backend == backend
        got = s.run(*inputs)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max() + 1e-6, (backend, model)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_refusals_name_each_layer(compiled, backend):
    """BitMoD weights: every backend that has no way to run them (the reference and the GPU backend
    dequantize them) refuses each quantized linear by name."""
    from finegrain.formats import QuantFormat

    cm = compiled("bitmod-w4")
    refusals = cm.check(backend)
    if registry.get(backend).capability(QuantFormat.parse("bitmod4-g128-sym-fp16"), "weight")[0] != "refused":
        assert refusals == []
        return
    layers = {r.where for r in refusals}
    assert layers == {q["weight"] for q in cm.quantized.values()}
    assert all("bitmod4-g128-sym-fp16" in r.why for r in refusals)


def test_capability_matrix_agrees_with_check(compiled):
    """The matrix's 'refused' cells are exactly the presets check() refuses (tiny Llama)."""
    names = registry.names()
    for row in registry.preset_matrix():
        preset, cells = row[0], dict(zip(names, row[1:]))
        if preset not in ("nvfp4", "w4a16-g128", "fp8", "w4a8-dgq", "mxfp4", "nf4-g64", "w4a4-rot"):
            continue
        cm = compiled(preset)
        for name in names:
            assert (cells[name] == "refused") == bool(cm.check(name)), (preset, name, cm.check(name))


def test_stateful_session_prefill_step_matches_full_forward(compiled):
    cm = compiled("w8a8")
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    full = cm(ids)
    with cm.session("torch") as s:
        logits, state = s.prefill(ids[:, :5])
        assert torch.equal(logits, cm(ids[:, :5]))
        for t in range(5, 9):
            step, state = s.step(state, ids[:, t:t + 1])
            assert (step[:, -1] - full[:, t]).abs().max() <= 1e-5 * full.abs().max()


# ---- a toy backend: one module + one table line ------------------------------------------------
class ToySession(Session):
    backend = "toy"

    def __init__(self, cm):
        self.cm, self.input_specs, self.calls = cm, cm.input_specs, 0

    def run(self, *inputs):
        self.calls += 1
        return self.cm(*inputs)


class ToyArtifact(Artifact):
    backend = "toy"

    def __init__(self, path):
        self.path, self.input_specs, self.tokenizer, self.quantized, self.source = path, [], None, {}, {}
        self.recipe_name = json.loads((path / "toy.json").read_text())["recipe"]


class ToyBackend(BackendBase):
    name = "toy"
    description = "a test backend: INT8 weights only"

    def capability(self, fmt, role, partner=None):
        if role == "weight" and fmt.kind == "int" and fmt.bits == 8:
            return "native", "int8"
        return "refused", f"{role} format {fmt.tag}: the toy takes INT8 weights only"

    def op_capability(self, op):
        return "refused", f"{op}: not in the toy"

    def session(self, compiled, **options):
        self.require(compiled)
        return ToySession(compiled)

    def recognizes(self, path):
        return (path / "toy.json").is_file()

    def load(self, path, **options):
        return ToyArtifact(path)


TOY = ToyBackend()


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(registry.BACKENDS, "toy", "tests.backends.test_registry:TOY")


def test_a_new_backend_is_one_table_line(toy, compiled, tmp_path, capsys):
    from finegrain.cli import build_parser, main

    cm = compiled("w8a16")
    x = torch.randint(0, 256, (1, 6))
    with cm.session("toy") as s:
        assert torch.equal(s.run(x), cm(x)) and s.calls == 1
    w4 = compiled("w4a16-g128")
    assert len(w4.check("toy")) == len(w4.quantized)
    with pytest.raises(FinegrainError, match="backend 'toy' cannot run this model .*the toy takes INT8"):
        w4.session("toy")
    assert build_parser().parse_args(["eval", "--model", "m", "--backend", "toy"]).backend == "toy"
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "toy.json").write_text(json.dumps({"recipe": "toy-recipe"}))
    art = finegrain.load(tmp_path / "t")
    assert isinstance(art, Artifact) and art.backend == "toy" and art.recipe_name == "toy-recipe"
    capsys.readouterr()
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "toy" in out and "w8a16" in out


def test_unknown_backend(compiled):
    with pytest.raises(FinegrainError, match="backend 'nope' is not available"):
        compiled("w8a8").session("nope")


def test_readme_matrix_is_the_registry_table(capsys):
    """The README's capability matrix is `finegrain backends --markdown`, verbatim."""
    from pathlib import Path

    from finegrain.cli import main

    assert main(["backends", "--markdown"]) == 0
    out = capsys.readouterr().out
    generated = out[out.index("| recipe"):].strip()
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("<!-- capability-matrix:begin -->")[1].split("<!-- capability-matrix:end -->")[0].strip()
    assert block == generated


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_quantized_tied_embedding_and_head_on_every_backend(backend):
    """``w4a16-g128-rot-gptq-head8``: the tied embedding / LM head stored once in int8, read by the
    embedding lookup (ONNX: DequantizeLinear of the matrix; TVM: packed_embedding, only the rows looked
    up) and by the head (TVM: its low-bit kernel); every backend within 1e-4 of the reference."""
    from finegrain.models.tiny import tiny_llama

    gen = torch.Generator().manual_seed(0)
    calib = [(torch.randint(0, 256, (1, 32), generator=gen),) for _ in range(4)]
    cm = finegrain.compile(tiny_llama(seed=0, hidden=128), calib[0], "w4a16-g128-rot-gptq-head8", calib,
                           progress=False)
    assert {"lm_head", "model.embed_tokens"} <= set(cm.quantized) and cm.check(backend) == []
    x = torch.randint(0, 256, (1, 20), generator=gen)
    ref = cm(x)
    options = {"max_seq_len": 64, "target": BUILD} \
        if backend == "tvm" else {}
    with cm.session(backend, **options) as s:
        assert (s.run(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
        if backend == "tvm":
            kinds = sorted(v["kind"] for k, v in s.build["kernels"].items() if k.startswith("model.embed_tokens"))
            assert kinds[0] == "embedding (rows dequantized per lookup)" and kinds[1:] == ["int"], kinds


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_fmpq_activation_groups_in_two_precisions_on_every_backend(compiled, tiny_inputs, backend):
    """FMPQ (``act_outlier_fraction``): each site's outlier groups at 8 bits, the rest at 4 bits
    (``where(mask, dq8, dq4)`` over two group quantizations); every backend within 1e-4 of the
    reference, which the same graph with the 8-bit groups dropped misses by far more."""
    import copy

    rule = {"role": "linear", "weight": "int8-channel-sym-fp32", "activation": "int4-g16-sym-fp32-dyn"}
    cm = compiled({"name": "fmpq", "rules": [rule], "act_outlier_fraction": 0.25, "weight_algorithm": "gptq",
                   "sequential": True})
    assert cm.check(backend) == []
    _, _, x = tiny_inputs
    ref = cm(x)
    lo_only = copy.deepcopy(cm.gm)
    wheres = [n for n in lo_only.graph.nodes if n.target is torch.ops.aten.where.self]
    assert wheres
    for n in wheres:
        n.replace_all_uses_with(n.args[2])
        lo_only.graph.erase_node(n)
    lo_only.recompile()
    options = {"max_seq_len": 32, "target": BUILD} \
        if backend == "tvm" else {}
    with cm.session(backend, **options) as s:
        err = (s.run(x) - ref).abs().max()
    assert err <= 1e-4 * ref.abs().max()
    assert (lo_only(x) - ref).abs().max() > 100 * err


@pytest.mark.parametrize("backend", [pytest.param("tvm", marks=pytest.mark.tvm),
                                     pytest.param("onnx", marks=pytest.mark.onnx)])
def test_w4a4kv4_decodes_over_its_cache_on_tvm_and_onnx(tiny_llama, backend, tmp_path):
    """The COMET-style preset (rotation, GPTQ, INT4 activations in groups of 64 with FMPQ's 8-bit
    outlier groups, KIVI-4 cache; the window and groups shrunk to the tiny model's 24 tokens): prefill
    + decode over each backend's cache give the reference's logits and its greedy tokens; ONNX: and
    onnxruntime-genai, driving the cache itself, the same tokens."""
    from finegrain.compiler.recipe import get_recipe

    gen = torch.Generator().manual_seed(5)
    calib = [(torch.randint(0, 256, (1, 32), generator=gen),) for _ in range(2)]
    recipe = {**get_recipe("w4a4kv4").to_dict(), "name": "w4a4kv4-tiny", "kv_window": 4,
              "kv_key": "int4-g4-asym-fp16-dyn", "kv_value": "int4-g8-asym-fp16-dyn"}
    cm = finegrain.compile(tiny_llama, calib[0], recipe=recipe, calibration=calib, progress=False, kv_cache=True)
    assert cm.check(backend) == []
    x = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))

    def incremental(s):
        logits, state = s.prefill(x[:, :9])
        outs = [logits]
        for t in range(9, x.shape[1]):
            logits, state = s.step(state, x[:, t:t + 1])
            outs.append(logits)
        return torch.cat(outs, 1)

    ref = incremental(cm.session())
    options = {"max_seq_len": 48, "target": BUILD} \
        if backend == "tvm" else {}
    with cm.session(backend, **options) as s:
        err = (incremental(s) - ref).abs().amax(-1)[0] / ref.abs().max()
        # a float rounding difference may flip one 4-bit activation code: a step of its group's range
        assert (err > 1e-4).sum() <= 1 and err.max() <= 1e-2, err
        assert s.generate(x[:, :9], 10).tokens == cm.generate(x[:, :9], 10).tokens
    if backend == "onnx":
        og = pytest.importorskip("onnxruntime_genai")
        from finegrain.backends.onnx import export_genai
        from tests.backends.test_onnx_kv import _genai_greedy

        export_genai(cm, tmp_path / "genai")
        tokens, _ = _genai_greedy(og, tmp_path / "genai", x[:, :9], 19)
        assert tokens == cm.generate(x[:, :9], 10).tokens
