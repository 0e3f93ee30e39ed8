"""The reference backend: executes the quantized FX graph with PyTorch eager kernels
(dequantize-then-compute). Ground truth that every other backend is tested against; it takes
every format (all emulated: the codes are dequantized and computed in float)."""
from __future__ import annotations

import torch
from torch.fx import GraphModule

import finegrain.compiler.ops  # noqa: F401  (registers the finegrain:: custom ops)
import finegrain.formats.ops  # noqa: F401
from finegrain.backends.base import BackendBase, Session
from finegrain.errors import InputError
from finegrain.io.signature import check_inputs


class TorchRefSession(Session):
    """Runs the graph. On a KV-cache graph (``kv``: ``compile(kv_cache=True)``) ``run(ids)`` is a
    forward over an empty past (the logits), ``run(*all_inputs)`` the graph itself (logits and
    presents), and ``prefill`` / ``step`` carry the presents as the next step's past: one token per
    decode step, the cache growing by concatenation.

    ``kv_storage="packed"`` (the default): the presents the recipe quantizes (``kv_key`` /
    ``kv_value`` per token or in head-dim groups; KIVI / RotateKV's windowed writes) are carried as
    ``backends/kv_packed.py`` records (bit-packed codes, stored scales / zero points, the float
    window and sinks as fp32) instead of fp32 tensors; the logits are bit-identical to
    ``kv_storage="float"``. ``kv_packed`` maps the packed present indices to their formats,
    ``kv_float`` says why others stay fp32.

    ``weight_storage="packed"`` (the default) dequantizes every packed weight at every call, as
    the graph says; ``"float"`` dequantizes each once, when the session opens, and keeps the fp32
    result (:func:`dequantized_once`: the same function of the same tensors, so the outputs are
    bit-identical; the weights then take fp32's memory; generation is several times faster)."""

    backend = "torch"

    def __init__(self, gm: GraphModule, input_specs: list[dict], kv: dict | None = None,
                 kv_storage: str = "packed", weight_storage: str = "packed"):
        from finegrain.backends.kv_packed import lower

        for name, v in (("kv_storage", kv_storage), ("weight_storage", weight_storage)):
            if v not in ("packed", "float"):
                raise InputError(f"backend 'torch': {name} must be 'packed' or 'float', got {v!r}")
        if weight_storage == "float":
            gm = dequantized_once(gm)
        self.gm, self.input_specs, self.kv = gm, input_specs, kv
        self.max_seq_len = kv["max_seq_len"] if kv else None
        self.kv_packed, self.kv_float = {}, []
        if kv and kv.get("quantization") and kv_storage == "packed":
            packed_gm, slots, skipped = lower(gm)
            self.kv_float = skipped
            if slots:
                self.gm, self._kv_specs = packed_gm, slots
                self.kv_packed = {i: spec["fmt"] for i, spec in slots.items()}

    def kv_forward(self, ids: torch.Tensor, past, start: int) -> tuple:
        if past is None and self.kv_packed:
            from finegrain.backends.kv_packed import empty_state
            from finegrain.compiler.capture import kv_inputs

            past = list(kv_inputs(self.kv, ids, None, 0)[2:])
            for i, spec in self._kv_specs.items():
                past[i] = empty_state(spec, ids.shape[0], self.kv["kv_heads"], self.kv["head_dim"])
        return super().kv_forward(ids, past, start)

    def _check(self, inputs: tuple) -> None:
        from finegrain.backends.kv_packed import KltKV, PackedKV, WindowedKV, ZipKV

        if not self.kv_packed or len(inputs) != len(self.input_specs):
            return check_inputs(self.input_specs, inputs)
        shown = list(inputs)
        for i, fmt in self.kv_packed.items():
            p, spec = inputs[2 + i], self.input_specs[2 + i]
            if not isinstance(p, (PackedKV, WindowedKV, ZipKV, KltKV)) or p.fmt != fmt:
                raise InputError(f"input {spec['name']!r}: this session stores the KV cache packed, so the past is "
                                 f"the PackedKV in {fmt} that prefill / step / run_all returned, got "
                                 f"{type(p).__name__} (open the session with kv_storage='float' to pass fp32 tensors)")
            shown[2 + i] = torch.empty(p.shape, dtype=getattr(torch, spec["dtype"]), device="meta")
        check_inputs(self.input_specs, tuple(shown))

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.kv and len(inputs) == 1:
            return self.kv_forward(inputs[0], None, 0)[0]
        return self.run_all(*inputs)

    def run_all(self, *inputs: torch.Tensor):
        self._check(inputs)
        with torch.inference_mode():
            return self.gm(*inputs)


class TorchBackend(BackendBase):
    name = "torch"
    description = "PyTorch eager reference (dequantize, compute in fp32)"
    kv_cache = True
    kv_widths = True

    def capability(self, fmt, role: str, partner=None) -> tuple[str, str]:
        return "emulated", "the reference dequantizes / fake-quantizes and computes in fp32"

    def op_capability(self, op: str) -> tuple[str, str]:
        return "emulated", "torch ops"

    def session(self, compiled, kv_storage: str = "packed", weight_storage: str = "packed",
                **options) -> TorchRefSession:
        if options:
            raise InputError(f"backend 'torch' takes the options 'kv_storage' and 'weight_storage' only, got "
                             f"{sorted(options)}")
        return TorchRefSession(compiled.gm, compiled.input_specs, getattr(compiled, "kv", None), kv_storage,
                               weight_storage)


def dequantized_once(gm: GraphModule) -> GraphModule:
    """A copy of ``gm`` in which every ``dequantize_packed`` of constants (a packed weight, its
    scales, zero points, codebook) is replaced by a constant holding its result, computed here once
    by the same op (the copy shares ``gm``'s other constants)."""
    import copy

    from torch.fx import Node
    from torch.utils._pytree import tree_map

    from finegrain.compiler.ir import get_tensor
    from finegrain.compiler.regions import new_constant
    from finegrain.formats.ops import DEQUANTIZE_PACKED

    out = GraphModule(gm, copy.deepcopy(gm.graph))
    g = out.graph
    for n in list(g.nodes):
        if n.op != "call_function" or n.target is not DEQUANTIZE_PACKED or any(
                a.op != "get_attr" for a in n.all_input_nodes):
            continue
        args, kwargs = tree_map(lambda a: get_tensor(out, a.target) if isinstance(a, Node) else a, (n.args, n.kwargs))
        with torch.no_grad():
            value = DEQUANTIZE_PACKED(*args, **kwargs)
        c = new_constant(out, f"dequantized.{n.name}", value, before=n)
        n.replace_all_uses_with(c)
        g.erase_node(n)
    g.eliminate_dead_code()
    g.lint()
    out.recompile()
    return out


BACKEND = TorchBackend()
