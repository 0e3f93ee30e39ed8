"""Models in by every route a user has offline: the Hugging Face cache layout by ``org/name``, and
a Llama ``.gguf`` file (here one finegrain exported)."""
import pytest
import torch

import finegrain
from finegrain.errors import InputError
from finegrain.models import load_model


def _cache(tmp_path, org_name, model):
    org, name = org_name.split("/")
    root = tmp_path / "hub" / f"models--{org}--{name}"
    snap = root / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    model.save_pretrained(snap)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(snap.name)
    return tmp_path / "hub"


def test_a_model_in_the_hf_cache_loads_by_org_name(tmp_path, monkeypatch):
    from finegrain.models.tiny import tiny_llama

    model = tiny_llama(seed=4)
    monkeypatch.setenv("HF_HUB_CACHE", str(_cache(tmp_path, "someorg/tiny-llama", model)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("someorg/tiny-llama")
    assert loaded.source["hub_id"] == "someorg/tiny-llama" and "snapshots" in loaded.source["model"]
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, model(ids).logits)
    with pytest.raises(InputError, match="local Hugging Face cache"):
        load_model("someorg/not-cached")


def test_a_gguf_file_loads_and_compiles(tmp_path):
    from finegrain.models.tiny import tiny_llama

    model = tiny_llama(seed=4, hidden=128)
    ids = torch.randint(0, 256, (1, 16))
    cm = finegrain.compile(model, (ids,), recipe="w8a16", progress=False)
    cm.export_gguf(tmp_path / "m.gguf")
    loaded = load_model(str(tmp_path / "m.gguf"))
    assert loaded.source["format"] == "gguf" and loaded.tokenizer is None
    with torch.no_grad():  # Q8_0 decodes exactly to the artifact's weights
        rel = (loaded.model(ids).logits - cm(ids)).abs().max() / cm(ids).abs().max()
    assert rel <= 1e-5
    again = finegrain.compile(loaded.model, (ids,), recipe="w8a16", progress=False)
    assert len(again.quantized) == 14


def test_a_hostile_or_foreign_gguf_is_one_clear_error(tmp_path):
    import gguf

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(range(200)))
    with pytest.raises(InputError, match="not a GGUF file finegrain can load"):
        load_model(str(junk))
    odd = tmp_path / "odd.gguf"  # a llama GGUF with a tensor finegrain does not know
    w = gguf.GGUFWriter(str(odd), "llama")
    for key, val in (("embedding_length", 8), ("feed_forward_length", 8), ("block_count", 1), ("context_length", 16)):
        w.add_uint32(f"llama.{key}", val)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(4)
    w.add_tensor("blk.0.__import__('os')", torch.zeros(8, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InputError, match="is not one of the llama tensors finegrain reads"):
        load_model(str(odd))
