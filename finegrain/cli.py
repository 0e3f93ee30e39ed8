"""finegrain command line: demo | quantize | pareto | eval | generate | export | build | inspect | backends |
presets.

Strings read from files (layer names, recipe names, error messages quoting them) are printed with
control characters escaped and without rich markup, so an artifact cannot drive the terminal.
Errors are one line on stderr with exit status 2 (``--debug`` shows the traceback)."""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
from pathlib import Path

from finegrain.errors import FinegrainError, InputError

DEMO_OUT = "out/demo"


def safe_text(x: object, keep: str = " ") -> str:
    """``x`` as text with control and format characters (ANSI escapes, bidi overrides) escaped;
    ``keep``: whitespace characters left as they are."""
    s = str(x)
    if all(c.isprintable() or c in keep for c in s):
        return s
    return "".join(c if c.isprintable() or c in keep else
                   (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}") for c in s)


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160, highlight=False)  # pipes and logs get full rows


def _say(text: str, style: str | None = None) -> None:
    """Print ``text`` literally (no markup), control characters escaped."""
    _console().print(safe_text(text), markup=False, style=style)


def _table(title: str | None, columns: list[str], rows: list[list]) -> None:
    from rich.table import Table
    from rich.text import Text

    t = Table(title=Text(safe_text(title)) if title else None)
    for c in columns:
        t.add_column(Text(safe_text(c)), justify="left" if c in ("recipe", "layer", "format", "model", "answer") else "right")
    for r in rows:
        t.add_row(*[Text(safe_text(x)) for x in r])
    _console().print(t)


def _folds_summary(folds: list[dict]) -> None:
    """Per fold pass: how many sites were folded / kept / refused, and every refusal with its reason
    (the same records are in the manifest's ``folds``)."""
    counts: dict[str, dict[str, int]] = {}
    for f in folds:  # a record covering several sites (quantize_kv's one for all presents) says how many
        n = f.get("sites", 1)
        counts.setdefault(f["pass"], {}).setdefault(f["action"], 0)
        counts[f["pass"]][f["action"]] += n if isinstance(n, int) and n > 0 else 1
    for name, c in counts.items():
        _say(f"{name}: " + ", ".join(f"{v} {k}" for k, v in sorted(c.items())))
    for f in folds:
        if f["action"] == "refused":
            _say(f"  refused {f['pass']} at {f['site']}: {f['detail']}", style="yellow")


def _warn(warnings: list[str]) -> None:
    for w in warnings:
        _say(f"warning: {w} (--strict makes this an error)", style="yellow")


def _writable_parent(path: Path) -> None:
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {path}: {parent} is not a writable directory")


def check_output_dir(path: str | Path, overwrite: bool, results: bool = False) -> None:
    """Before any work: ``path`` can be created (or, with ``overwrite``, replaced: only a finegrain
    artifact / deployment or an empty directory). ``results``: a directory of results the command
    writes into (pareto), which may exist with ``overwrite`` whatever it holds of finegrain's."""
    from finegrain.io.files import check_replaceable

    path = Path(path)
    if results and path.is_dir() and overwrite and not path.is_symlink():
        if not os.access(path, os.W_OK | os.X_OK):
            raise InputError(f"cannot write into {path}: not writable")
        return
    check_replaceable(path, overwrite)
    _writable_parent(path)


