"""The GPU backend's entry in the registry: the quantized graph on CUDA with its linears on the
Triton kernels of ``kernels.py`` (``lower.py`` says which node becomes what).

``session(compiled, device=None, dtype=None, cache_tokens=None)``: ``device`` defaults to ``cuda``; ``cpu`` is
accepted only under ``TRITON_INTERPRET=1`` (the kernels interpreted on CPU tensors: how the tests
run them without a GPU). ``dtype``: the compute dtype, ``float32`` (as traced; the default),
``bfloat16`` or ``float16`` (activations, float weights and the KV cache in that dtype, the kernels'
``tl.dot`` on it; ``lower.to_compute_dtype``). Inputs are moved to the device; ``run`` returns the
logits on the CPU in fp32, ``run_all`` / ``prefill`` / ``step`` keep the outputs (the KV cache) on
the device in the compute dtype. ``cache_tokens``: the rows of each static KV buffer (default
``min(max_seq_len, 4096)``; 0: none): a KV-cache graph's presents are appended in place into buffers
the session allocates at prefill (``lower.kv_write_op``), so a decode step does not copy the past;
past that many tokens, or stepping again from an older state, the step concatenates as traced.
Its own artifacts (``deploy.py``, ``finegrain build --backend gpu``): the finegrain artifact plus every
kernel weight already in the kernel layout, loaded as a :class:`deploy.GpuDeployment`.
Not yet: CUDA graphs for the decode step (they need fixed shapes: an attention over the whole
buffer with the fill as a device tensor, where the presents here are views that grow per step).
"""
from __future__ import annotations

import importlib.util
import os

import torch

from finegrain.backends.base import BackendBase, Session
from finegrain.errors import InputError
from finegrain.io.signature import check_inputs

DEFAULT_CACHE_TOKENS = 4096  # rows of a static KV buffer when the session is not told (at most max_seq_len)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_device() -> str:
    """``cuda``; ``cpu`` under ``TRITON_INTERPRET=1`` with no CUDA device (the kernels' tests)."""
    return "cpu" if _interpret() and not torch.cuda.is_available() else "cuda"


class GpuSession(Session):
    backend = "gpu"

    def __init__(self, compiled, device: str | None = None, dtype: torch.dtype = torch.float32,
                 prepacked: dict | None = None, cache_tokens: int | None = None):
        from finegrain.backends.gpu.lower import prepare

        self.input_specs, self.kv = compiled.input_specs, getattr(compiled, "kv", None)
        self.max_seq_len = self.kv["max_seq_len"] if self.kv else None
        if cache_tokens is not None and (not isinstance(cache_tokens, int) or cache_tokens < 0):
            raise InputError(f"cache_tokens must be a non-negative integer, got {cache_tokens!r}")
        # rows of each static KV buffer (0: none, every step concatenates); past them a step concatenates
        self.cache_tokens = min(self.max_seq_len or DEFAULT_CACHE_TOKENS, DEFAULT_CACHE_TOKENS) \
            if cache_tokens is None else cache_tokens
        self.device, self.dtype = torch.device(device or "cuda"), dtype
        self.gm, self.kernels = prepare(compiled.gm, self.device, dtype,
                                        [sp["dtype"].startswith("float") for sp in self.input_specs], prepacked)

    def _empty_past(self, batch: int) -> list:
        return [torch.zeros(batch, self.kv["kv_heads"], 0, self.kv["head_dim"], dtype=self.dtype,
                            device=self.device)] * (2 * self.kv["layers"])

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.kv and len(inputs) == 1:  # one forward: no buffers to keep
            return super().kv_forward(inputs[0], self._empty_past(inputs[0].shape[0]), 0)[0].float().cpu()
        out = self.run_all(*inputs)
        return (out[0] if isinstance(out, (tuple, list)) else out).float().cpu()

    def kv_forward(self, ids: torch.Tensor, past, start: int) -> tuple:
        from finegrain.backends.gpu.lower import static_buffers

        if past is None:  # an empty cache in the compute dtype, on the device: static buffers where the graph appends
            b, h, d, n = ids.shape[0], self.kv["kv_heads"], self.kv["head_dim"], 2 * self.kv["layers"]
            past = self._empty_past(b)
            writes = [i - 1 for i in getattr(self.gm, "kv_writes", []) if 1 <= i <= n]
            if writes and self.cache_tokens:
                for i, v in zip(writes, static_buffers(b, h, self.cache_tokens, d, len(writes), self.dtype,
                                                       self.device)):
                    past[i] = v
        return super().kv_forward(ids, past, start)

    def run_all(self, *inputs: torch.Tensor):
        def spec_view(t):  # shape and dtype only (no copy of a cache back to the host): the compute dtype reads as
            dt = torch.float32 if t.dtype == self.dtype and self.dtype != torch.float32 else t.dtype  # the traced fp32
            return torch.empty(t.shape, dtype=dt, device="meta")

        check_inputs(self.input_specs, [spec_view(t) for t in inputs])
        cast = lambda t: t.to(self.device, self.dtype) if t.is_floating_point() else t.to(self.device)  # noqa: E731
        with torch.inference_mode():
            return self.gm(*[cast(t) for t in inputs])


