"""Models in by every route a user has offline: the Hugging Face cache layout by ``org/name``, a
Llama ``.gguf`` file (here one finegrain exported) and GGUF files of other families (Qwen3, Phi-3:
written here with the ``gguf`` package's own tensor-name map, read through transformers)."""
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


def test_a_gguf_file_loads_and_compiles(tmp_path, monkeypatch):
    from finegrain.models.tiny import tiny_llama

    monkeypatch.setenv("FINEGRAIN_CACHE", str(tmp_path / "cache"))

    model = tiny_llama(seed=4, hidden=128)
    ids = torch.randint(0, 256, (1, 16))
    cm = finegrain.compile(model, (ids,), recipe="w8a16", progress=False)
    cm.export_gguf(tmp_path / "m.gguf")
    loaded = load_model(str(tmp_path / "m.gguf"))
    assert loaded.source["format"] == "gguf" and loaded.tokenizer is None
    assert not (tmp_path / "cache").exists()  # no tokenizer: nothing cached
    with torch.no_grad():  # Q8_0 decodes exactly to the artifact's weights
        rel = (loaded.model(ids).logits - cm(ids)).abs().max() / cm(ids).abs().max()
    assert rel <= 1e-5
    again = finegrain.compile(loaded.model, (ids,), recipe="w8a16", progress=False)
    assert len(again.quantized) == 14


def test_a_hostile_or_foreign_gguf_is_one_clear_error(tmp_path):
    import gguf

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(range(200)))
    with pytest.raises(InputError, match="not a GGUF file finegrain can (load|read)"):
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


def _write_gguf(model, arch: str, path, meta: dict) -> None:
    """A float GGUF of a ``transformers`` model as llama.cpp's converter names it (gguf's tensor map)."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], model.config.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        getattr(w, f"add_{key}")(value)
    for key, t in model.state_dict().items():
        base, suffix = key.rsplit(".", 1)
        w.add_tensor(f"{names.get_name(base)}.{suffix}", t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # head_dim 128: transformers' GGUF config map does not read qwen3's key_length (real Qwen3 has 128)
    cfg = Qwen3Config(vocab_size=256, hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=128, max_position_embeddings=128, tie_word_embeddings=False)
    meta = dict(key_length=128, value_length=128, head_count=2, head_count_kv=1, embedding_length=128)
    return Qwen3ForCausalLM(cfg), meta


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0)
    meta = dict(head_count=4, head_count_kv=4, embedding_length=64, rope_dimension_count=16, pad_token_id=0,
                bos_token_id=1, eos_token_id=1)
    return Phi3ForCausalLM(cfg), meta


@pytest.mark.parametrize("arch, build", [("qwen3", _qwen3), ("phi3", _phi3)])
def test_gguf_of_other_families_loads_through_transformers(tmp_path, arch, build):
    """QK-norm (Qwen3) and fused qkv / gate_up (Phi-3) GGUFs: the same logits as the model written,
    then the whole CLI path (quantize) on the file."""
    torch.manual_seed(0)
    model, meta = build()
    model.eval()
    path = tmp_path / f"{arch}.gguf"
    _write_gguf(model, arch, path, dict(block_count=2, context_length=128, feed_forward_length=96,
                                        layer_norm_rms_eps=model.config.rms_norm_eps, rope_freq_base=10000.0,
                                        vocab_size=256, **meta))
    loaded = load_model(str(path))
    assert type(loaded.model) is type(model) and loaded.source["gguf_architecture"] == arch
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, model(ids).logits)
    cm = finegrain.compile(loaded.model, (ids,), recipe="w4a16-g64", progress=False)
    assert len(cm.quantized) == {"qwen3": 2 * 7, "phi3": 2 * 4}[arch]  # Phi-3: qkv, o, gate_up, down per layer


def test_a_gguf_family_transformers_cannot_read_is_named(tmp_path):
    import gguf

    path = tmp_path / "rwkv.gguf"
    w = gguf.GGUFWriter(str(path), "rwkv6")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InputError, match="GGUF architecture 'rwkv6' is not one transformers can dequantize"):
        load_model(str(path))
