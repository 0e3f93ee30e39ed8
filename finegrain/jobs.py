"""Whole jobs shared by the CLI and the benchmarks: compile a loaded model with calibration from
the vendored corpus (Brown) or the user's own text, and evaluate float or quantized models the same
way (WikiText-2 test or the user's text; ``finegrain.data.read_text`` reads files, directories and
JSON lines)."""
from __future__ import annotations

from typing import Any, Callable

import torch

from finegrain.driver.api import compile as fg_compile
from finegrain.compiler.recipe import Recipe, get_recipe
from finegrain.data import Text, brown
from finegrain.errors import InputError
from finegrain.eval.embeddings import embedding_cosine
from finegrain.eval.perplexity import calibration_batches, perplexity
from finegrain.models import LoadedModel
from finegrain.runtime.compiled import CompiledModel


def encoder_calibration(tokenizer, samples: int, seq_len: int, batch: int = 8, text: Text | None = None) -> list[tuple]:
    paras = (text or brown()).paragraphs()[: samples]
    out = []
    for i in range(0, len(paras), batch):
        enc = tokenizer(paras[i:i + batch], padding="max_length", truncation=True, max_length=seq_len,
                        return_tensors="pt")
        if enc["input_ids"].shape[0] == batch:  # one shape for every batch
            out.append((enc["input_ids"], enc["attention_mask"]))
    return out


def _tensor_calibration(loaded: LoadedModel, samples: int | None, tensors) -> tuple:
    """A tensor-input model (an image ONNX model, ...): batches from the user's safetensors file."""
    from finegrain.data import read_tensor_batches
    from finegrain.driver.api import input_names_of

    names = list(getattr(loaded.model, "input_names", None) or input_names_of(loaded.model, 1))
    if tensors is None:
        raise InputError(f"model {loaded.source.get('model')} takes tensors ({', '.join(names)}), not text: give "
                         "calibration / example inputs with --calib-tensors FILE.safetensors (calib_tensors=)")
    batches = read_tensor_batches(tensors, names)
    calib = batches[:samples] if samples else (batches if samples is None else None)
    return calib, batches[0], tuple(names)


def _calibration(loaded: LoadedModel, recipe: Recipe, samples: int | None, seq_len: int | None, seed: int,
                 text: Text | None = None, tensors=None):
    if loaded.task == "tensor":
        return _tensor_calibration(loaded, samples, tensors)
    if tensors is not None:
        raise InputError(f"model {loaded.source.get('model')} takes token ids: calibration comes from text "
                         "(--calib-text / --calib-jsonl), not --calib-tensors")
    if loaded.tokenizer is None:
        raise InputError(f"model {loaded.source.get('model')}: no tokenizer to make calibration text with (for an "
                         "ONNX file, put its tokenizer.json beside it)")
    samples = recipe.calibration_samples if samples is None else samples
    seq_len = min(recipe.calibration_seq_len if seq_len is None else seq_len, loaded.max_seq_len)
    if loaded.task == "causal-lm":
        calib = calibration_batches(loaded.tokenizer, samples, seq_len, seed, text) if samples else None
        example = calib[0] if calib else (torch.randint(0, loaded.model.config.vocab_size, (1, 16)),)
        names = ("input_ids",)
    else:
        calib = encoder_calibration(loaded.tokenizer, samples, min(seq_len, 128), text=text) if samples else None
        if samples and not calib:
            raise InputError(f"calibration text {(text or brown()).name}: fewer than 8 paragraphs for {samples} samples "
                             "(encoder calibration takes batches of 8 paragraphs)")
        example = calib[0] if calib else tuple(loaded.tokenizer(["a b", "c d e"], padding=True, return_tensors="pt")[k]
                                               for k in ("input_ids", "attention_mask"))
        names = ("input_ids", "attention_mask")
    return calib, example, names


def _source(loaded: LoadedModel, text: Text | None, samples: int | None, tensors=None) -> dict:
    """The loaded model's source record plus the calibration text (or tensor file) it was compiled with."""
    if samples == 0:
        return loaded.source
    if loaded.task == "tensor":
        from finegrain.io.files import sha256_file

        return {**loaded.source, "calibration_tensors": {"name": str(tensors), "sha256": sha256_file(tensors)}}
    return {**loaded.source, "calibration_text": (text or brown()).describe()}


