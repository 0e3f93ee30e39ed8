"""Compile recorded Triton kernel launches ahead of time for an NVIDIA target, without a GPU
(``test_gpu_kernels.test_every_launched_kernel_compiles_for_hopper`` runs it in a subprocess, off the
interpreter, so the kernels are Triton's ``JITFunction``s): ``python _aot_compile.py LAUNCHES.jsonl
[ARCH]``. Each line: ``{"module", "name", "types": {arg: "*fp32" | "i32" | "none" ..}, "consts":
{arg: value}}``. Prints ``compiled N failed M`` and, per failing kernel, its constexprs and error."""
import importlib
import json
import sys
import traceback

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def main() -> None:
    target = GPUTarget("cuda", int(sys.argv[2]) if len(sys.argv) > 2 else 90, 32)
    ok, bad = 0, []
    for line in open(sys.argv[1]):
        r = json.loads(line)
        fn = getattr(importlib.import_module(r["module"]), r["name"])
        sig, consts = {}, dict(r["consts"])
        for name in fn.arg_names:
            t = r["types"].get(name, "constexpr")
            if t == "none":  # an absent optional pointer: Triton specializes None as a constexpr
                t, consts[name] = "constexpr", None
            sig[name] = t
        try:
            k = triton.compile(ASTSource(fn, signature=sig, constexprs=consts), target=target)
            if "cubin" not in k.asm:
                raise RuntimeError("no cubin")
            ok += 1
        except Exception as e:  # noqa: BLE001 - report every kernel's failure, then fail
            msg = " | ".join(x.strip() for x in "".join(traceback.format_exception_only(type(e), e)).splitlines()
                             if x.strip())
            bad.append((r["name"], r["consts"], msg[-800:]))
    print(f"compiled {ok} failed {len(bad)} (Triton {triton.__version__}, sm_{target.arch})")
    for name, consts, msg in bad:
        print(f"FAILED {name} {consts}: {msg}")


if __name__ == "__main__":
    main()