def check_output_file(path: str | Path | None, overwrite: bool = True) -> None:
    """Before any work: ``path`` is a file that can be written (not a directory)."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a directory")
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists; pass --overwrite to replace it")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"cannot write {path}: not writable")
    _writable_parent(path)


def _texts(args) -> tuple:
    """(calibration text, evaluation text) from --calib-text / --calib-jsonl / --eval-text /
    --eval-jsonl (None: the bundled defaults), read before any slow work so a bad file fails first."""
    from finegrain.data import read_text

    field = getattr(args, "jsonl_field", "text")

    def one(kind: str):
        path, jsonl = getattr(args, f"{kind}_text", None), getattr(args, f"{kind}_jsonl", None)
        if path:
            return read_text(path)
        return read_text(jsonl, jsonl_field=field) if jsonl else None

    return one("calib"), one("eval")


def _chat_calib(args, lm, calib_text, default: bool = False):
    """``--calib-chat``: the calibration text rendered in the model's chat template
    (``data.chat_text``); ``default`` where the flag is not given (the demo: on for a model with one)."""
    on = default if getattr(args, "calib_chat", None) is None else args.calib_chat
    if not on:
        return calib_text
    if lm.task != "causal-lm":
        raise InputError(f"--calib-chat: {args.model} is a {lm.task} model; chat calibration is for causal LMs")
    from finegrain.data import brown, chat_text

    return chat_text(calib_text or brown(), lm.tokenizer)


def _ppl_title(text, seq_len: int) -> str:
    return f"{'WikiText-2 test' if text is None else text.name} perplexity, seq {seq_len}"


def _ppl_rows(results: list[tuple[str, dict, float | None, int]]) -> list[list]:
    fp = results[0][1]["ppl"] if results[0][0].startswith("fp32") else None  # no float row: no Δ
    return [[name, f"{r['ppl']:.3f}", f"{100 * (r['ppl'] / fp - 1):+.2f}%" if fp else "-",
             f"{bpw:.3f}" if bpw else "32 (fp32)",
             f"{nbytes / 1e6:.1f}", f"{r['windows']}/{r['windows_available']}", f"{r['seconds']:.0f}"]
            for name, r, bpw, nbytes in results]


PPL_COLUMNS = ["model", "ppl", "Δ vs FP", "bits/weight", "MB", "windows", "eval s"]


def cmd_demo(args) -> None:
    from finegrain.data import brown
    from finegrain.eval.size import fp_bytes
    from finegrain.jobs import chat_side_by_side, compile_loaded, evaluate_lm
    from finegrain.models import load_model

    check_output_dir(args.out, overwrite=True)
    calib_text, eval_text = _texts(args)
    _say(f"finegrain demo: {args.model}, recipe {args.recipe}, {'WikiText-2 test' if eval_text is None else eval_text.name} "
         f"seq {args.seq_len}, "
         f"{'all' if not args.max_windows else args.max_windows} windows", style="bold")
    lm = load_model(args.model)
    if lm.task != "causal-lm":
        raise FinegrainError(f"demo needs a causal LM; {args.model} is an {lm.task}")
    calib_text = _chat_calib(args, lm, calib_text, default=bool(getattr(lm.tokenizer, "chat_template", None)))
    _say(f"calibration text: {(calib_text or brown()).name}")
    cm = compile_loaded(lm, args.recipe, samples=args.calibration_samples, seq_len=args.calibration_seq_len,
                        strict_recipe=args.strict, kv_cache=True,  # the chat answer decodes over the cache
                        calib_text=calib_text)
    _warn(cm.warnings)
    _say(f"compiled in {cm.timings['total']:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in cm.timings.items() if k != 'total')})")
    path = cm.save(args.out, overwrite=True)
    fp = evaluate_lm(lm, lm.tokenizer, args.seq_len, args.max_windows, text=eval_text)
    session = _fastest_session(cm, max(args.seq_len, 512), args.backend)
    with session:
        q = evaluate_lm(session.run, lm.tokenizer, args.seq_len, args.max_windows, text=eval_text)
        _table(f"{args.model}: FP vs {args.recipe}", PPL_COLUMNS,
               _ppl_rows([("fp32", fp, None, fp_bytes(lm.model)),
                          (f"{args.recipe} ({session.backend})", q, cm.quantized_bits_per_weight(), cm.model_bytes())]))
        rows = chat_side_by_side(lm, cm, args.chat_prompt, args.chat_tokens, session=session)
    if rows:
        _table(f"{args.chat_prompt!r}: FP vs {args.recipe}, greedy (model size {cm.model_bytes() / fp_bytes(lm.model):.2f}x "
               "of fp32)", ["model", "answer", "tokens", "tokens/s"],
               [[r["model"], r["answer"].strip(), r["tokens"], f"{r['tokens_per_s']:.1f}"] for r in rows])
    _say(f"artifact saved to {path}/ — try: finegrain inspect {path}; finegrain generate {path} --chat --prompt ...")


def _fastest_session(cm, max_seq_len: int, backend: str):
    """The demo's session for the quantized model: ``auto`` = a TVM build for this CPU when TVM is
    installed and takes the graph (decode over the cache several times faster than the reference
    backend, which dequantizes every weight at every step), else the reference backend."""
    import time

    from finegrain.backends import registry

    if backend == "auto":
        tvm = registry.get("tvm")
        why = tvm.available() or "; ".join(str(r) for r in tvm.check(cm))
        if why:
            _say(f"evaluating on the reference backend (TVM: {why})")
            backend = "torch"
        else:
            backend = "tvm"
    if backend == "torch":
        return cm.session()
    t0 = time.perf_counter()
    s = cm.session(backend, **({"max_seq_len": max_seq_len} if backend == "tvm" else {}))
    _say(f"built a {backend} session for {cm.recipe.name} in {time.perf_counter() - t0:.1f} s")
    return s


def cmd_quantize(args) -> None:
    from finegrain.jobs import compile_loaded
    from finegrain.models import load_model

    check_output_dir(args.out, args.overwrite)  # fail before the slow part
    recipe = _with_budget(args)
    if args.kv_quant:
        from finegrain.compiler.recipe import with_kv

        recipe, args.kv_cache = with_kv(recipe, args.kv_quant), True
    calib_text, _ = _texts(args)
    inputs = _parse_inputs(args.input)
    if args.stream:
        from finegrain.models import load_model_lazy

        lm = load_model_lazy(args.model)
    else:
        lm = load_model(args.model)
    calib_text = _chat_calib(args, lm, calib_text)
    cm = compile_loaded(lm, recipe, samples=args.calibration_samples, seq_len=args.calibration_seq_len,
                        strict_recipe=args.strict, kv_cache=args.kv_cache, calib_text=calib_text,
                        calib_tensors=args.calib_tensors, inputs=inputs,
                        spool_dir=Path(args.out).resolve().parent if args.stream else None)
    path = cm.save(args.out, overwrite=args.overwrite)
    if cm.allocation.get("chosen"):
        ch = cm.allocation["chosen"]
        _say(f"bit allocation ({cm.allocation['sensitivity']} sensitivity, {cm.allocation['groups']} groups, "
             f"solver {cm.allocation['solver_seconds']:.3f} s): {ch['bits_per_weight']:.3f} bits/weight, "
             f"predicted {ch['predicted']:.4g}")
    bpw = cm.quantized_bits_per_weight()
    kvq = (getattr(cm, "kv", None) or {}).get("quantization")
    _say(f"{args.model} -> {path}/ with {args.recipe}: {len(cm.quantized)} quantized tensors, "
         f"{bpw:.3f} bits/weight, {cm.model_bytes() / 1e6:.1f} MB, compiled in {cm.timings['total']:.1f} s"
         if bpw else f"{args.model} -> {path}/ (no weight quantized by {args.recipe}"
         + ("; the KV cache is" if kvq else "") + ")")
    if kvq:
        at = kvq.get("bytes_per_token_at_context")
        _say(f"KV cache: {_kv_formats(kvq)}, "
             + (f"{at:.0f} bytes per token at a {kvq['context']}-token context" if at else
                f"{kvq['bytes_per_token']:.0f} bytes per token") + f" (fp32: {kvq['fp32_bytes_per_token']:.0f})")
    _folds_summary(cm.folds)
    _warn(cm.warnings)


def _parse_inputs(specs: list[str] | None) -> dict | None:
    """``--input image:3=width,2=height`` (repeatable) -> ``{"image": {"dynamic": {3: "width", 2:
    "height"}}}``; ``--input image:3`` labels the dim ``image_3``; ``--input image`` declares it static."""
    if not specs:
        return None
    out: dict = {}
    for spec in specs:
        name, _, dims = spec.partition(":")
        if not name.isidentifier():
            raise InputError(f"--input {spec!r}: expected NAME[:DIM[=LABEL],...], e.g. image:3=width")
        dyn = {}
        for part in filter(None, dims.split(",")):
            d, _, label = part.partition("=")
            if not d.strip().lstrip("-").isdigit():
                raise InputError(f"--input {spec!r}: {d!r} is not a dim index (e.g. image:3=width)")
            dyn[int(d)] = label.strip() or f"{name}_{int(d)}"
        out[name] = {"dynamic": dyn}
    return out


def _parse_size(text: str, what: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*(bpw|b|kb|mb|gb|kib|mib|gib)?\s*", text.lower())
    if not m:
        raise InputError(f"{what}={text!r}: expected a number with an optional unit (e.g. 3.25bpw, 80MB)")
    mult = {None: 1, "bpw": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
    return float(m.group(1)) * mult[m.group(2)]


def _with_budget(args, allocate: bool = False):
    """The recipe, with --budget / --budget-bytes / --candidates applied (``allocate``: always
    with candidates, the default palette if neither the recipe nor the command line has any)."""
    import dataclasses

    from finegrain.compiler.recipe import DEFAULT_CANDIDATES, get_recipe

    recipe = get_recipe(args.recipe)
    budget, budget_bytes, cands = (getattr(args, k, None) for k in ("budget", "budget_bytes", "candidates"))
    if budget is None and budget_bytes is None and not cands and (recipe.weight_candidates or not allocate):
        return recipe
    if budget is not None and budget_bytes is not None:
        raise InputError("--budget and --budget-bytes: give one of them")
    if budget is not None and budget.lower().rstrip().endswith(("kb", "mb", "gb", "kib", "mib", "gib")):
        raise InputError(f"--budget={budget!r} is in bits per weight (e.g. 3.25bpw); use --budget-bytes for sizes")
    try:
        return dataclasses.replace(
            recipe, weight_candidates=tuple(cands or recipe.weight_candidates or DEFAULT_CANDIDATES),
            budget_bits=_parse_size(budget, "--budget") if budget is not None else None,
            budget_bytes=int(_parse_size(budget_bytes, "--budget-bytes")) if budget_bytes is not None else None)
    except ValueError as e:
        raise InputError(f"recipe {recipe.name!r} with the command-line budget: {e}") from None


def _kv_point(cm, lm, args, eval_text, path: Path, fp: dict) -> dict:
    """Save one ``pareto --kv`` artifact to ``path``; its perplexity through the cache (prefill in
    chunks of ``--kv-chunk``) against float ``fp`` and the K / V bits of each layer."""
    from finegrain.eval.perplexity import cache_path_logits, perplexity
    from finegrain.formats import QuantFormat

    res = perplexity(cache_path_logits(cm.session(), args.kv_chunk), lm.tokenizer, args.seq_len, args.max_windows,
                     text=eval_text).to_dict()
    cm.save(path, overwrite=args.overwrite)
    bits = [[layer, QuantFormat.parse(k).bits, QuantFormat.parse(v).bits] for layer, k, v in cm.kv["quantization"]["layers"]]
    return {"artifact": str(path), "ppl_cache_path": res["ppl"], "delta_pct": 100 * (res["ppl"] / fp["ppl"] - 1),
            "kv_bits": bits}


def _format_counts(formats: dict) -> dict[str, int]:
    """How many allocated weights got each format (an allocation's ``chosen["formats"]``)."""
    counts: dict[str, int] = {}
    for tag in formats.values():
        counts[tag] = counts.get(tag, 0) + 1
    return counts


def _write_pareto(out: Path, summary: dict, lines: list[str]) -> None:
    from finegrain.io.files import atomic_write_text

    atomic_write_text(out / "pareto.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out / "pareto.md", "\n".join(lines) + "\n")
    for line in lines:
        _say(line)


def _bit_widths(text: str) -> tuple[int, ...]:
    """``--kv-bits 2,3,4,8``: distinct integer widths in 2..8."""
    try:
        bits = tuple(sorted({int(b) for b in text.split(",") if b.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bit widths like 2,3,4,8, got {text!r}") from None
    if not bits or not all(2 <= b <= 8 for b in bits):
        raise argparse.ArgumentTypeError(f"bit widths must be integers in 2..8, got {text!r}")
    return bits


def _kv_bits(args) -> dict:
    return {} if args.kv_bits is None else {"bits": args.kv_bits}


def _pareto_kv(args, out: Path) -> None:
    """``pareto --kv``: KVTuner's layer-wise (K, V) bits at each average-bits budget, one artifact per
    budget, perplexity through the cache, and the bits per layer."""
    from finegrain.jobs import evaluate_lm, kv_frontier_loaded
    from finegrain.models import load_model

    if args.joint_context:
        return _pareto_joint(args, out)
    if args.candidates or args.points != 4:
        raise InputError("pareto --kv allocates KV cache bits: --candidates / --points are for weights (give --budgets, "
                         "average KV bits)")
    budgets = [float(_parse_size(b, "--budgets")) for b in (args.budgets or ["2.5", "3", "3.25", "4"])]
    calib_text, eval_text = _texts(args)
    lm = load_model(args.model)
    if lm.task != "causal-lm":
        raise InputError(f"pareto --kv evaluates perplexity through the KV cache: {args.model} is not a causal LM")
    calib_text = _chat_calib(args, lm, calib_text)
    search, points = kv_frontier_loaded(lm, args.recipe, budgets, kv_samples=args.kv_samples, **_kv_bits(args),
                                        objective=args.kv_objective, samples=args.calibration_samples,
                                        seq_len=args.calibration_seq_len, strict_recipe=args.strict,
                                        calib_text=calib_text)
    fp = evaluate_lm(lm, lm.tokenizer, args.seq_len, args.max_windows, text=eval_text)
    rows = []
    for budget, info, cm in points:
        q = cm.kv["quantization"]
        point = _kv_point(cm, lm, args, eval_text, out / f"kv{budget:g}bits", fp)
        rows.append({"artifact": point.pop("artifact"), "budget_bits": budget, "average_bits": info["average_bits"],
                     "predicted_error": info["predicted_error"], "bytes_per_token": q["bytes_per_token_at_context"],
                     "fp32_bytes_per_token": q["fp32_bytes_per_token"], **point})
    summary = {"recipe": args.recipe, "fp": fp, "search": search, "points": rows, "chunk": args.kv_chunk}
    lines = [f"# KV cache bits per layer: {lm.source.get('model', args.model)}, weights {args.recipe}", "",
             f"KVTuner search: {search['objective']} sensitivity, {search['calibration']} calibration tokens, "
             f"{len(search['pairs'])} (K, V) pairs per layer, {search['seconds']} s. Perplexity through the cache "
             f"(prefill in chunks of {args.kv_chunk}) on {fp['windows']} windows of {args.seq_len}; float "
             f"{fp['ppl']:.3f}.", "",
             "| budget (avg bits) | used | bytes / token (ctx 2048; fp32 " + f"{rows[0]['fp32_bytes_per_token'] if rows else 0}) "
             "| ppl through the cache | vs float | K / V bits per layer |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['budget_bits']:g} | {r['average_bits']:.2f} | {r['bytes_per_token']:.0f} | "
                     f"{r['ppl_cache_path']:.3f} | {r['delta_pct']:+.2f}% | "
                     + " ".join(f"K{k}V{v}" for _, k, v in r["kv_bits"]) + " |")
    _write_pareto(out, summary, lines)


def _pareto_joint(args, out: Path) -> None:
    """``pareto --kv --joint-context N``: weight formats and KV bits per layer under one byte budget each
    (stored weights + the cache at N tokens), one artifact per budget, perplexity through the cache."""
    from finegrain.jobs import evaluate_lm, joint_frontier_loaded
    from finegrain.models import load_model

    if not args.budgets or args.points != 4:
        raise InputError("pareto --kv --joint-context: give --budgets as total sizes (weights + KV cache), e.g. 120MB")
    budgets = [int(_parse_size(b, "--budgets")) for b in args.budgets]
    recipe = _with_budget(args, allocate=True)
    calib_text, eval_text = _texts(args)
    lm = load_model(args.model)
    if lm.task != "causal-lm":
        raise InputError(f"pareto --kv evaluates perplexity through the KV cache: {args.model} is not a causal LM")
    calib_text = _chat_calib(args, lm, calib_text)
    search, joint, points = joint_frontier_loaded(lm, recipe, budgets, args.joint_context, **_kv_bits(args),
                                                  kv_samples=args.kv_samples,
                                                  samples=args.calibration_samples, seq_len=args.calibration_seq_len,
                                                  strict_recipe=args.strict, calib_text=calib_text)
    fp = evaluate_lm(lm, lm.tokenizer, args.seq_len, args.max_windows, text=eval_text)
    rows = []
    for info, cm in points:
        point = _kv_point(cm, lm, args, eval_text, out / f"joint{info['budget_bytes'] / 1e6:g}MB", fp)
        chosen = cm.allocation["chosen"]
        rows.append({"artifact": point.pop("artifact"), **info, "bits_per_weight": chosen["bits_per_weight"],
                     "weight_formats": _format_counts(chosen["formats"]), **point})
    summary = {"recipe": recipe.to_dict(), "fp": fp, "search": search, "points": rows, "chunk": args.kv_chunk,
               "context": args.joint_context, "range_bytes": [joint.min_bytes, joint.max_bytes]}
    lines = [f"# Weights + KV cache under one byte budget: {lm.source.get('model', args.model)}, context "
             f"{args.joint_context} tokens", "",
             f"Weight candidates {', '.join(recipe.weight_candidates)} (Fisher-predicted loss); KV (K, V) pairs per layer "
             f"by measured loss ({search['calibration']} tokens, {search['seconds']} s); one knapsack over both. "
             f"Perplexity through the cache (chunks of {args.kv_chunk}) on {fp['windows']} windows of {args.seq_len}; "
             f"float {fp['ppl']:.3f}.", "",
             "| budget (MB) | weights (MB) | KV at context (MB) | bits / weight | avg KV bits | ppl through the cache "
             "| vs float | K / V bits per layer |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['budget_bytes'] / 1e6:.2f} | {(r['fixed_bytes'] + r['weight_bytes']) / 1e6:.2f} | "
                     f"{r['kv_bytes'] / 1e6:.2f} | {r['bits_per_weight']:.3f} | {r['kv_average_bits']:.2f} | "
                     f"{r['ppl_cache_path']:.3f} | {r['delta_pct']:+.2f}% | "
                     + " ".join(f"K{k}V{v}" for _, k, v in r["kv_bits"]) + " |")
    _write_pareto(out, summary, lines)


def cmd_pareto(args) -> None:
    from finegrain.eval.report import pareto_lines, plot_frontier
    from finegrain.jobs import evaluate_lm, frontier_loaded
    from finegrain.models import load_model

    out = Path(args.out)
    check_output_dir(out, args.overwrite, results=True)
    if args.kv:
        return _pareto_kv(args, out)
    recipe = _with_budget(args, allocate=True)
    calib_text, eval_text = _texts(args)
    lm = load_model(args.model)
    if lm.task != "causal-lm":
        raise InputError(f"pareto evaluates perplexity: {args.model} is not a causal LM")
    calib_text = _chat_calib(args, lm, calib_text)
    budgets = [_parse_size(b, "--budgets") for b in args.budgets] if args.budgets else None
    alloc, models = frontier_loaded(lm, recipe, points=args.points, budgets_bits=budgets, validate=args.validate,
                                    samples=args.calibration_samples, seq_len=args.calibration_seq_len,
                                    strict_recipe=args.strict, calib_text=calib_text)
    if models:
        _warn(models[0].warnings)
    fp = evaluate_lm(lm, lm.tokenizer, args.seq_len, args.max_windows, text=eval_text)
    rows = []
    for cm in models:
        res = evaluate_lm(cm, lm.tokenizer, args.seq_len, args.max_windows, text=eval_text)
        ch = cm.allocation["chosen"]
        name = f"{ch['bits_per_weight']:.3f}bpw"
        cm.save(out / name, overwrite=args.overwrite)
        counts = _format_counts(ch["formats"])
        rows.append({"artifact": str(out / name), "bits_per_weight": ch["bits_per_weight"], "model_bytes": cm.model_bytes(),
                     "predicted": ch["predicted"], "ppl": res["ppl"], "delta_nll": res["nll"] - fp["nll"],
                     "formats": counts})
    summary = {"recipe": recipe.to_dict(), "fp": fp, "points": rows, "allocation": alloc.summary()}
    _write_pareto(out, summary, pareto_lines(lm.source.get("model", args.model), alloc, fp, rows, args.seq_len))
    plot_frontier(out / "pareto.png", alloc, rows)


# command-line options a backend's session takes (a backend not listed runs with its defaults)
SESSION_OPTIONS = {"onnx": lambda a: {"style": a.style, "accuracy_level": a.accuracy_level,
                                      "reuse": getattr(a, "onnx_file", None)},
                   "tvm": lambda a: {"max_seq_len": a.seq_len}, "gpu": lambda a: {"dtype": a.gpu_dtype}}


def _chunked(args) -> str:
    return f", through the KV cache in chunks of {args.through_cache}" if args.through_cache else ""


def _lm_logits(session, args, forward):
    """ids -> logits of ``session`` (a backend session or a deployment): ``forward`` (one
    full-sequence forward), or with ``--through-cache`` the window fed through its KV cache in chunks."""
    if not args.through_cache:
        return forward
    from finegrain.eval.perplexity import cache_path_logits

    return cache_path_logits(session, args.through_cache)


def cmd_eval(args) -> None:
    import finegrain
    from finegrain.eval.size import fp_bytes
    from finegrain.jobs import evaluate_encoder, evaluate_lm
    from finegrain.models import load_model

    path = Path(args.model)
    results = []
    check_output_file(args.json)
    if args.onnx_file:
        if args.backend != "onnx" or not (path / "manifest.json").is_file():
            raise InputError("--onnx-file: for an artifact evaluated with --backend onnx")
        if not Path(args.onnx_file).exists():
            check_output_file(args.onnx_file)
    _, text = _texts(args)
    if (path / "manifest.json").is_file():
        cm = finegrain.load(path, allow_native=args.allow_native)
        if args.through_cache and (args.eval_tensors or not getattr(cm, "kv", None)):
            raise InputError(f"--through-cache: {path} has no KV cache in its graph (quantize it with --kv-cache)"
                             if not args.eval_tensors else "--through-cache: perplexity only, not --eval-tensors")
        if args.eval_tensors:
            if cm.backend != "torch" and args.backend not in ("torch", cm.backend):
                raise FinegrainError(f"{path} is a {cm.backend} deployment: it evaluates on its own")
            if cm.backend != "torch":
                args.backend = cm.backend
            return _eval_tensors(cm, args)
        if cm.backend != "torch":  # another backend's own artifact (a TVM deployment): it runs itself
            if args.backend not in ("torch", cm.backend) or args.compare_fp:
                raise FinegrainError(f"{path} is a {cm.backend} deployment: it evaluates on its own (no --backend other "
                                     f"than {cm.backend}, no --compare-fp; evaluate its source artifact for those)")
            if cm.tokenizer is None:
                raise FinegrainError(f"{path}: the deployment has no tokenizer to evaluate perplexity with")
            q = cm.quantized
            bpw = sum(v["bits"] for v in q.values()) / sum(math.prod(v["shape"]) for v in q.values()) if q else None
            results.append((f"{path} ({cm.backend} deployment, {cm.recipe_name}{_chunked(args)})",
                            evaluate_lm(_lm_logits(cm, args, cm), cm.tokenizer, args.seq_len, args.max_windows,
                                        text=text), bpw,
                            sum(rec["bytes"] for rec in cm.manifest["files"].values())))
            _table(_ppl_title(text, args.seq_len), PPL_COLUMNS, _ppl_rows(results))
            return _write_json(args, {"results": [{"model": n, "bits_per_weight": b, "model_bytes": m, **r}
                                                  for n, r, b, m in results]})
        source = cm.source.get("model")
        if args.compare_fp or cm.tokenizer is None:
            fp_model = load_model(source)
            if fp_model.task == "encoder":
                r = evaluate_encoder(fp_model, cm, text=text)
                _table(f"{path}: sentence-embedding cosine vs FP", ["sentences", "cosine mean", "cosine min"],
                       [[r["sentences"], f"{r['cosine_mean']:.5f}", f"{r['cosine_min']:.5f}"]])
                return _write_json(args, {"encoder": r})
            results.append(("fp32 " + str(source), evaluate_lm(fp_model, fp_model.tokenizer, args.seq_len, args.max_windows,
                                                                  text=text),
                            None, fp_bytes(fp_model.model)))
        with cm.session(args.backend, **SESSION_OPTIONS.get(args.backend, lambda a: {})(args)) as session:
            if getattr(session, "reused", False):
                _say(f"reusing {args.onnx_file} (an ONNX export of this artifact, {args.style})")
            elif args.onnx_file:
                _say(f"exported {args.onnx_file}; later runs with --onnx-file reuse it")
            results.append((f"{path} ({cm.recipe.name}, {args.backend}{_chunked(args)})",
                            evaluate_lm(_lm_logits(session, args, session.run), cm.tokenizer, args.seq_len, args.max_windows,
                                        text=text),
                            cm.quantized_bits_per_weight(), cm.model_bytes()))
    else:
        if args.through_cache:
            raise InputError(f"--through-cache: {args.model} is a float model, not an artifact compiled with --kv-cache")
        lm = load_model(args.model)
        results.append((f"fp32 {args.model}", evaluate_lm(lm, lm.tokenizer, args.seq_len, args.max_windows, text=text), None,
                        fp_bytes(lm.model)))
    _table(_ppl_title(text, args.seq_len), PPL_COLUMNS, _ppl_rows(results))
    _write_json(args, {"results": [{"model": n, "bits_per_weight": b, "model_bytes": m, **r} for n, r, b, m in results]})


def _eval_tensors(cm, args) -> None:
    from finegrain.data import read_tensor_batches
    from finegrain.jobs import evaluate_tensors
    from finegrain.models import load_model

    source = cm.source.get("model")
    from finegrain.models import BUNDLED_NAMES

    if not source or not (Path(source).exists() or source in BUNDLED_NAMES):
        raise InputError(f"--eval-tensors compares with the float source model, and {args.model}'s source "
                         f"({source!r}) is not a file finegrain can load (compiled from Python: compare there)")
    fp = load_model(source)
    batches = read_tensor_batches(args.eval_tensors, [s["name"] for s in cm.input_specs])
    if cm.backend != "torch":  # a deployment runs itself
        r = evaluate_tensors(fp, cm.run, batches)
    else:
        with cm.session(args.backend, **SESSION_OPTIONS.get(args.backend, lambda a: {})(args)) as session:
            r = evaluate_tensors(fp, session.run, batches)
    _table(f"{args.model} ({cm.recipe_name}, {args.backend}) vs its float source on {args.eval_tensors}",
           ["batches", "rel. error", "cosine mean", "top-1 agreement"],
           [[r["batches"], f"{r['rel_error']:.4g}", f"{r['cosine_mean']:.5f}", f"{r['top1_agreement']:.4f}"]])
    _write_json(args, {"tensors": {"file": str(args.eval_tensors), "backend": args.backend, **r}})


def _check_ids(cm, n: int = 64):
    import torch

    spec = cm.input_specs[0]
    if (len(cm.input_specs) != 1 and not getattr(cm, "kv", None)) or spec["dtype"] not in ("int64", "int32"):
        raise FinegrainError("--check feeds token ids: it covers models with one token-id input")
    shape = [min(d, n) if i in spec["dynamic_dims"] else d for i, d in enumerate(spec["shape"])]
    return torch.randint(0, 100, shape, generator=torch.Generator().manual_seed(0)).to(getattr(torch, spec["dtype"]))


def _check_tensors(cm) -> tuple:
    """Seeded random inputs for a tensor-input model, one per spec (a declared dynamic dim at a size
    other than the example's, within its range, so the check covers it)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    out = []
    for s in cm.input_specs:
        shape = list(s["shape"])
        for d, r in zip(s["dynamic_dims"], s.get("dims") or []):
            shape[d] = min(max(shape[d] + 3, r["min"]), r["max"])
        dtype = getattr(torch, s["dtype"])
        out.append(torch.randn(shape, generator=gen).to(dtype) if dtype.is_floating_point
                   else torch.randint(0, 2, shape, generator=gen).to(dtype))
    return tuple(out)


def _say_diff(client: str, ids, got, ref) -> None:
    _say(f"{client} vs the torch reference on {ids.shape[-1]} tokens: max |diff| {float((got - ref).abs().max()):.3g} "
         f"(max |logit| {float(ref.abs().max()):.3g})")


def cmd_export(args) -> None:
    import finegrain

    target = args.onnx or args.hf or args.gguf or args.genai
    if args.gguf and args.dtype == "bfloat16":
        raise FinegrainError("--dtype bfloat16: GGUF float tensors are float32 or float16")
    if args.hf or args.genai:
        check_output_dir(target, args.overwrite)
    else:
        check_output_file(target, args.overwrite)
    cm = finegrain.load(args.artifact)
    if args.hf:
        _export_hf(cm, args)
    elif args.gguf:
        _export_gguf(cm, args)
    elif args.genai:
        _export_genai(cm, args)
    else:
        _export_onnx(cm, args)


def _forms_table(form_column: str, count_column: str, forms: dict[str, str]) -> None:
    """How many layers got each export form."""
    from collections import Counter

    _table(None, [form_column, count_column], [[k, v] for k, v in sorted(Counter(forms.values()).items())])


def _export_hf(cm, args) -> None:
    import torch

    info = cm.export_hf(args.hf, overwrite=args.overwrite, dtype=args.dtype)
    _say(f"{args.hf}: compressed-tensors, {info['bytes'] / 1e6:.1f} MB ({info['groups']} config group(s))")
    _forms_table("compressed-tensors form", "linears", info["forms"])
    if info["kv_cache_scheme"]:
        _say("KV cache: FP8 E4M3, one static scale per layer for keys and one for values (kv_cache_scheme, "
             "self_attn.k_scale / v_scale)")
    if args.check:
        from finegrain.exports.hf import asymmetric_groups, decode_hf_export, load_hf_export

        ids = _check_ids(cm)
        asym = asymmetric_groups(args.hf)
        if asym:  # transformers 5.24 + compressed-tensors 0.20.1 cannot load these (llm-compressor#1618)
            client, model = "compressed-tensors' decompressor + transformers", decode_hf_export(args.hf)
            _say("asymmetric weights: transformers' from_pretrained cannot load them with compressed-tensors 0.20.1 "
                 "(upstream llm-compressor#1618); checking through the library's own decompressor instead")
        else:
            client, model = "transformers + compressed-tensors", load_hf_export(args.hf)
        with torch.no_grad():
            got = model(ids).logits
        _say_diff(client, ids, got, cm(ids))


def _export_gguf(cm, args) -> None:
    tok = None
    if (cm.source or {}).get("model") == "smollm2-135m":  # the bundled model's own tokenizer fields, verbatim
        from finegrain.models.bundled import SMOLLM2_DIST, SMOLLM2_FILE, _locate

        tok = _locate(SMOLLM2_DIST, SMOLLM2_FILE)
    info = cm.export_gguf(args.gguf, overwrite=args.overwrite, tokenizer_gguf=tok, dtype=args.dtype)
    _say(f"{args.gguf}: GGUF, {info['bytes'] / 1e6:.1f} MB; tokenizer: {info['tokenizer']}")
    _table(None, ["GGML type", "tensors"], [[k, v] for k, v in sorted(info["types"].items())])
    if info["max_q4_1_min_error"]:
        _say(f"Q4_1 stores each block's min in fp16: largest weight change {info['max_q4_1_min_error']:.3g}")
    if args.check:
        import numpy as np
        import torch

        try:
            from llama_cpp import Llama
        except ImportError:
            raise FinegrainError("--check runs llama.cpp through llama-cpp-python, which is not installed "
                                 "(pip install -e '.[llama]': it compiles llama.cpp)") from None
        ids = _check_ids(cm)
        llm = Llama(model_path=str(args.gguf), n_ctx=max(64, ids.shape[-1]), logits_all=True, verbose=False)
        llm.eval(ids[0].tolist())
        got = torch.tensor(np.array(llm.scores[: ids.shape[-1]]))
        _say_diff("llama.cpp", ids, got, cm(ids)[0])


def _export_genai(cm, args) -> None:
    import numpy as np

    from finegrain.backends.onnx import export_genai

    info = export_genai(cm, args.genai, style=args.style, accuracy_level=args.accuracy_level,
                        overwrite=args.overwrite)
    _say(f"{args.genai}: onnxruntime-genai folder, {info['bytes'] / 1e6:.1f} MB ({', '.join(info['files'])})")
    _forms_table("ONNX form of the quantized weights", "weights", info["weights"])
    _kv_onnx_note(cm, info)
    if args.check:
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise FinegrainError("--check runs onnxruntime-genai, which is not installed (the 'test' extra)") from None
        ids = _check_ids(cm, 16)
        model = og.Model(str(args.genai))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=ids.shape[1] + 16, do_sample=False)
        g = og.Generator(model, params)
        g.append_tokens(ids[0].numpy().astype(np.int32))
        got = []
        while not g.is_done():
            g.generate_next_token()
            got.append(int(g.get_next_tokens()[0]))
        want = cm.generate(ids, len(got)).tokens
        same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(got))
        _say(f"onnxruntime-genai generated {len(got)} tokens greedily from {ids.shape[1]} prompt tokens; "
             f"the first {same} equal the torch reference's")


def _kv_formats(q: dict) -> str:
    """``keys F, values G`` of a manifest's ``kv.quantization`` (per layer: KVTuner's pairs; ZipCache: the
    salient tokens' format, then the others')."""
    other = "per layer" if q.get("layers") else "float"
    z = q.get("zip") if isinstance(q.get("zip"), dict) else {}

    def fmt(kind):
        f = q.get(kind) or other
        return f"{f} / {z[kind]}" if z.get(kind) else f

    ratio = z.get("ratio")  # a loaded manifest's field: a number, or said as it is
    share = f"{ratio:.0%}" if isinstance(ratio, (int, float)) else repr(ratio)
    zipped = f" (ZipCache: the {share} most salient tokens in the first format)" if z else ""
    return f"keys {fmt('key')}, values {fmt('value')}{zipped}"


def _kv_onnx_note(cm, info: dict) -> None:
    """What an ONNX export holds of a quantized KV cache: ONNX Runtime's own INT8 cache, or the
    writes as ONNX arithmetic over an fp32 cache holding the format's values (and why)."""
    kv8 = info.get("kv_int8") or {}
    if kv8.get("inputs"):
        _say(f"KV cache: {len(kv8['inputs'])} past inputs held as INT8 by com.microsoft::GroupQueryAttention "
             f"(PER_TENSOR scales)")
    for why in kv8.get("skipped", []):
        _say(f"KV cache not held as INT8: {why} (an fp32 cache holding the values)")
    q = (getattr(cm, "kv", None) or {}).get("quantization")
    if q and not kv8.get("inputs") and not kv8.get("skipped"):
        _say(f"KV cache: {_kv_formats(q)} quantized on write by "
             "ONNX ops into an fp32 cache holding the format's values (ONNX Runtime holds a quantized cache itself "
             "for static INT8 per tensor only: --kv-quant kv8-static)")


def _export_onnx(cm, args) -> None:
    info = cm.export_onnx(args.onnx, style=args.style, accuracy_level=args.accuracy_level, overwrite=args.overwrite)
    _say(f"{args.onnx}: {info['bytes'] / 1e6:.1f} MB, style {info['style']}")
    _forms_table("ONNX form of the quantized weights", "weights", info["weights"])
    _kv_onnx_note(cm, info)
    if args.check:
        from finegrain.backends.onnx import OnnxSession

        session = OnnxSession(cm, accuracy_level=args.accuracy_level, path=args.onnx)
        if any(s["dtype"].startswith(("float", "bfloat")) for s in cm.input_specs) and not getattr(cm, "kv", None):
            xs = _check_tensors(cm)
            got, ref = session.run(*xs), cm(*xs)
            _say(f"onnxruntime vs the torch reference on random inputs {', '.join(str(list(x.shape)) for x in xs)}: "
                 f"max |diff| {float((got - ref).abs().max()):.3g} (max |output| {float(ref.abs().max()):.3g})")
            return
        ids = _check_ids(cm)
        _say_diff("onnxruntime", ids, session.run(ids), cm(ids))


def cmd_build(args) -> None:
    import finegrain

    from finegrain.backends import registry
    from finegrain.backends.tvm.deploy import parse_target

    if registry.recognize(args.artifact) is not None:
        raise FinegrainError(f"{args.artifact} is already a deployment; build from the artifact it came from")
    check_output_dir(args.out, args.overwrite)
    if args.backend == "gpu":
        cm = finegrain.load(args.artifact)
        m = cm.build_gpu(args.out, dtype=args.gpu_dtype, overwrite=args.overwrite)
        out = Path(args.out)
        kinds: dict[str, int] = {}
        for rec in m["layers"].values():
            kinds[rec["format"]] = kinds.get(rec["format"], 0) + 1
        rows = [[f"{fmt} -> Triton kernel layout", n] for fmt, n in sorted(kinds.items())]
        rows.append(["compute dtype (sessions' default)", m["dtype"]])
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        _table(f"{out}: GPU deployment, {size / 1e6:.1f} MB (artifact/ + {', '.join(sorted(m['files']))})", ["", ""],
               rows)
        return
    parse_target(args.target)  # a bad target fails before the artifact is read
    cm = finegrain.load(args.artifact)
    m = cm.build(args.out, target=args.target, tune_trials=args.tune_trials, max_seq_len=args.max_seq_len,
                 overwrite=args.overwrite, int8=not args.no_int8, cache=args.cache, kv_storage=args.kv_storage)
    b = m["build"]
    out = Path(args.out)
    size = sum((out / f).stat().st_size for f in m["files"])
    kernels: dict[str, int] = {}
    for k in m["kernels"].values():
        if k["kind"] == "int8-dot":
            key = (f"{k['format']} x {k['activation']} -> int8-dot kernel ({k['epilogue']} epilogue), groups of "
                   f"{k['group_size']}")
        else:
            key = (f"{k['format']} -> {k['kind']}" if k["kind"].startswith(("conv", "recurrent")) else
                   f"{k['format']} -> int{k['bits']} kernel, groups of {k['group_size']}")
        kernels[key] = kernels.get(key, 0) + 1
    rows = [[k, v] for k, v in sorted(kernels.items())]
    rows.append(["other functions by schedule", ", ".join(f"{k} {v}" for k, v in b["schedules"].items())])
    if "tuning" in b:
        t = b["tuning"]
        rows.append(["MetaSchedule", f"{t['trials']} trials over {t['tasks'] - t['reused']} new tasks "
                                     f"({t['reused']} from the database), {t['applied']} applied, {b['tune_s']} s"])
    rows.append(["target", json.dumps(m["target"])])
    rows.append(["seconds", f"import {b['import_s']}, legalize {b['legalize_s']}, schedule {b['schedule_s']}, "
                            f"codegen {b['codegen_s']}, total {b['total_s']}"])
    _table(f"{out}: TVM deployment, {size / 1e6:.1f} MB ({', '.join(sorted(m['files']))})", ["", ""], rows)


def _write_json(args, obj) -> None:
    if args.json:
        from finegrain.io.files import atomic_write_text

        atomic_write_text(args.json, json.dumps(obj, indent=1) + "\n")


def cmd_inspect(args) -> None:
    from finegrain.errors import ArtifactError
    from finegrain.runtime.artifact import read_manifest, verify_files

    from finegrain.backends import registry
    from finegrain.io.files import read_json_file

    path = Path(args.artifact)
    backend = registry.recognize(path)
    if backend is not None:  # another backend's own artifact: its manifest only (no native code is loaded)
        m = read_json_file(path / "manifest.json")
        verify_files(path, m.get("files"))
        try:
            _inspect_deployment(path, m, backend.name)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ArtifactError(f"{path / 'manifest.json'}: a report field is malformed ({type(e).__name__}: "
                                f"{str(e)[:100]})") from None
        return
    m = read_manifest(path)
    verify_files(path, m["files"])
    try:
        _inspect_report(path, m)
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        raise ArtifactError(f"{path / 'manifest.json'}: a report field is malformed ({type(e).__name__}: "
                            f"{str(e)[:100]})") from None


def _inspect_deployment(path: Path, m: dict, backend: str) -> None:
    if backend == "gpu":
        rows = [[layer, k["format"], "x".join(map(str, k["shape"])), k["group"], k["bits"]]
                for layer, k in sorted(m["layers"].items())]
        _table(f"{path}: GPU deployment of recipe {m.get('recipe')}", ["layer", "format", "shape", "kernel group",
                                                                       "code bits"], rows)
        _say(f"compute dtype {m['dtype']}; {', '.join(m['files'])} {sum(r['bytes'] for r in m['files'].values()) / 1e6:.1f} "
             "MB (checksums OK) beside the artifact in artifact/ (`finegrain inspect` it for the quantization report); "
             "data only (JSON + safetensors)")
        return
    rows = [[layer, k["format"], k["kind"], "x".join(map(str, k["shape"])), k["group_size"]]
            for layer, k in sorted((m.get("kernels") or {}).items())]
    _table(f"{path}: {backend} deployment of recipe {(m.get('recipe') or {}).get('name')}, source "
           f"{(m.get('source') or {}).get('model')}", ["layer", "format", "kernel", "shape", "kernel group"], rows)
    _say(f"target {json.dumps(m.get('target'))}; functions {', '.join(m.get('functions') or {})}; files "
         f"{sum(r['bytes'] for r in m['files'].values()) / 1e6:.1f} MB (checksums OK); native code: load it only "
         "with --allow-native / allow_native=True")


def _inspect_report(path: Path, m: dict) -> None:
    rows, total_bits, total_n = [], 0, 0
    for name, rec in sorted(m["layers"].items()):
        n = math.prod(rec["shape"])
        total_bits, total_n = total_bits + rec["bits"], total_n + n
        out_db = rec.get("output_sqnr_db")
        rows.append([name, rec["format"], rec.get("algorithm", "rtn"), "x".join(map(str, rec["shape"])),
                     f"{rec['bits'] / n:.3f}", f"{rec['bits'] / 8 / 1024:.1f}", f"{rec['weight_sqnr_db']:.1f}",
                     f"{out_db:.1f}" if out_db is not None else "-"])
    _table(f"{path}: recipe {m['recipe'].get('name')}, source {m['source'].get('model')}",
           ["layer", "format", "algorithm", "shape", "bits/w", "KiB", "weight SQNR dB", "output SQNR dB"], rows)
    folds = m.get("folds", [])
    if folds:
        _table("folds (exact transformations applied before quantization)", ["pass", "site", "action", "detail"],
               [[f["pass"], f["site"], f["action"], f["detail"]] for f in folds])
    alloc = m.get("allocation") or {}
    if alloc.get("chosen"):
        ch = alloc["chosen"]
        _say(f"bit allocation: {alloc['sensitivity']} sensitivity over {alloc['groups']} fused groups and "
             f"{len(alloc['candidates'])} candidates, budget {alloc['budget']} {alloc['unit']}; chose "
             f"{ch['bits_per_weight']:.3f} bits/weight (predicted {ch['predicted']:.4g}), one of "
             f"{alloc.get('frontier_points', len(alloc['frontier']))} frontier points")
    for op, freq in (alloc.get("routing") or {}).items():
        _say(f"routing frequency (calibration tokens per expert) of {op}: " + " ".join(f"{f:.3f}" for f in freq))
    stored = sum(rec["bytes"] for rec in m["files"].values())
    _say(f"{len(rows)} quantized tensors, {total_bits / max(total_n, 1):.3f} bits/weight over them; "
         f"{len(m['tensors'])} stored tensors; artifact files {stored / 1e6:.1f} MB (checksums OK)")


def cmd_generate(args) -> None:
    import finegrain
    import torch

    cm = finegrain.load(args.artifact, allow_native=args.allow_native)
    tok = cm.tokenizer
    if tok is None:
        raise FinegrainError(f"{args.artifact} has no tokenizer: generate needs one to read the prompt")
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise FinegrainError(f"{args.artifact}: the tokenizer has no chat template (drop --chat)")
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        ids = tok(args.prompt, return_tensors="pt")["input_ids"]
    eos = [t for t in {tok.eos_token_id, *([tok.convert_tokens_to_ids("<|im_end|>")] if args.chat else [])}
           if isinstance(t, int) and t >= 0 and t != tok.unk_token_id]
    new: list[int] = []
    shown = [""]

    def stream(t: int) -> None:
        new.append(t)
        text = tok.decode(new, skip_special_tokens=True)
        sys.stdout.write(safe_text(text[len(shown[0]):], keep=" \n\t"))
        sys.stdout.flush()
        shown[0] = text

    if cm.backend != "torch" and args.backend not in ("torch", cm.backend):
        raise FinegrainError(f"{args.artifact} is a {cm.backend} deployment: it generates on {cm.backend} only")
    backend = cm.backend if cm.backend != "torch" else args.backend
    if args.cuda_graph and backend != "gpu":
        raise FinegrainError(f"--cuda-graph is a --backend gpu option (this generates on {backend})")
    if args.cuda_graph and cm.backend == "gpu":  # a GPU deployment is its own session
        cm.enable_decode_graph()
    session = cm if cm.backend != "torch" else cm.session(backend, **GENERATE_OPTIONS.get(backend, lambda a: {})(args))
    try:
        sample = args.temperature is not None or args.top_k is not None or args.top_p is not None
        g = session.generate(ids.to(torch.int64), args.max_new_tokens, do_sample=sample,
                             temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p,
                             eos_token_id=eos or None, seed=args.seed, streamer=stream)
    finally:
        if session is not cm:
            session.close()
    sys.stdout.write("\n")
    kv = getattr(session, "kv", None)
    packed = len(getattr(session, "kv_packed", {}) or {})
    cache = ("no KV cache: each step recomputes the sequence (quantize --kv-cache for one)" if not kv else
             "KV cache: one token per step" + (f", {packed} of {2 * kv['layers']} presents stored bit-packed" if packed
                                              else ""))
    _say(f"[{backend}] prefill {g.prompt_tokens} tokens in {g.prefill_seconds:.3f} s "
         f"({g.prefill_tokens_per_second:.1f} tokens/s); decode {len(g.tokens)} tokens in {g.decode_seconds:.3f} s "
         f"({g.decode_tokens_per_second:.1f} tokens/s, {cache}); stopped by {g.stopped}", style="dim")


GENERATE_OPTIONS = {"tvm": lambda a: {"max_seq_len": 2048, "kv_storage": a.kv_storage},
                    "torch": lambda a: {"kv_storage": a.kv_storage, "weight_storage": a.weight_storage},
                    "gpu": lambda a: {"dtype": a.gpu_dtype, "decode_graph": a.cuda_graph}}


def gpu_dtype(p) -> None:
    p.add_argument("--gpu-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="--backend gpu: compute dtype (float32 as traced; bfloat16 / float16: activations, float "
                        "weights and the KV cache in that dtype, RoPE positions and the mask in fp32)")


def cmd_backends(args) -> None:
    from finegrain.backends import registry

    names = registry.names()
    _table("backends (backends/registry.py)", ["backend", "available here", "what it is"],
           [[n, registry.get(n).available() or "yes", registry.get(n).description] for n in names])
    _table("presets x backends: native kernel / emulated (dequantize, compute in float) / refused",
           ["recipe", *names], registry.preset_matrix())
    if args.formats:
        _table("formats and ops x backends", ["format (role)", *names],
               registry.capability_matrix(registry.preset_rows()))
    if args.markdown:
        from finegrain.eval.report import markdown_table

        lines = markdown_table(["recipe", *names], registry.preset_matrix()) + [""] + markdown_table(
            ["format (role)", *names], registry.capability_matrix(registry.preset_rows()))
        for line in lines:
            print(line)


def _folds_of(r) -> str:
    folds = []
    if r.fold_norms and not r.rotate:
        folds.append("fold_norms")
    if r.rotate:
        folds.append("online Hadamard only" if r.rotation_mode == "online"
                     else "rotate" + ("+online" if r.online_hadamard else ""))
    if r.smoothing:
        folds.append(f"{r.smoothing}" + (" (search)" if r.smoothing_search else f" (alpha {r.smoothing_alpha})"))
    return ", ".join(folds) or "-"


def cmd_presets(args) -> None:
    from finegrain.compiler.recipe import PRESETS

    rows = []
    for name, r in PRESETS.items():
        for rule in r.rules:
            rows.append([name, rule.role or "", rule.pattern or "", rule.weight.tag if rule.weight else "fp",
                         rule.activation.tag if rule.activation else "fp",
                         f"{rule.weight.bits_per_element():.3f}" if rule.weight else "-", r.weight_algorithm,
                         _folds_of(r)])
    _table("presets (other roles stay floating point; bits/w nominal, one row of 4096)",
           ["recipe", "role", "pattern", "weight", "activation", "bits/w", "weights by", "folds"], rows)
    from finegrain.compiler.recipe import KV_PRESETS

    _table("KV cache presets (quantize --kv-quant NAME, on top of --recipe)", ["preset", "keys", "values", "settings"],
           [[name, f["kv_key"], f["kv_value"],
             ", ".join(f"{k.removeprefix('kv_')}={v}" for k, v in f.items() if k not in ("kv_key", "kv_value")) or "-"]
            for name, f in KV_PRESETS.items()])


def _int_in(lo: int, hi: int | None = None):
    """An argparse type: an integer in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is outside [{lo}, {hi if hi is not None else '∞'}]")
        return v
    return parse


POS, NONNEG = _int_in(1, 1 << 20), _int_in(0, 1 << 20)


def build_parser() -> argparse.ArgumentParser:
    from finegrain.backends import registry
    from finegrain.compiler.recipe import KV_PRESETS
    from finegrain.models import BUNDLED_NAMES, DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="finegrain", description="A compiler for fine-grained low-bit quantization.")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    model_help = (f"bundled model ({', '.join(BUNDLED_NAMES)}), a local Hugging Face model directory, org/name in the "
                  "local Hugging Face cache, a .gguf file or a float .onnx file")

    def budget(sp):
        sp.add_argument("--budget", help="bits per weight over the quantized linears, e.g. 3.25bpw: bit allocation "
                                         "picks each linear's format from the candidates")
        sp.add_argument("--budget-bytes", help="bytes of the whole stored model instead, e.g. 80MB or 80000000")
        sp.add_argument("--candidates", nargs="+", help="candidate weight format tags (default: the recipe's "
                                                        "weight_candidates, else int2 g64 .. int8 per channel)")

    def calib(sp):
        sp.add_argument("--strict", action="store_true", help="a recipe rule that matches no layer, or a recipe that "
                                                              "quantizes nothing, is an error (default: a warning)")
        sp.add_argument("--calibration-samples", type=NONNEG, default=None, help="calibration windows (recipe default 32; 0 = none)")
        sp.add_argument("--calibration-seq-len", type=POS, default=None, help="tokens per window (recipe default 512)")
        text_source(sp, "calib", "calibrate", "the bundled Brown corpus slice")
        sp.add_argument("--calib-chat", action=argparse.BooleanOptionalAction, default=None,
                        help="calibrate an instruct model on the calibration text rendered in its chat template: each "
                             "paragraph of 40+ words a conversation, its first third the user's turn and the rest the "
                             "assistant's, with the template's system prompt (default: off; on in the demo when the "
                             "model has a chat template)")

    def text_source(sp, kind: str, verb: str, default: str):
        src = sp.add_mutually_exclusive_group()  # --calib-text | --calib-jsonl, --eval-text | --eval-jsonl
        src.add_argument(f"--{kind}-text", metavar="FILE|DIR", help=f"{verb} on your own UTF-8 text: a file, or a "
                         f"directory of .txt / .text / .md / .rst files (default: {default})")
        src.add_argument(f"--{kind}-jsonl", metavar="FILE", help=f"{verb} on a JSON-lines file: one document per "
                                                                 "record, the string in --jsonl-field")

    def eval_text(sp):
        text_source(sp, "eval", "evaluate", "WikiText-2 test")

    def jsonl_field(sp):
        sp.add_argument("--jsonl-field", default="text", help="the field of each JSON-lines record that holds its "
                                                              "text (default: text)")

    d = sub.add_parser("demo", help="quantize the bundled LM, compare FP vs quantized perplexity, save the artifact")
    d.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    d.add_argument("--recipe", default="w4a16-g128-rot-gptq",
                   help="preset name or recipe .json/.yaml (default: the most accurate W4 preset that compiles in under "
                        "two minutes: folded QuaRot rotation + sequential GPTQ)")
    d.add_argument("--seq-len", type=POS, default=2048)
    d.add_argument("--max-windows", type=NONNEG, default=8, help="evaluation windows (0 = all)")
    d.add_argument("--out", default=DEMO_OUT, help="artifact directory (replaced if it exists)")
    d.add_argument("--chat-prompt", default="What is the capital of France?",
                   help="a chat prompt both models answer at the end (greedy)")
    d.add_argument("--chat-tokens", type=NONNEG, default=32, help="tokens to generate for it (0: skip)")
    d.add_argument("--backend", choices=["auto", "torch", "onnx", "tvm"], default="auto",
                   help="where the quantized model is evaluated and chats: auto = TVM built for this CPU when it "
                        "is installed and takes the model (the fastest here), else torch (the reference)")
    calib(d)
    eval_text(d)
    jsonl_field(d)
    d.set_defaults(fn=cmd_demo)

    q = sub.add_parser("quantize", help="compile a model with a recipe and save the artifact")
    q.add_argument("--model", required=True, help=model_help)
    q.add_argument("--recipe", required=True, help="preset name or recipe .json/.yaml")
    q.add_argument("--out", required=True, help="artifact directory (must not exist unless --overwrite)")
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--input", action="append", metavar="NAME[:DIM=LABEL,...]",
                   help="declare which dims of a tensor input vary (repeatable), e.g. image:3=width for images of any "
                        "width; names come from the model (an ONNX file's inputs, forward's parameters)")
    q.add_argument("--calib-tensors", metavar="FILE.safetensors",
                   help="a model with tensor inputs (images, features): example and calibration batches, one tensor "
                        "<input> [samples, ...] per input, or <input>.0, <input>.1, ... one per batch")
    q.add_argument("--kv-cache", action="store_true",
                   help="capture the decoder with its KV cache as graph inputs / outputs, so `generate` decodes one "
                        "token per step over the cache (every backend: torch, onnx, tvm with a static cache, gpu; the "
                        "onnxruntime-genai export)")
    q.add_argument("--kv-quant", choices=tuple(KV_PRESETS), metavar="{" + ",".join(KV_PRESETS) + "}",
                   help="quantize the KV cache with this preset on top of --recipe (implies --kv-cache; `finegrain "
                        "presets` lists the fields): kv8 (8 bits per token; packed on TVM), kv8-fp8 (FP8 E4M3 per "
                        "token), kv8-fp8-static / kv8-static (FP8 / INT8, one calibrated scale per layer), kivi4 / "
                        "kivi2 (KIVI keys per channel before RoPE, values per token, Hadamard-rotated, newest 128 "
                        "tokens and one sink in float; packed by the reference and TVM static builds, ONNX Runtime "
                        "over an fp32 cache), rotatekv4 (RotateKV: pre-RoPE keys reordered by calibration and "
                        "rotated over all KV heads' channels, 4 bits per token, the sinks found by calibration (massive "
                        "activations); packed by the reference "
                        "and TVM static builds), klt-k2v3 (KIVI's settings, the pre-RoPE keys coded in each head's "
                        "calibrated Karhunen-Loeve basis within 2-bit-g16 bytes, values 3 bits in groups of 64; packed "
                        "by the reference, ONNX Runtime and GPU over an fp32 cache; TVM refuses it), "
                        "zip42 (ZipCache: half of each block at 4 bits by attention "
                        "saliency, the rest at 2; packed by the reference and TVM static builds, ONNX Runtime "
                        "refuses it)")
    q.add_argument("--stream", action="store_true",
                   help="models larger than RAM: build the model with empty weights and compile it block by block "
                        "(one decoder layer at a time), reading each block's weights from the safetensors files when "
                        "it is compiled; each block calibrates on the already quantized blocks' outputs. Hugging Face "
                        "causal-LM directories (safetensors) and Llama / Qwen2 .gguf files (dequantized per tensor); "
                        "finished blocks are spooled to a temporary file beside --out, not kept in RAM; "
                        "refuses recipes whose passes span blocks (rotate, budgets, kv_*, gptq_float_target)")
    budget(q)
    calib(q)
    jsonl_field(q)
    q.set_defaults(fn=cmd_quantize)

    pa = sub.add_parser("pareto", help="bit allocation frontier: N artifacts along it, their real perplexity, "
                                       "table + plot of predicted vs measured loss against size")
    pa.add_argument("--model", required=True, help=model_help)
    pa.add_argument("--recipe", default="w4a16-g128", help="preset or recipe file; its rules say which linears are "
                                                           "quantized, its weight_candidates (or --candidates) what they may get")
    pa.add_argument("--points", type=POS, default=4, help="frontier points to materialize, evenly spaced in size")
    pa.add_argument("--budgets", nargs="+", help="bits-per-weight budgets instead of --points (e.g. 2.5 3 3.25bpw)")
    pa.add_argument("--candidates", nargs="+", help="candidate weight format tags (default: the recipe's, else "
                                                    "int2 g64 .. int8 per channel)")
    pa.add_argument("--validate", type=NONNEG, default=8, help="groups whose real ΔNLL is measured to check the proxy")
    pa.add_argument("--seq-len", type=POS, default=2048)
    pa.add_argument("--max-windows", type=NONNEG, default=8, help="windows per evaluation (0 = all)")
    pa.add_argument("--kv", action="store_true", help="allocate KV cache bits per layer instead (KVTuner: (K, V) "
                                                       "bits in --kv-bits^2 per layer under --budgets average KV bits, "
                                                       "default 2.5 3 3.25 4; weights as --recipe: a recipe file "
                                                       "with no rules keeps them float); perplexity through the cache")
    pa.add_argument("--kv-objective", choices=("attention", "loss", "gain"), default="attention",
                    help="--kv sensitivity: the layer's attention-output error, the next-token loss increase, or "
                         "(gain) the attention-output error times the layer's loss / error slope")
    pa.add_argument("--kv-bits", type=_bit_widths, default=None, metavar="B,B,...",
                    help="--kv: the K / V bit widths searched, pairs of every two (default 2,3,4,8)")
    pa.add_argument("--kv-samples", type=POS, default=4, help="--kv sensitivity calibration windows of 512 tokens")
    pa.add_argument("--kv-chunk", type=POS, default=256, help="--kv: tokens per prefill chunk through the cache")
    pa.add_argument("--joint-context", type=POS, default=None, metavar="TOKENS",
                    help="--kv: allocate weight formats (the recipe's candidates / --candidates, Fisher sensitivity) "
                         "and KV bits per layer (loss sensitivity) under one byte budget each: --budgets are total "
                         "sizes (stored weights + the KV cache at TOKENS cached tokens), e.g. 60MB 80MB")
    pa.add_argument("--out", required=True, help="directory for the artifacts, pareto.md/.json/.png")
    pa.add_argument("--overwrite", action="store_true")
    calib(pa)
    eval_text(pa)
    jsonl_field(pa)
    pa.set_defaults(fn=cmd_pareto)

    e = sub.add_parser("eval", help="perplexity of an artifact or a float model on WikiText-2 test or your own text "
                                    "(encoder artifacts: embedding cosine vs their FP model)")
    e.add_argument("--model", required=True, help="artifact directory, " + model_help)
    e.add_argument("--seq-len", type=POS, default=2048)
    e.add_argument("--max-windows", type=NONNEG, default=None, help="evaluate only the first N windows")
    e.add_argument("--compare-fp", action="store_true", help="also evaluate the artifact's float source model")
    e.add_argument("--through-cache", type=POS, default=None, metavar="CHUNK",
                   help="an artifact compiled with --kv-cache: run each window through its KV cache, prefilled in "
                        "chunks of CHUNK tokens, each chunk reading the cache the earlier ones wrote (a quantized "
                        "cache as stored; the protocol of a deployment), instead of one full-sequence forward")
    e.add_argument("--backend", choices=registry.names(), default="torch",
                   help="run the artifact on the torch reference, exported to ONNX Runtime, built with TVM "
                        "(a TVM deployment directory runs on its own) or on a CUDA GPU with the Triton kernels")
    e.add_argument("--style", choices=("qdq", "matmulnbits"), default="qdq", help="ONNX weight form (--backend onnx)")
    e.add_argument("--accuracy-level", type=int, default=0, choices=range(5), help="ONNX Runtime MatMulNBits level")
    e.add_argument("--onnx-file", help="--backend onnx: export to this .onnx file once and reuse it on later runs "
                                       "(it must be an export of this artifact with this --style; checked)")
    gpu_dtype(e)
    e.add_argument("--json", help="also write the results to this JSON file")
    e.add_argument("--eval-tensors", metavar="FILE.safetensors",
                   help="an artifact of a tensor-input model: compare its outputs with its float source model on these "
                        "batches (as --calib-tensors): relative error, cosine, top-1 agreement")
    eval_text(e)
    jsonl_field(e)
    e.add_argument("--allow-native", action="store_true",
                   help="allow evaluating a TVM deployment directory: it holds native code (model.so) that runs "
                        "when loaded, so only for deployments you built or trust")
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser("export", help="write an artifact for another engine: ONNX (QDQ / MatMulNBits), a Hugging "
                                      "Face compressed-tensors directory (vLLM, transformers) or a GGUF file (llama.cpp)")
    x.add_argument("artifact", help="artifact directory")
    where = x.add_mutually_exclusive_group(required=True)
    where.add_argument("--onnx", help="output .onnx file")
    where.add_argument("--hf", help="output directory: Hugging Face model in the compressed-tensors schema")
    where.add_argument("--gguf", help="output .gguf file for llama.cpp (Q8_0 / Q4_0 / Q4_1 weights)")
    where.add_argument("--genai", help="output directory onnxruntime-genai loads (model.onnx with the KV cache, "
                                       "genai_config.json, tokenizer); needs an artifact quantized with --kv-cache")
    x.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="--hf: dtype of the float tensors and weight scales; --gguf: of the unquantized matrices "
                        "(F32 / F16). float32 is exact; bfloat16 / float16 halve them as serving checkpoints do")
    x.add_argument("--style", choices=("qdq", "matmulnbits"), default="qdq",
                   help="qdq: DequantizeLinear (opset 21, blocked INT4/INT8, FP8), portable; matmulnbits: "
                        "com.microsoft::MatMulNBits for integer weights (ONNX Runtime)")
    x.add_argument("--accuracy-level", type=int, default=0, choices=range(5),
                   help="MatMulNBits compute: 0 = the activation's type (fp32, exact), 4 = int8 activations "
                        "(faster, adds activation error); also set as ORT's level for fused QDQ")
    x.add_argument("--check", action="store_true", help="run the export in its real client (onnxruntime; transformers "
                   "+ compressed-tensors; llama.cpp via llama-cpp-python) and compare logits with the torch reference")
    x.add_argument("--overwrite", action="store_true")
    x.set_defaults(fn=cmd_export)

    bd = sub.add_parser("build", help="compile an artifact ahead of time with TVM into a deployment directory "
                                      "(shared library + weights + manifest; runs with the TVM runtime only), or "
                                      "with --backend gpu into a GPU deployment (the artifact + its weights in the "
                                      "Triton kernels' layout)")
    bd.add_argument("artifact", help="artifact directory")
    bd.add_argument("--backend", choices=("tvm", "gpu"), default="tvm",
                    help="tvm (default): a TVM deployment for this CPU or --target; gpu: a GPU deployment (data "
                         "only: JSON + safetensors; --gpu-dtype is the compute dtype its sessions default to; the "
                         "TVM options do not apply)")
    bd.add_argument("--out", required=True, help="deployment directory (must not exist unless --overwrite)")
    bd.add_argument("--target", default="llvm",
                    help="'llvm' = this CPU (default), or a TVM target as JSON, e.g. "
                         "'{\"kind\": \"llvm\", \"mcpu\": \"znver3\", \"num-cores\": 2}'")
    bd.add_argument("--tune-trials", type=NONNEG, default=0,
                    help="MetaSchedule trials over the static-shape functions the hand schedules do not own "
                         "(0 = hand schedules only); the database is kept in OUT/tuning and reused by the next "
                         "build into OUT (with --overwrite)")
    bd.add_argument("--max-seq-len", type=_int_in(2, 1 << 20), default=2048, help="longest prefill the deployment accepts")
    bd.add_argument("--no-int8", action="store_true",
                    help="keep INT2-4 weight x INT8 activation linears (W4A8, DGQ) on fp32 compute instead of the "
                         "integer-dot kernel (for comparisons)")
    bd.add_argument("--cache", choices=["static", "concat"], default="static",
                    help="KV-cache artifacts: 'static' = one preallocated buffer per layer, new keys / values written "
                         "in place (default); 'concat' = past + new concatenated by the graph each call (for "
                         "comparisons)")
    bd.add_argument("--kv-storage", choices=("packed", "float"), default="packed",
                    help="an artifact with a quantized KV cache, --cache static: hold the layers that pack as their "
                         "formats' codes (packed, default) or every layer in an fp32 cache of the formats' values "
                         "(float: the same logits in 4-13x the memory; faster where decoding the packed layout costs "
                         "most: RotateKV's grouped heads, each past key taken back through the grouped rotation "
                         "every step)")
    bd.add_argument("--overwrite", action="store_true")
    gpu_dtype(bd)
    bd.set_defaults(fn=cmd_build)

    i = sub.add_parser("inspect", help="per-layer formats, bits, bytes and error stats of an artifact")
    i.add_argument("artifact")
    i.set_defaults(fn=cmd_inspect)

    gn = sub.add_parser("generate", help="generate text from an artifact, streamed as it comes, with prefill and "
                                         "decode tokens/s at the end")
    gn.add_argument("artifact", help="artifact directory (or a TVM deployment, with --allow-native)")
    gn.add_argument("--prompt", required=True)
    gn.add_argument("--max-new-tokens", type=NONNEG, default=64)
    gn.add_argument("--backend", choices=registry.names(), default="torch", help="backend to generate on")
    gn.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gn.add_argument("--temperature", type=float, default=None, help="sample with this temperature (default: greedy "
                                                                     "unless --top-k / --top-p)")
    gn.add_argument("--top-k", type=POS, default=None, help="sample from the k most likely tokens")
    gn.add_argument("--top-p", type=float, default=None, help="sample from the smallest set with this probability mass")
    gn.add_argument("--seed", type=int, default=None, help="seed of the sampler (repeatable output)")
    gn.add_argument("--allow-native", action="store_true", help="allow a TVM deployment (native code) as the artifact")
    gn.add_argument("--kv-storage", choices=("packed", "float"), default="packed",
                    help="--backend torch / tvm, an artifact with a quantized KV cache: keep the cache bit-packed "
                         "(its formats' bytes; the reference unpacks it every step, TVM's decode reads most layouts "
                         "in place) or in fp32 (the same values, 4-13x the memory)")
    gn.add_argument("--weight-storage", choices=("packed", "float"), default="float",
                    help="--backend torch: dequantize each packed weight once when the session opens and keep it in "
                         "fp32 (float: the same logits, fp32's memory for the weights, several times faster) or at "
                         "every step as the graph says (packed: the artifact's memory)")
    gpu_dtype(gn)
    gn.add_argument("--cuda-graph", action="store_true",
                    help="--backend gpu, a KV-cache artifact: each decode step one fixed-shape graph over the whole "
                         "static cache, replayed as a CUDA graph (captured once per prompt)")
    gn.set_defaults(fn=cmd_generate)

    b = sub.add_parser("backends", help="the registered backends and what each takes: presets and formats x "
                                        "backends (native kernel / emulated / refused)")
    b.add_argument("--formats", action="store_true", help="also the table of every format and op")
    b.add_argument("--markdown", action="store_true", help="print both tables as Markdown (the README's matrix)")
    b.set_defaults(fn=cmd_backends)

    r = sub.add_parser("presets", help="list the recipe presets")
    r.set_defaults(fn=cmd_presets)
    return p


def _terminate(signum, frame):
    """SIGTERM unwinds like Ctrl-C, so temporary directories are removed on the way out."""
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    """SIGTERM -> SystemExit and SIGINT -> KeyboardInterrupt (even when the process was started
    with SIGINT ignored, as a shell does for background jobs): both unwind through the atomic
    writers, which remove their temporary directories."""
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    if getattr(args, "max_windows", None) == 0:
        args.max_windows = None
    install_signal_handlers()
    try:
        args.fn(args)
    except FinegrainError as e:
        if args.debug:
            raise
        print(f"finegrain {args.command}: error: {safe_text(e, keep=' ' + chr(10))}", file=sys.stderr)  # lines kept
        return 2
    except KeyboardInterrupt:
        print(f"finegrain {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an unwrapped library error: one line, the traceback with --debug
        if args.debug:
            raise
        print(f"finegrain {args.command}: internal error: {type(e).__name__}: {safe_text(str(e))[:500]} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
