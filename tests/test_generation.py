"""Generation over backend sessions (prefill / step, greedy and sampling) and ``finegrain
generate``: greedy tokens equal Hugging Face ``generate`` on a float graph, the same on every
backend for a quantized one, sampling is repeatable by seed, and bad requests are clear errors."""
import pytest
import torch

import finegrain
from finegrain.backends.base import Session
from finegrain.errors import InputError

FLOAT = {"name": "float", "rules": [{"role": "linear"}]}  # a rule that keeps every linear in float


@pytest.fixture(scope="module")
def float_cm(tiny_llama, tiny_inputs):
    example, _, _ = tiny_inputs
    with pytest.warns(UserWarning, match="quantizes nothing"):
        return finegrain.compile(tiny_llama, example, recipe=FLOAT, progress=False)


def test_greedy_equals_transformers_generate(float_cm, tiny_llama):
    for seed in (0, 1, 2):
        prompt = torch.randint(0, 256, (1, 5 + seed), generator=torch.Generator().manual_seed(seed))
        hf = tiny_llama.generate(prompt, max_new_tokens=16, do_sample=False, min_new_tokens=16,
                                 pad_token_id=0)[0, prompt.shape[1]:].tolist()
        g = float_cm.generate(prompt, 16)
        assert g.tokens == hf and g.stopped == "length" and g.prompt_tokens == prompt.shape[1]


@pytest.mark.onnx
def test_greedy_same_on_every_backend(compiled):
    cm = compiled("w8a16")
    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(5))
    ref = cm.generate(prompt, 12).tokens
    assert cm.generate(prompt, 12, backend="onnx").tokens == ref


def test_sampling_is_repeatable_and_degenerates_to_greedy(compiled):
    cm = compiled("w8a16")
    prompt = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(7))
    greedy = cm.generate(prompt, 10).tokens
    with cm.session() as s:
        a = s.generate(prompt, 10, do_sample=True, temperature=1.5, seed=3).tokens
        b = s.generate(prompt, 10, do_sample=True, temperature=1.5, seed=3).tokens
        c = s.generate(prompt, 10, do_sample=True, temperature=1.5, seed=4).tokens
        assert a == b and a != c
        assert s.generate(prompt, 10, do_sample=True, top_k=1, seed=9).tokens == greedy
        assert s.generate(prompt, 10, do_sample=True, top_p=1e-6, seed=9).tokens == greedy


def test_eos_and_streaming(compiled):
    cm = compiled("w8a16")
    prompt = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(8))
    full = cm.generate(prompt, 10).tokens
    seen = []
    g = cm.generate(prompt, 10, eos_token_id=full[3], streamer=seen.append)
    first = full.index(full[3])
    assert g.tokens == full[:first + 1] == seen and g.stopped == "eos"
    assert cm.generate(prompt, 0).tokens == []


class _Limited(Session):
    backend, max_seq_len = "limited", 8

    def run(self, ids):
        return torch.zeros(1, ids.shape[1], 4)


@pytest.mark.parametrize("ids,n,kw,match", [
    (torch.zeros(1, 0, dtype=torch.long), 4, {}, "prompt is empty"),
    (torch.zeros(2, 3, dtype=torch.long), 4, {}, "batch 1"),
    (torch.zeros(1, 3), 4, {}, "int64"),
    (torch.zeros(1, 6, dtype=torch.long), 4, {}, "exceeds the 8 tokens"),
    (torch.zeros(1, 3, dtype=torch.long), -1, {}, "max_new_tokens"),
    (torch.zeros(1, 3, dtype=torch.long), 2, {"temperature": 0}, "temperature"),
    (torch.zeros(1, 3, dtype=torch.long), 2, {"top_p": 1.5}, "top_p"),
    (torch.zeros(1, 3, dtype=torch.long), 2, {"top_k": 0}, "top_k"),
])
def test_bad_requests(ids, n, kw, match):
    with pytest.raises(InputError, match=match):
        _Limited().generate(ids, n, **kw)


