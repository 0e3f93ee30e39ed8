"""The TVM backend's entry in the registry: what it takes (low-bit kernels for INT2/3/4/8 and
FP4 E2M1 weights, the integer-dot kernel for symmetric INT8 activations, fake quantization for
the other integer and minifloat activations, per token / tensor or in groups with float, E8M0 or
two-level E4M3 scales), what it refuses, its sessions and its deployments (native code:
loaded only on request)."""
from __future__ import annotations

from pathlib import Path

from finegrain.backends.base import BackendBase, Refusal, windowed_kv_refusals
from finegrain.compiler.recipe import kv_static


class TvmBackend(BackendBase):
    name = "tvm"
    description = "Apache TVM: Relax + low-bit TIR kernels, ahead-of-time CPU deployments"
    native_artifacts = True

    @property
    def error(self):
        from finegrain.backends.tvm.lower_activations import TvmError

        return TvmError

    def available(self) -> str | None:
        import importlib.util

        return None if importlib.util.find_spec("tvm") else "needs apache-tvm (pip install 'finegrain[tvm]')"

    def capability(self, fmt, role: str, partner=None) -> tuple[str, str]:
        from finegrain.backends.tvm.kernels import a8
        from finegrain.backends.tvm.kernels.lowbit import container_bits

        if role == "weight":
            if container_bits(fmt) is not None:
                kind = f"INT{fmt.bits}" if fmt.kind == "int" else f"FP{fmt.bits} {fmt.kind.upper()}"
                return "native", f"low-bit TIR kernel ({kind} codes)"
            return "refused", (f"weight format {fmt.tag} has no TVM kernel (INT2/3/4/8 per group / channel / tensor, "
                               "FP4 / FP6 / FP8 in 1-D groups do)")
        if role == "kv" and fmt.kind in ("int", "e4m3") and (kv_static(fmt) or (fmt.dynamic and fmt.granularity in (
                "token", "group"))) and fmt.scale in ("fp32", "fp16", "bf16"):
            if fmt.bits in (2, 4, 8) and fmt.scale != "bf16":
                codes = "E4M3 bit patterns" if fmt.kind == "e4m3" else "codes"
                params = "the layer's calibrated scale a constant of the build" if kv_static(fmt) else \
                    "scales, zero points"
                return "native", (f"packed in a static-cache build ({codes} in 32-bit words, {params}; both "
                                  "K and V of a layer packable), read by the decode attention kernel in place")
            return "emulated", "fp32 cache holding the format's values (fake quantization on write)"
        from finegrain.backends.tvm.lower_activations import TvmError, act_format

        try:
            act_format(fmt.tag, "activation")
        except TvmError as e:
            return "refused", str(e).removeprefix("activation: ")
        if fmt.granularity == "group":
            return "emulated", "fake quantization in fp32, scales per group along the row"
        if a8.act_ok(fmt) and partner is not None and a8.weight_ok(partner):
            return "native", "INT8 codes into the integer-dot kernel with the <=4-bit weight (AVX2 and up)"
        return "emulated", "fake quantization in fp32 (native: symmetric INT8 into a <=4-bit weight's integer-dot kernel)"

    def op_capability(self, op: str) -> tuple[str, str]:
        if op == "hadamard":
            return "emulated", "online Hadamard as a dense matmul"
        if op == "conv":
            return "emulated", "quantized conv weight kept packed, dequantized in the graph; fp32 conv"
        if op == "recurrent":
            return "emulated", "LSTM / GRU weights kept packed, dequantized in the graph; fp32 recurrence"
        if op == "kv_append":
            return "emulated", ("the tokens a write releases (KIVI's groups per channel, float window, sinks, "
                                "pre-RoPE / rotated keys, RotateKV's grouped-head / reordered keys, ZipCache's "
                                "saliency-ranked two precisions) quantized in the graph; static builds hold KIVI's, "
                                "RotateKV's grouped-head and ZipCache's packed (ZipCache's codes at the high format's "
                                "width), concat builds "
                                "and the rest an fp32 cache holding the format's values")
        if op == "act_outliers":
            return "emulated", ("activation groups in two precisions (FMPQ): both fake quantizations, the outlier "
                                "groups' columns taken from the 8-bit one")
        if op == "grouped_linear":
            return "emulated", ("mixture-of-experts grouped GEMM as one gather-GEMM over the experts' dequantized "
                                "weights (each row's expert from the offsets)")
        return "refused", f"op {op} has no TVM lowering"

    kv_cache = True  # prefill / decode over past K / V tensors (lower.import_relax)

    def check(self, compiled) -> list[Refusal]:  # and the kv_append variants the windowed write does not cover
        import torch

        # torch.sym_max / sym_min of shape integers (MPT's ALiBi slices start at max(0, n - length)): Relax's
        # strided_slice gives such a slice no shape, and its broadcast with the scores cannot be proven
        sym = next((n for n in compiled.gm.graph.nodes if n.op == "call_function"
                    and n.target in (torch.sym_max, torch.sym_min)), None)
        # likewise any slice starting at a run-time size (GPT-Neo's causal-mask buffer sliced from the past length)
        start = next((n for n in compiled.gm.graph.nodes if n.op == "call_function"
                      and n.target is torch.ops.aten.slice.Tensor and len(n.args) > 2
                      and isinstance(n.args[2], torch.fx.Node)
                      and n.args[2].target not in (torch.sym_max, torch.sym_min)), None)
        return super().check(compiled) + windowed_kv_refusals(compiled.gm, "TVM", zip_ok=True) + [
            Refusal(f"node {n.name}", n.target.__name__, "a slice bound computed by torch.sym_max / sym_min (MPT's "
                    "ALiBi) has no TVM lowering: its result's shape is not derivable in Relax") for n in [sym] if n] + [
            Refusal(f"node {n.name}", f"slice from {n.args[2].name}", f"a slice of {n.args[0].name} starting at a "
                    "run-time size (e.g. a fixed causal-mask buffer sliced from the past length, GPT-Neo) has no TVM "
                    "lowering: its result's shape is not derivable in Relax") for n in [start] if n]

    def check_inputs(self, input_specs: list[dict]) -> list[Refusal]:
        from finegrain.compiler.capture import is_kv_specs

        if is_kv_specs(input_specs):
            bad = [s for s in input_specs if s["shape"][0] != 1 or (s["name"].startswith("past_") and s["dtype"] != "float32")]
            return [Refusal("inputs", f"{s['name']} {s['dtype']} {s['shape']}", "the TVM KV-cache build takes batch 1 "
                            "and an fp32 cache") for s in bad[:1]]
        from finegrain.backends.tvm.lower import is_tensor_specs

        if is_tensor_specs(input_specs):  # images / features: one function over the declared dims
            return []
        if len(input_specs) != 1 or input_specs[0]["dynamic_dims"] != [1] or input_specs[0]["dtype"] not in (
                "int64", "int32"):
            return [Refusal("inputs", ", ".join(f"{s['name']} {s['dtype']}" for s in input_specs),
                            "the TVM build takes one token-id input whose dim 1 (sequence) is dynamic, or float "
                            "tensor inputs")]
        return []

    def session(self, compiled, **options):
        from finegrain.backends.tvm.deploy import TvmSession

        if options.get("path") is None:
            self.require(compiled)
        return TvmSession(compiled, **options)

    def export(self, compiled, out, **options) -> dict:
        from finegrain.backends.tvm.deploy import build_deployment, parse_target

        options["target"] = parse_target(options.get("target"))  # a bad target first: it needs no model
        self.require(compiled)
        return build_deployment(compiled, out, **options)

    def recognizes(self, path: Path) -> bool:
        from finegrain.backends.tvm.deploy import is_deployment

        return is_deployment(path)

    def load(self, path: Path, artifact_loader=None, **options):
        from finegrain.backends.tvm.deploy import TvmDeployment

        return TvmDeployment(path, **options)


BACKEND = TvmBackend()