def compile_loaded(loaded: LoadedModel, recipe: "str | Recipe", *, samples: int | None = None,
                   seq_len: int | None = None, seed: int = 0, progress: bool = True,
                   strict_recipe: bool = False, kv_cache: bool = False, calib_text: Text | None = None,
                   calib_tensors=None, inputs: dict | None = None, spool_dir=None) -> CompiledModel:
    """Compile a bundled / HF / ONNX model with ``samples`` x ``seq_len`` calibration tokens (recipe
    defaults; 0 samples skips calibration, allowed unless the recipe has static scales) drawn from
    ``calib_text`` (default the vendored Brown slice; recorded in the manifest's source). A model
    with tensor inputs (task ``tensor``) takes its example and calibration batches from
    ``calib_tensors`` (a safetensors file, ``data.read_tensor_batches``) and its dynamic dims from
    ``inputs`` (``finegrain.compile``). ``kv_cache``: the decoder with its KV cache in the graph. A model
    from ``load_hf_lazy`` (its weights still on disk) compiles block by block (``driver/stream.py``), its
    finished blocks' weights spooled to a file in ``spool_dir`` (default: the temporary directory)."""
    recipe = get_recipe(recipe)
    calib, example, names = _calibration(loaded, recipe, samples, seq_len, seed, calib_text, calib_tensors)
    if loaded.weights is not None:  # models/hf_dir.load_hf_lazy: weights read block by block
        from finegrain.driver.stream import compile_streamed

        if kv_cache:
            raise InputError("--kv-cache: block-by-block compilation (--stream) does not capture the KV cache")
        return compile_streamed(loaded.model, loaded.weights, example, recipe, calib, input_names=names,
                                tokenizer=loaded.tokenizer, param_names=loaded.weight_names,
                                source=_source(loaded, calib_text, 0 if calib is None else samples),
                                progress=progress, strict_recipe=strict_recipe, spool_dir=spool_dir)
    return fg_compile(loaded.model, example, recipe, calib, input_names=names, tokenizer=loaded.tokenizer,
                      source=_source(loaded, calib_text, 0 if calib is None else samples, calib_tensors),
                      progress=progress, strict_recipe=strict_recipe, kv_cache=kv_cache, inputs=inputs)


def frontier_loaded(loaded: LoadedModel, recipe: "str | Recipe", *, points: int = 4,
                    budgets_bits: list[float] | None = None, validate: int = 0, samples: int | None = None,
                    seq_len: int | None = None, seed: int = 0, progress: bool = True, strict_recipe: bool = False,
                    calib_text: Text | None = None):
    """``compile_frontier`` on a bundled / HF model (see ``finegrain.driver.api``)."""
    from finegrain.driver.api import compile_frontier

    recipe = get_recipe(recipe)
    calib, example, names = _calibration(loaded, recipe, samples, seq_len, seed, calib_text)
    return compile_frontier(loaded.model, example, recipe, calib, budgets_bits, points, validate=validate,
                            input_names=names, tokenizer=loaded.tokenizer,
                            source=_source(loaded, calib_text, 0 if calib is None else samples), progress=progress,
                            strict_recipe=strict_recipe)


def logits_fn(obj: "LoadedModel | CompiledModel | Callable"):
    """ids -> logits for a loaded float model, a CompiledModel, or any such callable (a backend
    session's ``run``)."""
    if isinstance(obj, CompiledModel) or not hasattr(obj, "model"):
        return obj
    model = obj.model
    return lambda ids: model(input_ids=ids, use_cache=False).logits


def encode_fn(obj: "LoadedModel | CompiledModel"):
    if isinstance(obj, CompiledModel):
        return obj
    model = obj.model
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask).last_hidden_state


def evaluate_lm(obj: "LoadedModel | CompiledModel", tokenizer, seq_len: int, max_windows: int | None,
                progress: bool = True, first_window: int = 0, text: Text | None = None) -> dict[str, Any]:
    """Perplexity over ``text`` (default WikiText-2 test); see ``eval.perplexity``."""
    return perplexity(logits_fn(obj), tokenizer, seq_len, max_windows, progress, first_window, text).to_dict()


# KIVI + RotateKV's pre-RoPE keys, a sink and the Hadamard rotation, K and V bits from KV_TUNE_BITS (SmolLM2,
# 3.25 average bits: KVTuner +1.78% with {2, 3, 4, 8}, +5.6% with {2, 4, 8}; README, "Quantized KV cache")
KV_TUNE_FIELDS = {"kv_key_axis": "tokens", "kv_window": 128, "kv_pre_rope": True, "kv_sinks": 1, "kv_rotate": True}
KV_TUNE_BITS = (2, 3, 4, 8)


