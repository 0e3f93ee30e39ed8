"""The KV cache quantized on write (passes/quantize_kv.py): the Hadamard rotation of keys and values
is exact without quantization; quantized caches give the same logits through the cache path
(prefill + decode) as in one full-sequence forward; fewer bits, larger error; bytes per token are
counted; a recipe that quantizes the cache without the cache in the graph, or with groups that
do not divide the head dim, is refused before any work; bad recipe fields are named."""
import pytest
import torch

import finegrain
from finegrain.errors import InputError, RecipeError
from finegrain.formats.ops import QUANTIZE
from finegrain.compiler.ops import HADAMARD
from tests.test_kv_cache import _family, _incremental, _rel


def _kv(key=None, value=None, rotate=False):
    return {"name": "kv", "rules": [], "kv_key": key, "kv_value": value, "kv_rotate": rotate}


@pytest.fixture(scope="module")
def llama():
    return _family("llama")  # GQA: 4 query heads over 2 K / V heads, head dim 16


X = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
IDS = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))


def test_rotation_alone_is_exact_and_puts_three_hadamards_per_layer(llama):
    cm = finegrain.compile(llama, (IDS,), recipe=_kv(rotate=True), progress=False, kv_cache=True)
    with torch.no_grad():
        ref = llama(X).logits
    assert _rel(ref, cm(X)) <= 1e-5
    inc, _ = _incremental(cm, X, prefill=5)
    assert _rel(ref, inc) <= 1e-4
    assert sum(n.target is HADAMARD for n in cm.gm.graph.nodes) == 4 * 2  # k, v, q, output per layer
    assert cm.kv["quantization"]["rotate"] is True
    assert any(f["pass"] == "quantize_kv" and "Hadamard" in f["detail"] for f in cm.folds)


def test_quantized_cache_path_equals_the_full_forward_and_bits_order_the_error(llama, tmp_path):
    with torch.no_grad():
        ref = llama(X).logits
    errs = {}
    for bits in (8, 4, 2):
        fmt = "int8-token-sym-fp32-dyn" if bits == 8 else f"int{bits}-g16-asym-fp16-dyn"
        cm = finegrain.compile(llama, (IDS,), recipe=_kv(fmt, fmt), progress=False, kv_cache=True)
        assert sum(n.target is QUANTIZE for n in cm.gm.graph.nodes) == 4  # one per present
        full = cm(X)
        inc, _ = _incremental(cm, X, prefill=5)
        assert _rel(full, inc) <= 1e-4  # every token quantized once, on write, either way
        errs[bits] = _rel(ref, full)
        q = cm.kv["quantization"]
        per_head = 16 * bits / 8 + (4 if bits == 8 else 2 + bits / 8)  # codes + one scale (+ zero) per group of 16
        assert q["bytes_per_token"] == pytest.approx(2 * 2 * 2 * per_head)  # layers x kv heads x (K, V)
        assert q["fp32_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert 0 < errs[8] < errs[4] < errs[2], errs
    cm.save(tmp_path / "art")
    back = finegrain.load(tmp_path / "art")
    assert back.kv == cm.kv and _rel(cm(X), back(X)) == 0


def test_keys_only_leave_values_in_float(llama):
    cm = finegrain.compile(llama, (IDS,), recipe=_kv("int4-g16-asym-fp16-dyn"), progress=False, kv_cache=True)
    quantized = [n.args[0] for n in cm.gm.graph.nodes if n.target is QUANTIZE]
    assert len(quantized) == 2 and cm.kv["quantization"]["value"] is None


def test_refusals(llama):
    with pytest.raises(InputError, match="kv_cache=True"):
        finegrain.compile(llama, (IDS,), recipe=_kv("int4-g16-asym-fp16-dyn"), progress=False)
    with pytest.raises(InputError, match="do not divide the head dim 16"):
        finegrain.compile(llama, (IDS,), recipe=_kv("int4-g32-asym-fp16-dyn"), progress=False, kv_cache=True)
    with pytest.raises(RecipeError, match="kv_value"):
        finegrain.compile(llama, (IDS,), recipe=_kv(value="int4-g16-asym-fp16"), progress=False, kv_cache=True)
    with pytest.raises(RecipeError, match="kv_rotate"):
        finegrain.compile(llama, (IDS,), recipe=_kv(rotate="yes"), progress=False, kv_cache=True)
