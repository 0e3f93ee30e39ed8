"""Block-by-block compilation (``driver/stream.py``, ``finegrain quantize --stream``): the same
artifact as a whole-graph compile where the semantics agree, weights read once each and block by
block, tied weights stored once, and clear refusals."""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import finegrain
from finegrain.driver.stream import compile_streamed, segments
from finegrain.errors import InputError, RecipeError
from finegrain.io.checkpoint import SafetensorsCheckpoint
from finegrain.models.hf_dir import load_hf_dir, load_hf_lazy

VOCAB = 300


def _save(tmp_path, arch: str, tie: bool, shard: str = "200KB") -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(0)
    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    cfg = cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=tie,
              architectures=[("Qwen2" if arch == "qwen2" else "Llama") + "ForCausalLM"])
    d = tmp_path / f"{arch}-{tie}"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(d), max_shard_size=shard)
    return d


def _calib():
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, VOCAB, (1, 24), generator=g),) for _ in range(3)]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("stream"), "qwen2", tie=False)


class CountingCheckpoint(SafetensorsCheckpoint):
    def __init__(self, path):
        super().__init__(path)
        self.loads = []

    def load(self, name, dtype=torch.float32):
        self.loads.append(name)
        return super().load(name, dtype)


@pytest.mark.parametrize("recipe", ["w4a16-g128-gptq", "w8a8", "w4a16-g128"])
def test_same_logits_as_whole_graph(qwen_dir, recipe, tmp_path):
    """Sequential GPTQ / dynamic activations / RTN: the stitched graph computes what the whole-graph
    compile does, bit for bit (each block sees the quantized earlier blocks either way)."""
    lazy = load_hf_lazy(qwen_dir)
    calib = _calib()
    cs = compile_streamed(lazy.model, lazy.weights, calib[0], recipe, calib, param_names=lazy.weight_names,
                          progress=False)
    cf = finegrain.compile(load_hf_dir(qwen_dir).model, calib[0], recipe, calib, progress=False)
    ids = torch.randint(0, VOCAB, (1, 17))
    assert torch.equal(cs(ids), cf(ids))
    assert cs.quantized == cf.quantized and len(cs.quantized) == 21  # 3 layers x 7 linears; q/k/v biases float
    assert {n for n, _ in cs.gm.named_buffers()} == {n for n, _ in cf.gm.named_buffers()}
    assert cs.source["compiled"] == {"mode": "block by block", "segments": 5}
    # every finished block's constants were spooled to disk (memory-mapped), none kept as a RAM copy
    bufs = dict(cs.gm.named_buffers())
    assert all(cs.spool.location(t) is not None for t in bufs.values() if t.numel())
    assert cs.spool.nbytes >= sum(t.numel() * t.element_size() for t in bufs.values())
    back = finegrain.load(cs.save(tmp_path / "a"))  # the spooled weights copied into the artifact file
    assert torch.equal(back(ids), cf(ids))


def test_weights_read_once_block_by_block(qwen_dir):
    lazy = load_hf_lazy(qwen_dir)
    ckpt = CountingCheckpoint(qwen_dir)
    calib = _calib()
    compile_streamed(lazy.model, ckpt, calib[0], "w4a16-g128-gptq", calib, param_names=lazy.weight_names,
                     progress=False)
    assert sorted(ckpt.loads) == sorted(ckpt.keys())  # every tensor once
    layer = [int(k.split(".")[2]) for k in ckpt.loads if k.startswith("model.layers.")]
    assert layer == sorted(layer)  # layer 0's weights all before layer 1's ...
    assert ckpt.loads[0] == "model.embed_tokens.weight" and ckpt.loads[-1] == "lm_head.weight"


def test_segments_follow_layers(qwen_dir):
    from finegrain.compiler.capture import capture

    lazy = load_hf_lazy(qwen_dir)
    gm = capture(lazy.model, _calib()[0], check_finite=False)
    names, segs = segments(gm)
    assert names == ["prologue", "model.layers.0", "model.layers.1", "model.layers.2", "epilogue"]
    ops = [[n.target for n in s] for s in segs]
    assert torch.ops.aten.embedding.default in ops[0]
    assert sum(t is torch.ops.aten.linear.default for t in ops[1]) == 7
    assert sum(t is torch.ops.aten.linear.default for t in ops[4]) == 1  # the LM head


def test_tied_embedding_read_and_stored_once(tmp_path):
    d = _save(tmp_path, "llama", tie=True, shard="10MB")
    lazy = load_hf_lazy(d)
    assert lazy.weight_names["lm_head.weight"] == "model.embed_tokens.weight"
    ckpt = CountingCheckpoint(d)
    calib = _calib()
    cs = compile_streamed(lazy.model, ckpt, calib[0], "w4a16-g128", calib, param_names=lazy.weight_names,
                          progress=False)
    assert ckpt.loads.count("model.embed_tokens.weight") == 1
    assert [n for n, _ in cs.gm.named_buffers() if "embed_tokens" in n] == ["model.embed_tokens.weight"]
    cf = finegrain.compile(load_hf_dir(d).model, calib[0], "w4a16-g128", calib, progress=False)
    ids = torch.randint(0, VOCAB, (1, 9))
    assert torch.equal(cs(ids), cf(ids))