class GpuBackend(BackendBase):
    name = "gpu"
    description = "NVIDIA GPU: Triton low-bit GEMV / GEMM, INT8-dot (W8A8, DGQ W4A8) and FWHT kernels"
    kv_cache = True

    def available(self) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "needs triton (pip install 'finegrain[gpu]')"
        if not torch.cuda.is_available() and not _interpret():
            return "no CUDA device here (TRITON_INTERPRET=1 runs the kernels on CPU tensors, slowly, for testing)"
        return None

    def capability(self, fmt, role: str, partner=None) -> tuple[str, str]:
        from finegrain.backends.gpu.kernels import element_layout
        from finegrain.backends.gpu.lower import pair_ok

        if role == "weight":
            lay = element_layout(fmt)
            if lay is None:
                return "emulated", f"no kernel decodes {fmt.element}: dequantized once at load, dense float matmul"
            if lay["mini"]:
                return "native", (f"Triton GEMV / GEMM, {fmt.element.upper()} codes decoded to fp32 in registers "
                                  "(no FP4 / FP6 tensor-core path on Hopper: the decode is arithmetic)")
            return "native", f"Triton GEMV / GEMM, INT{fmt.bits} codes unpacked and scaled in registers"
        if partner is not None and pair_ok(partner, fmt):
            if fmt.kind == "e4m3":
                return "native", "quantized per row to E4M3 by a Triton kernel, FP8 tl.dot with fp32 accumulation"
            return "native", "quantized per row by a Triton kernel, INT8 tl.dot with int32 accumulation"
        return "emulated", "fake quantization by the reference op (on CPU copies when the model runs on CUDA)"

    def op_capability(self, op: str) -> tuple[str, str]:
        if op == "hadamard":
            return "native", "Triton FWHT (Sylvester tiles generated in registers, tl.dot), small factor in torch"
        if op == "act_outliers":
            return "emulated", ("both fake quantizations by the reference op (on CPU copies when on CUDA), columns picked "
                                "by torch.where")
        if op in ("conv", "recurrent"):
            return "emulated", "weight dequantized once at load; torch's float op"
        return "emulated", "the reference op (on CPU copies when the model runs on CUDA)"

    def session(self, compiled, device: str | None = None, dtype: "str | torch.dtype | None" = None,
                cache_tokens: int | None = None, **options) -> GpuSession:
        if options:
            raise InputError(f"backend 'gpu' takes the options 'device', 'dtype' and 'cache_tokens' only, got "
                             f"{sorted(options)}")
        if device is not None and torch.device(device).type == "cpu" and not _interpret():
            raise InputError("backend 'gpu' runs on device 'cpu' only under TRITON_INTERPRET=1 (kernel testing)")
        dt = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype or torch.float32
        if dt not in (torch.float32, torch.bfloat16, torch.float16):
            raise InputError(f"backend 'gpu': dtype must be float32, bfloat16 or float16, got {dtype!r}")
        self.require(compiled)
        return GpuSession(compiled, device or default_device(), dt, cache_tokens=cache_tokens)

    def export(self, compiled, out, dtype: str = "float32", overwrite: bool = False) -> dict:
        from finegrain.backends.gpu.deploy import build_deployment

        self.require(compiled)
        return build_deployment(compiled, out, dtype=dtype, overwrite=overwrite)

    def recognizes(self, path) -> bool:
        from finegrain.backends.gpu.deploy import is_deployment

        return is_deployment(path)

    def load(self, path, artifact_loader=None, **options):
        from finegrain.backends.gpu.deploy import GpuDeployment

        return GpuDeployment(path, artifact_loader, **options)


BACKEND = GpuBackend()