def test_cli_generate(tmp_path, capsys):
    from finegrain.cli import main
    from finegrain.models.bundled import _smollm2_tokenizer
    from finegrain.models.tiny import tiny_llama

    tok = _smollm2_tokenizer()
    hf = tmp_path / "hf"
    tiny_llama(seed=4, vocab=len(tok)).save_pretrained(hf, safe_serialization=True)
    tok.save_pretrained(hf)
    art = tmp_path / "art"
    assert main(["quantize", "--model", str(hf), "--recipe", "w8a16", "--out", str(art),
                 "--calibration-samples", "0"]) == 0
    capsys.readouterr()
    assert main(["generate", str(art), "--prompt", "The capital of France is", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "prefill" in out and "decode 6 tokens" in out and "tokens/s" in out
    assert main(["generate", str(art), "--prompt", "The capital of France is", "--max-new-tokens", "6",
                 "--weight-storage", "packed"]) == 0  # each weight dequantized at every step: the same text
    assert capsys.readouterr().out.split("[torch]")[0] == out.split("[torch]")[0]
    assert main(["generate", str(art), "--prompt", "Hello", "--chat", "--max-new-tokens", "3", "--temperature", "0.7",
                 "--seed", "1"]) == 0
    assert main(["generate", str(art), "--prompt", "x", "--temperature", "-1"]) == 2


@pytest.mark.parametrize("kv", [False, True])
def test_weights_dequantized_once_give_the_same_logits(tiny_llama, tiny_inputs, kv, tmp_path):
    """``weight_storage="float"`` (the reference dequantizing each packed weight once, at session
    open) leaves no ``dequantize_packed`` in the graph and gives the per-call dequantization's logits
    bit for bit: INT4 groups, NF4 (codebook) and NVFP4 (two-level scales) weights, with and without a
    (quantized) KV cache, from a saved artifact too."""
    from finegrain.formats.ops import DEQUANTIZE_PACKED

    example, _, _ = tiny_inputs
    recipe = {"name": "mixed", "rules": [{"role": "linear", "weight": "int4-g32-asym-fp16"},  # the last match wins
                                         {"role": "linear", "pattern": "q_proj|k_proj", "weight": "nf4-g16-sym-fp16"},
                                         {"role": "linear", "pattern": "mlp", "weight": "e2m1-g16-sym-e4m3"}],
              **({"kv_key": "int8-token-sym-fp32-dyn", "kv_value": "int4-g16-asym-fp16-dyn"} if kv else {})}
    cm = finegrain.compile(tiny_llama, example, recipe=recipe, progress=False, kv_cache=kv)
    assert {v["format"] for v in cm.layer_report.values()} == {"int4-g32-asym-fp16", "nf4-g16-sym-fp16",
                                                               "e2m1-g16-sym-e4m3"}
    cm.save(tmp_path / "a")
    x = example[0][:, :10]
    for c in (cm, finegrain.load(tmp_path / "a")):
        packed, once = c.session(), c.session(weight_storage="float")
        assert sum(n.target is DEQUANTIZE_PACKED for n in packed.gm.graph.nodes) >= 7 * len(tiny_llama.model.layers)
        assert not [n for n in once.gm.graph.nodes if n.target is DEQUANTIZE_PACKED]
        assert [n for n in c.gm.graph.nodes if n.target is DEQUANTIZE_PACKED]  # the artifact's graph is untouched
        if kv:
            assert sorted(once.kv_packed) == sorted(packed.kv_packed) != []
            a, b = packed.generate(x[:, :4], 6), once.generate(x[:, :4], 6)
            assert a.tokens == b.tokens
            la, sa = packed.prefill(x[:, :4])
            lb, sb = once.prefill(x[:, :4])
            assert torch.equal(la, lb) and torch.equal(packed.step(sa, x[:, 4:6])[0], once.step(sb, x[:, 4:6])[0])
        else:
            assert torch.equal(packed.run(x), once.run(x))
    with pytest.raises(InputError, match="weight_storage must be"):
        cm.session(weight_storage="fp16")
