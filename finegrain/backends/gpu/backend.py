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
``decode_graph=True``: a one-token step whose past is the session's static buffers filled to the
state's position runs one fixed-shape graph over the whole buffers (``lower.fixed_decode_graph``: the
fill a device tensor, the rows past it masked), captured as a **CUDA graph** on CUDA (once per set of
buffers, i.e. per prefill; then each step is one replay, no kernel launches from Python), run as a
graph module on CPU under the interpreter (how the tests check the rewrite). Other steps run as above.
A graph the rewrite cannot fix, or a cache whose writes are not all static (KIVI's reference writes),
is refused at session creation with the node named; a capture that fails warns once and the fixed
graph then runs eagerly. Off by default: not yet measured on a GPU.
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
                 prepacked: dict | None = None, cache_tokens: int | None = None, decode_graph: bool = False):
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
        self.fixed = None  # the fixed-shape decode step (decode_graph=True)
        self._graphs: dict = {}  # (batch, buffers' addresses) -> (CUDA graph, its static inputs, its logits)
        self._capture_failed = False  # a capture failed or cannot work (host ops): the fixed step runs eagerly
        if decode_graph:
            self.enable_decode_graph()

    def enable_decode_graph(self) -> None:
        """Decode one-token steps through the fixed-shape graph (``decode_graph=True``; module docstring)."""
        import warnings

        from finegrain.backends.gpu.lower import fixed_decode_graph, on_host

        if not self.kv or not self.cache_tokens:
            raise InputError("decode_graph needs a KV-cache graph (--kv-cache) and static buffers (cache_tokens > 0)")
        self.fixed = fixed_decode_graph(self.gm, self.cache_tokens)
        host = [n.args[0] for n in self.fixed.graph.nodes if n.target is on_host]
        if host and self.device.type == "cuda":  # a copy to the host cannot be captured
            warnings.warn(f"gpu session: decode_graph: {len(host)} reference ops run on CPU copies (e.g. {host[0]}); "
                          "the fixed-shape step runs eagerly, not as a CUDA graph", RuntimeWarning, stacklevel=3)
            self._capture_failed = True

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

    def step(self, state: dict, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        from finegrain.backends.gpu.lower import mark_filled, whole_buffers

        pos = state.get("pos", 0)
        bufs = whole_buffers(state["past"], pos) if self.fixed is not None and ids.shape[1] == 1 else None
        if bufs is None:
            return super().step(state, ids)
        self.check_room(pos, 1)
        check_inputs(self.input_specs[:1], [ids])
        ids = ids.to(self.device)
        if self.device.type == "cuda" and not self._capture_failed:
            logits = self._replay(bufs, ids, pos)
        else:
            with torch.inference_mode():
                logits = self._fixed_eager(bufs, ids, pos)
        return logits, {"past": mark_filled(bufs, pos + 1), "pos": pos + 1}

    def _fixed_eager(self, bufs, ids, pos: int):
        fill = torch.full((1,), pos, dtype=torch.long, device=self.device)
        return self.fixed(ids, torch.full_like(ids, pos), *bufs, fill)[0]

    def _replay(self, bufs, ids, pos: int):
        """The fixed step as a CUDA graph over ``bufs``: captured on first use (after one eager warm-up
        run that compiles / tunes the kernels; it writes the same token the replay writes again), then
        replayed with the inputs copied into its static ones. Only the latest buffers' graph is kept
        (each prefill allocates new buffers)."""
        key = (ids.shape[0], tuple(b.data_ptr() for b in bufs))
        if key not in self._graphs:
            import warnings

            static = [ids.clone(), torch.full_like(ids, pos), torch.full((1,), pos, dtype=torch.long, device=ids.device)]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            try:
                with torch.cuda.stream(side), torch.inference_mode():
                    self.fixed(static[0], static[1], *bufs, static[2])
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.inference_mode(), torch.cuda.graph(graph):
                    logits = self.fixed(static[0], static[1], *bufs, static[2])[0]
            except Exception as e:  # noqa: BLE001 - any capture failure: decode on, eagerly, and say so
                warnings.warn(f"gpu session: CUDA graph capture of the decode step failed ({type(e).__name__}: {e}); "
                              "the fixed-shape step runs eagerly", RuntimeWarning, stacklevel=3)
                self._capture_failed = True
                with torch.inference_mode():
                    return self._fixed_eager(bufs, ids, pos)
            self._graphs = {key: (graph, static, logits)}
        graph, static, logits = self._graphs[key]
        static[0].copy_(ids)
        static[1].fill_(pos)
        static[2].fill_(pos)
        graph.replay()
        return logits.clone()

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
        from finegrain.backends.gpu.kernels import fake_quant_ok

        if fake_quant_ok(fmt):
            return "emulated", ("fake quantization in one Triton kernel (_fake_quant_rows: the reference's values bit "
                                "for bit), the linear on the weight kernel in float")
        return "emulated", "fake quantization by the reference op on the device (torch ops, fp32, no kernel)"

    def op_capability(self, op: str) -> tuple[str, str]:
        if op == "hadamard":
            return "native", "Triton FWHT (Sylvester tiles generated in registers, tl.dot), small factor in torch"
        if op == "act_outliers":
            return "emulated", ("both fake quantizations by the reference op on the device (torch ops), columns picked "
                                "by torch.where")
        if op in ("conv", "recurrent"):
            return "emulated", "weight dequantized once at load; torch's float op"
        if op == "kv_append":
            return "emulated", ("the reference op on the device (torch ops, no kernel): the cache stays on the GPU, "
                                "the values the reference computes")
        return "emulated", "the reference op on the device (torch ops, fp32, no kernel)"

    def session(self, compiled, device: str | None = None, dtype: "str | torch.dtype | None" = None,
                cache_tokens: int | None = None, decode_graph: bool = False, **options) -> GpuSession:
        if options:
            raise InputError(f"backend 'gpu' takes the options 'device', 'dtype', 'cache_tokens' and 'decode_graph' "
                             f"only, got {sorted(options)}")
        if device is not None and torch.device(device).type == "cpu" and not _interpret():
            raise InputError("backend 'gpu' runs on device 'cpu' only under TRITON_INTERPRET=1 (kernel testing)")
        dt = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype or torch.float32
        if dt not in (torch.float32, torch.bfloat16, torch.float16):
            raise InputError(f"backend 'gpu': dtype must be float32, bfloat16 or float16, got {dtype!r}")
        self.require(compiled)
        return GpuSession(compiled, device or default_device(), dt, cache_tokens=cache_tokens,
                          decode_graph=decode_graph)

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
