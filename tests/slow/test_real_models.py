"""End to end on the real bundled models (marked slow; CI runs them)."""
import pytest
import torch

import finegrain
from finegrain.jobs import compile_loaded, evaluate_encoder, evaluate_lm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from finegrain.models import load_model

    return load_model("smollm2-135m")


def test_smollm2_loads_correctly(smollm2):
    """The GGUF -> HF conversion (incl. the Q/K un-permutation) gives a working model."""
    tok = smollm2.tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = smollm2.model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_smollm2_end_to_end(smollm2, tmp_path):
    fp = evaluate_lm(smollm2, smollm2.tokenizer, 512, 2, progress=False)
    assert 5 < fp["ppl"] < 60, fp
    w8 = compile_loaded(smollm2, "w8a8", samples=2, seq_len=256, progress=False)
    r8 = evaluate_lm(w8, smollm2.tokenizer, 512, 2, progress=False)
    assert r8["ppl"] < fp["ppl"] * 1.06, (fp, r8)
    w4 = compile_loaded(smollm2, "w4a16-g128", samples=2, seq_len=256, progress=False)
    r4 = evaluate_lm(w4, smollm2.tokenizer, 512, 2, progress=False)
    assert fp["ppl"] < r4["ppl"] < fp["ppl"] * 2, (fp, r4)
    # 4-bit linears: 30 layers x 7; ragged 576 = 4 x 128 + 64 counted exactly
    assert len(w4.quantized) == 210 and 4.15 < w4.quantized_bits_per_weight() < 4.2
    w4.save(tmp_path / "w4")
    back = finegrain.load(tmp_path / "w4")
    x = torch.randint(0, 49152, (1, 40))
    assert torch.equal(back(x), w4(x))


def test_minilm_w8a8_cosine(minilm):
    cm = compile_loaded(minilm, "w8a8", samples=16, seq_len=64, progress=False)
    r = evaluate_encoder(minilm, cm, n=64)
    assert r["cosine_mean"] > 0.99 and r["cosine_min"] > 0.97, r