def _kv_search(loaded: LoadedModel, kv_samples: int, kv_seq_len: int, bits: tuple[int, ...], objective: str,
               progress: bool, calib_text: Text | None):
    """KVTuner's per-layer sensitivity of the (K bits, V bits) pairs in ``bits``^2 (KIVI settings,
    ``KV_TUNE_FIELDS``) and its record (pairs, errors, objective, seconds, calibration)."""
    import math
    import time

    from finegrain.compiler.capture import kv_layout, kv_widths_differ
    from finegrain.driver.kv_tune import kv_sensitivity

    layout = kv_layout(loaded.model)
    if kv_widths_differ(layout):
        raise InputError(f"{type(loaded.model).__name__} caches keys and values of different shapes (MLA): the KV "
                         "search quantizes a cache of keys and values per head, which it does not have")
    head_dim = layout["head_dim"]  # what the model's cache really holds
    key_fmt, value_fmt = "int{}-g32-asym-fp16-dyn", f"int{{}}-g{math.gcd(32, head_dim)}-asym-fp16-dyn"
    pairs = [(key_fmt.format(k), value_fmt.format(v)) for k in bits for v in bits]
    calib = [b[0] for b in calibration_batches(loaded.tokenizer, kv_samples, kv_seq_len, text=calib_text)]
    t = time.perf_counter()
    sens = kv_sensitivity(loaded.model, calib, KV_TUNE_FIELDS, pairs, progress=progress, objective=objective)
    return sens, {"pairs": pairs, "errors": sens.errors, "objective": objective,
                  "seconds": round(time.perf_counter() - t, 1), "calibration": f"{kv_samples} x {kv_seq_len}"}


def kv_frontier_loaded(loaded: LoadedModel, recipe: "str | Recipe", budgets: list[float], *, kv_samples: int = 4,
                       kv_seq_len: int = 512, bits: tuple[int, ...] = KV_TUNE_BITS, objective: str = "attention",
                       samples: int | None = None, seq_len: int | None = None, progress: bool = True,
                       strict_recipe: bool = False, calib_text: Text | None = None) -> tuple[dict, list]:
    """KVTuner on a causal LM (``driver/kv_tune.py``): per layer and (K bits, V bits) pair in
    ``bits``^2 the sensitivity on ``kv_samples`` x ``kv_seq_len`` calibration tokens (the float model),
    then per average-bits budget the layer-wise pairs, compiled with ``recipe``'s weights and a KV
    cache (KIVI settings: keys per channel over 32-token groups, values per token in head-dim groups
    of up to 32, 128 newest tokens in float, pre-RoPE keys, one sink). Returns (the search: pairs,
    errors, seconds) and ``[(budget, allocation summary, CompiledModel)]``."""
    import dataclasses

    from finegrain.driver.kv_tune import kv_allocate

    sens, search = _kv_search(loaded, kv_samples, kv_seq_len, bits, objective, progress, calib_text)
    base = get_recipe(recipe)
    points = []
    for budget in budgets:
        layers, info = kv_allocate(sens, budget)
        r = dataclasses.replace(base, name=f"{base.name}-kv{budget:g}", **KV_TUNE_FIELDS, kv_layers=tuple(map(tuple, layers)))
        cm = compile_loaded(loaded, r, samples=samples, seq_len=seq_len, progress=progress, strict_recipe=strict_recipe,
                            kv_cache=True, calib_text=calib_text)
        points.append((budget, info, cm))
    return search, points


