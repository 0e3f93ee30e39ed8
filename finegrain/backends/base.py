"""The backend contract: what every backend implements, and the session object it returns.

A backend (one entry of ``registry.BACKENDS``) is an object with

* ``name``, ``description``, ``native_artifacts`` (True when its artifacts hold native code);
* ``available() -> str | None``: None, or why it cannot run here (a missing package);
* ``capability(fmt, role, partner=None) -> (status, note)`` for a ``QuantFormat`` as a
  ``"weight"`` or an ``"activation"`` (``partner``: the weight format an activation meets), and ``op_capability(op)`` for graph ops that are not formats
  (``"hadamard"``, ``"grouped_linear"``, ``"kv_append"``, ``"conv"``, ``"recurrent"``); status is ``native`` (a kernel computes in the
  format), ``emulated`` (dequantized / fake-quantized, computed in float) or ``refused``;
* ``check(compiled) -> list[Refusal]``: every layer / op / input it cannot take, named, before
  any work starts (``capability`` over the graph's formats plus its own structural limits);
* ``session(compiled, **options) -> Session``;
* optionally ``export(compiled, out, **options)`` (an artifact of its own), ``recognizes(path)``
  and ``load(path, **options)`` (how its artifacts are found and opened).

:class:`BackendBase` gives the defaults; the capability matrix (``finegrain backends``, the
README) and ``check`` read the same ``capability`` functions, so they cannot disagree.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from finegrain.errors import FinegrainError

STATUSES = ("native", "emulated", "refused")


class BackendError(FinegrainError):
    """A backend cannot run a compiled model; the message lists every refusal."""


@dataclass(frozen=True)
class Refusal:
    """One thing a backend cannot take: ``where`` (layer, node or input), ``what`` (a format tag,
    an op), ``why``."""

    where: str
    what: str
    why: str

    def __str__(self) -> str:  # ``why`` names the format or op itself
        return f"{self.where}: {self.why}"


def graph_items(gm) -> Iterator[tuple[str, str, Any]]:
    """``(where, role, thing)`` for every format and special op in a quantized graph: role
    ``weight`` / ``activation`` / ``kv`` (a KV cache quantized on write, per token or in groups along the
    head dim) with a QuantFormat, or ``op`` with ``"hadamard"`` /
    ``"kv_append"`` (a windowed / per-channel quantized KV cache write) / ``"act_outliers"`` (an
    activation in two formats by column groups, FMPQ) / ``"grouped_linear"`` / ``"conv"`` (a convolution reading a quantized weight) / ``"recurrent"`` (an
    LSTM / GRU / RNN reading quantized weights)."""
    from finegrain.formats import QuantFormat
    from finegrain.compiler.ir import CONV_OPS, RECURRENT_OPS
    from finegrain.compiler.ops import GROUPED_LINEAR, HADAMARD, KV_APPEND, WEIGHT
    from finegrain.formats.ops import DEQUANTIZE, DEQUANTIZE_PACKED, QUANTIZE

    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target is DEQUANTIZE_PACKED:
            yield str(n.args[0].target).removesuffix("_qpacked"), "weight", QuantFormat.parse(n.args[3])
        elif n.target is QUANTIZE and _writes_kv(n):
            yield f"node {n.name} (KV cache write)", "kv", QuantFormat.parse(n.args[1])
        elif n.target is QUANTIZE:
            yield f"node {n.name} (input of {', '.join(u.name for u in _consumers(n)) or '?'})", "activation", \
                QuantFormat.parse(n.args[1])
        elif n.target is HADAMARD:
            yield f"node {n.name}", "op", "hadamard"
        elif n.target is GROUPED_LINEAR:
            yield f"node {n.name}", "op", "grouped_linear"
        elif n.target is KV_APPEND:
            yield f"node {n.name} (KV cache write)", "op", "kv_append"
        elif n.target is torch.ops.aten.where.self and all(getattr(a, "target", None) is DEQUANTIZE for a in n.args[1:3]):
            yield f"node {n.name} (activation groups in two formats)", "op", "act_outliers"
        elif n.target in CONV_OPS and _reads_quantized(n.args[1]):
            yield f"node {n.name}", "op", "conv"
        elif n.target in RECURRENT_OPS and any(_reads_quantized(getattr(p, "args", [None])[0]) for p in n.args[2]
                                            if getattr(p, "target", None) is WEIGHT):
            yield f"node {n.name}", "op", "recurrent"


KV_APPEND_OPTIONS = ("inv_freq", "rotated", "score", "fmt_low", "ratio", "block", "channel_norm", "perm", "head_group",
                     "basis", "mean", "widths")


def kv_append_options(n) -> dict:
    """The optional arguments of the ``kv_append`` node ``n`` (``compiler/ops.kv_append_ref``) by name,
    positional or keyword."""
    return dict(zip(KV_APPEND_OPTIONS, n.args[6:]), **n.kwargs)


def windowed_kv_refusal(n, backend: str, zip_ok: bool = False, klt_ok: bool = False) -> str | None:
    """Why ``backend``'s emulation of windowed KV writes (the ``kv_append`` node ``n``: KIVI's
    per-channel keys, a float window, sinks, pre-RoPE / rotated keys, recomputed in its graph as the
    reference computes them, RotateKV's grouped-head / reordered keys included; with ``zip_ok``
    ZipCache's saliency-ranked mixed precision too; with ``klt_ok`` keys coded in their calibrated
    Karhunen-Loeve basis, ``kv_key_klt``) does not cover this one, or None: ZipCache without ``zip_ok``
    or over RotateKV's grouped heads, KLT-coded keys without ``klt_ok``, formats other than dynamic
    integers or FP8 E4M3 with float scales."""
    from finegrain.formats import QuantFormat

    kw = kv_append_options(n)
    zipped = kw.get("score") is not None or kw.get("fmt_low") is not None
    if zipped and not zip_ok:
        return f"ZipCache's saliency-ranked mixed-precision KV writes have no {backend} lowering yet"
    if kw.get("basis") is not None and not klt_ok:
        return f"keys coded in their calibrated Karhunen-Loeve basis (kv_key_klt) have no {backend} lowering yet"
    perm = kw.get("perm")
    if perm is not None and getattr(perm, "op", None) != "get_attr":
        return f"RotateKV's key channel order must be a constant of the graph, got node {perm}"
    if zipped and (perm is not None or int(kw.get("head_group", 1)) > 1):
        return f"ZipCache over RotateKV's grouped-head keys has no {backend} lowering"
    for tag in (n.args[2], kw.get("fmt_low")) if zipped else (n.args[2],):
        f = QuantFormat.parse(tag)
        if f.kind not in ("int", "e4m3") or not f.dynamic or f.block_rows or f.scale not in ("fp32", "fp16", "bf16"):
            return (f"KV format {f.tag}: the {backend} windowed write takes dynamic integer or FP8 E4M3 formats with "
                    "float scales")
    f = QuantFormat.parse(n.args[2])
    if zipped:  # token-wise per token (groups along the head dim) or per channel over each block's subsets
        return None
    if n.args[3] == "tokens" and f.granularity != "group":
        return f"KV format {f.tag}: per-channel keys (axis tokens) need groups of tokens (-gN)"
    if n.args[3] != "tokens" and f.granularity not in ("group", "token"):
        return f"KV format {f.tag}: values per token or in groups along the head dim"
    return None


def windowed_kv_refusals(gm, backend: str, zip_ok: bool = False, klt_ok: bool = False) -> list["Refusal"]:
    """One :class:`Refusal` per ``kv_append`` of ``gm`` that :func:`windowed_kv_refusal` refuses."""
    from finegrain.compiler.ops import KV_APPEND

    out = []
    for n in gm.graph.nodes:
        append = n.op == "call_function" and n.target is KV_APPEND
        why = windowed_kv_refusal(n, backend, zip_ok, klt_ok) if append else None
        if why:
            out.append(Refusal(f"node {n.name} (KV cache write)", "kv_append", why))
    return out


def _writes_kv(q) -> bool:
    """The quantize ``q`` is a KV cache write: its dequantized values are the new part of a present."""
    from finegrain.compiler.ir import KV

    return any(KV in c.meta for g in q.users for deq in g.users for c in deq.users)


def _reads_quantized(w) -> bool:
    """A conv weight that is a dequantized packed weight (through reshape / permute)."""
    from finegrain.formats.ops import DEQUANTIZE_PACKED

    while hasattr(w, "target") and w.target in (torch.ops.aten.reshape.default, torch.ops.aten.permute.default):
        w = w.args[0]
    return getattr(w, "target", None) is DEQUANTIZE_PACKED


def _consumers(n) -> list:
    out = []
    for u in n.users:  # quantize -> getitem -> dequantize -> linear
        for v in u.users:
            out.extend(w for w in v.users)
    return out


class BackendBase:
    """Defaults for the optional parts of the contract."""

    name = "?"
    description = ""
    native_artifacts = False
    error: type[FinegrainError] = BackendError  # what ``require`` raises (a backend's own error type)

    def available(self) -> str | None:
        return None

    def capability(self, fmt, role: str, partner=None) -> tuple[str, str]:
        """``partner``: for an activation, the weight format of the linear it feeds, when known."""
        raise NotImplementedError

    def op_capability(self, op: str) -> tuple[str, str]:
        raise NotImplementedError

    def status(self, role: str, thing, partner=None) -> tuple[str, str]:
        """``capability`` for a format (role ``weight`` / ``activation``), ``op_capability`` for
        role ``op``."""
        return self.op_capability(thing) if role == "op" else self.capability(thing, role, partner)

    def check_inputs(self, input_specs: list[dict]) -> list[Refusal]:
        return []

    kv_cache = False  # runs KV-cache graphs (compile(kv_cache=True): past_key_* inputs, present outputs)
    kv_widths = False  # ... whose keys and values have different shapes (MLA's latent and rotary key)

    def check(self, compiled) -> list[Refusal]:
        refusals = [Refusal("install", self.name, why) for why in [self.available()] if why]
        if getattr(compiled, "kv", None) and not self.kv_cache:
            refusals.append(Refusal("inputs", "kv-cache graph", f"a KV-cache graph (past_key_* / past_value_* inputs, "
                                    f"present outputs): backend {self.name!r} does not lower it yet; compile without "
                                    "kv_cache for it"))
            return refusals
        from finegrain.compiler.capture import kv_widths_differ

        if kv_widths_differ(getattr(compiled, "kv", None)) and not self.kv_widths:
            kv = compiled.kv
            refusals.append(Refusal("inputs", "kv-cache graph", f"keys of {kv['kv_heads']} x {kv['head_dim']} and "
                                    f"values of {kv['value_heads']} x {kv['value_dim']} per token (MLA's latent and "
                                    f"rotary key): backend {self.name!r} takes a cache of equal shapes"))
            return refusals
        refusals += self.check_inputs(compiled.input_specs)
        for where, role, thing in graph_items(compiled.gm):
            status, note = self.status(role, thing)
            if status == "refused":
                refusals.append(Refusal(where, thing if role == "op" else f"{role} {thing.tag}", note))
        return refusals

    def require(self, compiled) -> None:
        """Raise BackendError listing every refusal (the first five in full) unless none."""
        refusals = self.check(compiled)
        if refusals:
            shown = "; ".join(map(str, refusals[:5])) + (f"; ... {len(refusals) - 5} more" if len(refusals) > 5 else "")
            raise self.error(f"backend {self.name!r} cannot run this model ({len(refusals)} refusal"
                               f"{'s' if len(refusals) > 1 else ''}): {shown}")

    def session(self, compiled, **options) -> "Session":
        raise NotImplementedError

    export = None  # a callable (compiled, out, **options) -> dict where the backend writes an artifact

    def recognizes(self, path: Path) -> bool:
        return False

    def load(self, path: Path, artifact_loader=None, **options):
        """The backend's own artifact at ``path``; ``artifact_loader``: ``runtime.artifact.load_artifact``
        (passed down by it, for a deployment that holds a finegrain artifact: backends sit below the runtime)."""
        raise BackendError(f"backend {self.name!r} has no artifacts of its own to load")


class Artifact:
    """What ``finegrain.load`` returns, whatever made it: ``backend`` (which backend runs it as
    loaded: ``torch`` for a finegrain artifact, the backend's name for its own artifacts),
    ``input_specs``, ``tokenizer``, ``quantized``, ``source``, ``recipe_name``, ``session()`` and
    calling it like the model."""

    backend = "?"
    input_specs: list[dict]
    tokenizer: Any
    quantized: dict
    source: dict
    recipe_name: str | None

    def session(self, backend: str | None = None, **options) -> "Session":
        raise NotImplementedError


class Session:
    """A runnable model on one backend. ``run(*inputs)`` -> logits / outputs. For generative
    models ``prefill(ids) -> (logits, state)`` and ``step(state, ids) -> (logits, state)``: over a
    KV-cache graph (``kv``; ``compile(kv_cache=True)``) the state is the presents, fed back as the
    next step's past (``run_all`` gives them); otherwise they recompute the whole sequence from the
    token ids kept in the state (correct, not fast: O(n^2) over a generation). ``generate`` drives them.
    ``close()`` frees what the session holds (temporary directories, native handles); sessions are
    context managers."""

    backend = "?"
    input_specs: list[dict]
    max_seq_len: int | None = None  # the longest sequence the session takes, when it has a limit
    kv: dict | None = None  # the KV-cache layout when the session runs a KV-cache graph

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run_all(self, *inputs: torch.Tensor) -> tuple:
        """Every output of the graph (a KV-cache graph: logits, then the presents)."""
        raise NotImplementedError

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.run(*inputs)

    def check_room(self, start: int, n: int) -> None:
        """``n`` new tokens at position ``start`` fit the longest sequence the session takes."""
        from finegrain.errors import InputError

        if self.max_seq_len is not None and start + n > self.max_seq_len:
            raise InputError(f"position {start + n} is past the {self.max_seq_len} tokens the model takes "
                             "(max_seq_len)")

    def kv_forward(self, ids: torch.Tensor, past, start: int) -> tuple:
        """A KV-cache graph on ``ids`` at positions ``start``.. over ``past`` (None: empty)."""
        from finegrain.compiler.capture import kv_inputs

        self.check_room(start, ids.shape[1])
        return self.run_all(*kv_inputs(self.kv, ids, past, start))

    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if self.kv:
            out = self.kv_forward(ids, None, 0)
            return out[0], {"past": out[1:], "pos": ids.shape[1]}
        logits = self.run(ids)
        return logits, {"ids": ids}

    def step(self, state: dict, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if self.kv:
            out = self.kv_forward(ids, state["past"], state["pos"])
            return out[0], {"past": out[1:], "pos": state["pos"] + ids.shape[1]}
        seq = torch.cat([state["ids"], ids], dim=1)
        return self.run(seq)[:, -ids.shape[1]:], {"ids": seq}

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, **options):
        """Greedy or sampled generation over ``prefill`` / ``step`` (``backends/generation.py``:
        ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``eos_token_id``, ``seed``,
        ``streamer``); returns a ``Generation`` (new tokens, prefill / decode seconds)."""
        from finegrain.backends.generation import generate

        return generate(self, input_ids, max_new_tokens, **options)

    def close(self) -> None:
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