def test_smollm2_folds_exact_on_real_text(smollm2):
    """Norm folding + QuaRot rotation + SmoothQuant on the real model and real text leave the
    floating-point logits unchanged (no quantization rules: only the folds run)."""
    from finegrain.compiler.recipe import Recipe, Rule
    from finegrain.data import wikitext2_test
    from finegrain.formats import QuantFormat

    ids = smollm2.tokenizer(wikitext2_test()[:4000], return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        ref = smollm2.model(ids).logits
    act = QuantFormat(bits=8, granularity="token", symmetric=True, scale="fp32", dynamic=True)
    # activation formats make smoothing and the online Hadamard act; only the fold passes run, so
    # the graph stays floating point
    from finegrain.compiler.capture import capture
    from finegrain.driver.pipeline import PassContext, run_passes
    from finegrain.passes.calibrate import calibrate
    from finegrain.passes.canonicalize import canonicalize
    from finegrain.passes.fold_norms import fold_norms
    from finegrain.passes.fold_rotation import fold_rotation
    from finegrain.passes.fold_smoothing import fold_smoothing

    recipe = Recipe(name="folds", rules=(Rule(role="linear", activation=act),), rotate=True, smoothing="os+")
    gm = capture(smollm2.model, (ids[:, :32],))
    ctx = PassContext(recipe=recipe, calibration=[(ids[:, :128],), (ids[:, 128:],)], show_progress=False)
    passes = [canonicalize, fold_norms, fold_rotation, calibrate, fold_smoothing]
    gm = run_passes(gm, ctx, [(p.__name__, p) for p in passes])
    actions = {(f["pass"], f["action"]) for f in ctx.report["folds"]}
    assert {("fold_norms", "folded"), ("fold_rotation", "folded"), ("fold_rotation", "online"),
            ("fold_smoothing", "folded")} <= actions
    with torch.no_grad():
        out = gm(ids)
    err = float((out - ref).abs().max() / ref.abs().max())
    assert err < 1e-4, err
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.99


@pytest.fixture(scope="module")
def smollm2_kv(smollm2):
    """The float SmolLM2 compiled with its KV cache in the graph."""
    fp = {"name": "fp32", "rules": [{"role": "linear"}]}
    return finegrain.compile(smollm2.model, (smollm2.tokenizer("a b c", return_tensors="pt").input_ids,), recipe=fp,
                             progress=False, kv_cache=True)


def test_smollm2_kv_cache_greedy_equals_transformers(smollm2, smollm2_kv):
    """#16 5(b): the float SmolLM2 compiled with its KV cache in the graph generates, greedily, the
    same 32 tokens as transformers' generate (with its own cache) for three prompts."""
    tok = smollm2.tokenizer
    cm = smollm2_kv
    for prompt in ("The capital of France is", "Once upon a time, in a small village,",
                   "def fibonacci(n):"):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            want = smollm2.model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
        got = cm.generate(ids, 32)
        want = want.tolist()  # transformers may stop early at the EOS token; finegrain was given none
        assert len(want) >= 8 and got.tokens[:len(want)] == want, prompt


def test_smollm2_massive_activation_is_the_first_token(smollm2, smollm2_kv):
    """RotateKV's attention sinks from calibration (``kv_sink_search``, the ``rotatekv4`` preset): on
    SmolLM2 the residual stream's massive activation sits at the first position of every Brown window
    (over 100x the median token's RMS; the other positions stay under 20x), so the search keeps one sink,
    the count the KIVI presets name."""
    from finegrain.compiler.capture import kv_inputs
    from finegrain.eval.perplexity import calibration_batches
    from finegrain.passes.quantize_kv import massive_positions

    batches = [kv_inputs(smollm2_kv.kv, b[0]) for b in calibration_batches(smollm2.tokenizer, 2, 256)]
    m = massive_positions(smollm2_kv.gm, batches, 16)
    assert m["refusal"] is None and m["positions"] == [0] and m["sinks"] == 1, m
    assert m["ratio"][0] > 100 and m["beyond"] == 0 and m["tokens"] == 2 * 240


def test_smollm2_passkey_survives_a_kivi4_cache_and_not_a_per_token_kv2_one(smollm2):
    """A key hidden at mid-depth of ~1,500 tokens of filler (eval/passkey.py) comes back through
    the float cache and through KIVI-4 with pre-RoPE keys and a sink; 2-bit per-token keys lose it
    (the check can fail both ways)."""
    import torch

    import finegrain
    from finegrain.eval.passkey import passkey_trial

    kivi4 = {"kv_key": "int4-g32-asym-fp16-dyn", "kv_value": "int4-g32-asym-fp16-dyn", "kv_key_axis": "tokens",
             "kv_window": 128, "kv_pre_rope": True, "kv_sinks": 1}
    kv2 = {"kv_key": "int2-g64-asym-fp16-dyn", "kv_value": "int2-g64-asym-fp16-dyn"}
    found = {}
    for name, fields in (("float", {}), ("kivi4", kivi4), ("kv2", kv2)):
        cm = finegrain.compile(smollm2.model, (torch.arange(16)[None],), recipe={"name": name, "rules": [], **fields},
                               progress=False, kv_cache=True)
        r = passkey_trial(cm.session(), smollm2.tokenizer, 1500, depth=0.5, seed=0)
        assert 1400 <= r["prompt_tokens"] <= 1600
        found[name] = r["found"]
    assert found == {"float": True, "kivi4": True, "kv2": False}, found


def test_the_fast_gguf_reader_reads_what_gguf_reads():
    """``io.gguf_file.read_gguf`` (plain views of the map) parses the bundled file as ``gguf.GGUFReader``:
    every field's value, every tensor's descriptor and bytes."""
    import gguf
    import numpy as np

    from finegrain.io.gguf_file import read_gguf
    from finegrain.models.bundled import SMOLLM2_DIST, SMOLLM2_FILE, _locate

    path = _locate(SMOLLM2_DIST, SMOLLM2_FILE)
    fast, ref = read_gguf(path), gguf.GGUFReader(str(path))
    assert list(fast.fields) == list(ref.fields) and len(fast.fields) > 20
    for name, field in ref.fields.items():
        assert fast.fields[name].types == field.types, name
        assert fast.fields[name].contents() == field.contents(), name
    assert len(fast.tensors) == len(ref.tensors) == 272
    for a, b in zip(fast.tensors, ref.tensors):
        assert (a.name, a.tensor_type, a.data_offset, a.n_bytes) == (b.name, b.tensor_type, b.data_offset, b.n_bytes)
        assert type(a.data) is np.ndarray and np.array_equal(a.data, b.data), a.name


def test_the_bundled_tokenizer_is_converted_once_then_read_from_its_cache(tmp_path, monkeypatch):
    """The first load converts SmolLM2's tokenizer from the GGUF file and saves it in ``$FINEGRAIN_CACHE``;
    the next reads that folder and tokenizes, templates and decodes exactly as the conversion; a damaged
    cache is converted again and replaced (``models.gguf_tokenizer``, every GGUF file's tokenizer)."""
    import json

    from transformers import AutoTokenizer

    from finegrain.data import wikitext2_test
    from finegrain.models import bundled, gguf_tokenizer_cache

    monkeypatch.setenv("FINEGRAIN_CACHE", str(tmp_path))
    path = bundled._locate(bundled.SMOLLM2_DIST, bundled.SMOLLM2_FILE)
    cache = gguf_tokenizer_cache(path)
    assert cache.parent == tmp_path and not cache.exists()
    bundled._smollm2_tokenizer.cache_clear()
    ref = bundled._smollm2_tokenizer()  # no cache: transformers' conversion from the GGUF header, then saved
    assert (cache / "tokenizer.json").is_file() and ref.name_or_path == str(path.parent)
    bundled._smollm2_tokenizer.cache_clear()
    calls = []
    real = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: calls.append(k) or real(*a, **k))
    tok = bundled._smollm2_tokenizer()
    assert calls == [{"local_files_only": True}]  # the cache's folder, no GGUF conversion
    text = wikitext2_test()[:20000]
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert len(tok) == len(ref) and tok(text).input_ids == ref(text).input_ids
    assert tok.apply_chat_template(chat, add_generation_prompt=True) == ref.apply_chat_template(chat, add_generation_prompt=True)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    ids = ref(text).input_ids
    assert tok.decode(ids) == ref.decode(ids)
    (cache / "tokenizer.json").write_text("{not json")
    bundled._smollm2_tokenizer.cache_clear()
    calls.clear()
    tok = bundled._smollm2_tokenizer()
    assert len(calls) == 2 and calls[1].get("gguf_file") == path.name  # the damaged cache, then the conversion
    assert tok(text).input_ids == ref(text).input_ids
    assert json.loads((cache / "tokenizer.json").read_text())["model"]["type"] == "BPE"  # replaced
    bundled._smollm2_tokenizer.cache_clear()