def test_refusals(qwen_dir, tmp_path):
    lazy = load_hf_lazy(qwen_dir)
    calib = _calib()
    with pytest.raises(RecipeError, match="rotate"):
        compile_streamed(lazy.model, lazy.weights, calib[0], "w4a16-g128-rot-gptq", calib,
                         param_names=lazy.weight_names, progress=False)
    with pytest.raises(RecipeError, match="budget"):
        compile_streamed(lazy.model, lazy.weights, calib[0], {"name": "b", "weight_candidates": ["int4-g128-asym-fp16",
                         "int8-channel-sym-fp16"], "budget_bits": 5}, calib, param_names=lazy.weight_names,
                         progress=False)
    with pytest.raises(RecipeError, match="gptq_float_target"):
        compile_streamed(lazy.model, lazy.weights, calib[0], {"name": "f", "weight_algorithm": "gptq",
                         "gptq_float_target": True}, calib, param_names=lazy.weight_names, progress=False)
    # a checkpoint that lacks a tensor / has a wrong shape: named, from the headers alone
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((qwen_dir / "config.json").read_text())
    tensors = {}
    for f in sorted(qwen_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    w = tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(InputError, match=r"missing model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf_lazy(bad)
    save_file({**tensors, "model.layers.1.mlp.up_proj.weight": w[:, :32].contiguous()}, str(bad / "model.safetensors"))
    with pytest.raises(InputError, match=r"up_proj\.weight is \[128, 32\], the model needs \[128, 64\]"):
        load_hf_lazy(bad)
    # NaN in a block's weight: found when that block is read, named
    w2 = w.clone()
    w2[3, 5] = float("nan")
    save_file({**tensors, "model.layers.1.mlp.up_proj.weight": w2}, str(bad / "model.safetensors"))
    nan = load_hf_lazy(bad)
    with pytest.raises(InputError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*NaN"):
        compile_streamed(nan.model, nan.weights, calib[0], "w4a16-g128", calib, param_names=nan.weight_names,
                         progress=False)
    # custom modelling code and non-causal models are refused
    cfg = json.loads((qwen_dir / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "x.Y"}}))
    with pytest.raises(InputError, match="auto_map"):
        load_hf_lazy(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["Qwen2Model"]}))
    with pytest.raises(InputError, match="causal LMs"):
        load_hf_lazy(bad)


def test_cli_stream_and_reload(tmp_path):
    """`finegrain quantize --stream` on a sharded checkpoint with a tokenizer, then the artifact loads and runs
    in a fresh process, with peak RSS measured (benchmarks/large_model.py at its smallest size)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import large_model

    rows = large_model.main(["--sizes", "tiny", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "r")])
    (row,) = rows
    assert row["forward"].startswith("forward ok (1, 16, 49152)")
    assert 0 < row["compile_peak_rss_gib"] < 4 and row["artifact_gb"] > 0
    assert json.loads((tmp_path / "r" / "large_model.json").read_text()) == rows


def test_gguf_streams_tensor_by_tensor(tmp_path):
    """A Llama GGUF (here one finegrain exported, Q8_0 + F32) compiled block by block from the file, each
    tensor dequantized when its block is read (Q/K rows un-permuted), equals compiling the loaded model."""
    from finegrain.models import load_model, load_model_lazy
    from finegrain.models.gguf_llama import GGUFCheckpoint
    from finegrain.models.tiny import tiny_llama

    model = tiny_llama(seed=4, hidden=128)
    ids = torch.randint(0, 256, (1, 16))
    finegrain.compile(model, (ids,), recipe="w8a16", progress=False).export_gguf(tmp_path / "m.gguf")
    lazy = load_model_lazy(str(tmp_path / "m.gguf"))
    assert isinstance(lazy.weights, GGUFCheckpoint) and lazy.source["format"] == "gguf"
    whole = load_model(str(tmp_path / "m.gguf")).model
    params = dict(whole.named_parameters())
    for name in lazy.weights.keys():
        assert torch.equal(lazy.weights.load(name), params[name]), name
    g = torch.Generator().manual_seed(2)
    calib = [(torch.randint(0, 256, (1, 20), generator=g),) for _ in range(2)]
    cs = compile_streamed(lazy.model, lazy.weights, calib[0], "w4a16-g128-gptq", calib,
                          param_names=lazy.weight_names, progress=False)
    cf = finegrain.compile(whole, calib[0], "w4a16-g128-gptq", calib, progress=False)
    assert torch.equal(cs(ids), cf(ids))
    with pytest.raises(InputError, match="not a local Hugging Face model directory"):
        load_model_lazy(str(tmp_path / "nothing-here"))