def joint_frontier_loaded(loaded: LoadedModel, recipe: "str | Recipe", budgets_bytes: list[int], context: int, *,
                          kv_samples: int = 4, kv_seq_len: int = 512, bits: tuple[int, ...] = KV_TUNE_BITS,
                          samples: int | None = None, seq_len: int | None = None, progress: bool = True,
                          strict_recipe: bool = False, calib_text: Text | None = None) -> tuple[dict, Any, list]:
    """KVTuner jointly with the weights under one byte budget (``driver.api.compile_joint``): the
    per-layer (K, V) loss sensitivity as :func:`kv_frontier_loaded` measures it (``objective="loss"``),
    the recipe's ``weight_candidates`` with the Fisher sensitivity (also predicted nats), and per total
    in ``budgets_bytes`` (stored weights + the cache at ``context`` tokens) one KV-cache artifact.
    Returns (the KV search record, the JointAllocation, ``[(summary, CompiledModel)]``)."""
    import dataclasses

    from finegrain.driver.api import compile_joint

    base = get_recipe(recipe)
    if not base.weight_candidates:
        raise InputError(f"recipe {base.name!r} has no weight_candidates: the joint budget allocates weight formats "
                         "and KV bits together (give candidates, e.g. --candidates)")
    if base.sensitivity not in ("fisher", "auto"):
        raise InputError(f"recipe {base.name!r}: sensitivity {base.sensitivity!r} is not in nats; the joint budget "
                         "trades predicted loss between weights and cache (sensitivity: fisher)")
    base = dataclasses.replace(base, sensitivity="fisher")
    sens, search = _kv_search(loaded, kv_samples, kv_seq_len, bits, "loss", progress, calib_text)
    calib, example, names = _calibration(loaded, base, samples, seq_len, 0, calib_text, None)
    joint, points = compile_joint(loaded.model, example, base, calib, sens, KV_TUNE_FIELDS, context, budgets_bytes,
                                  tokenizer=loaded.tokenizer, progress=progress, strict_recipe=strict_recipe,
                                  source=_source(loaded, calib_text, 0 if calib is None else samples))
    return search, joint, points


def evaluate_tensors(fp: LoadedModel, q, batches: list[tuple]) -> dict[str, Any]:
    """A tensor-input model, float vs quantized, on the user's batches: the outputs' relative error
    (||q - fp|| / ||fp|| over everything), mean cosine per sample, and top-1 agreement (argmax of the
    last dim) where the output is a score vector."""
    num = den = 0.0
    cos, agree, n = [], 0, 0
    with torch.inference_mode():
        for b in batches:
            a = fp.model(*b)
            z = q(*b)
            a, z = (t[0] if isinstance(t, (tuple, list)) else t for t in (a, z))
            a, z = a.float(), z.float()
            num += float((z - a).pow(2).sum())
            den += float(a.pow(2).sum())
            cos += torch.nn.functional.cosine_similarity(z.reshape(z.shape[0], -1), a.reshape(a.shape[0], -1)).tolist()
            agree += int((z.argmax(-1) == a.argmax(-1)).sum())
            n += a[..., 0].numel()
    return {"batches": len(batches), "rel_error": (num / den) ** 0.5 if den else float("nan"),
            "cosine_mean": sum(cos) / len(cos), "top1_agreement": agree / n if n else float("nan")}


def evaluate_encoder(fp: LoadedModel, q: CompiledModel, n: int = 256, text: Text | None = None) -> dict[str, Any]:
    return embedding_cosine(encode_fn(fp), encode_fn(q), fp.tokenizer, n, text)


def chat_side_by_side(loaded: LoadedModel, cm: CompiledModel, prompt: str, max_new_tokens: int,
                      session=None) -> list[dict]:
    """The float model (transformers ``generate``, with its KV cache) and the quantized one
    (``session.generate``, default the reference backend's, over its KV cache when compiled with
    one) answering one chat prompt greedily:
    per model the answer, tokens and tokens/s. Empty when the tokenizer has no chat template."""
    import time

    tok = loaded.tokenizer
    if tok is None or not getattr(tok, "chat_template", None) or max_new_tokens <= 0:
        return []
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    eos = [t for t in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
           if isinstance(t, int) and t >= 0 and t != tok.unk_token_id]
    t0 = time.perf_counter()
    with torch.no_grad():
        out = loaded.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos or None,
                                    pad_token_id=eos[0] if eos else 0)
    fp_s = time.perf_counter() - t0
    fp_tokens = out[0, ids.shape[1]:].tolist()
    g = (session or cm.session()).generate(ids, max_new_tokens, eos_token_id=eos or None)
    q_s = g.prefill_seconds + g.decode_seconds
    return [{"model": "fp32 (transformers, KV cache)", "answer": tok.decode(fp_tokens, skip_special_tokens=True),
             "tokens": len(fp_tokens), "tokens_per_s": len(fp_tokens) / fp_s},
            {"model": f"{cm.recipe.name} (finegrain, {getattr(session, 'backend', 'torch')} backend, "
                      f"{'KV cache' if cm.kv else 'no KV cache'})",
             "answer": tok.decode(g.tokens, skip_special_tokens=True), "tokens": len(g.tokens),
             "tokens_per_s": len(g.tokens) / q_s if q_s > 0 else float("nan")}]

