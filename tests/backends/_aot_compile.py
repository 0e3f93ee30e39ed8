"""Compile recorded Triton kernel launches ahead of time for an NVIDIA target, without a GPU
(``test_gpu_kernels.test_every_launched_kernel_compiles_for_hopper`` runs it in a subprocess, off the
interpreter, so the kernels are Triton's ``JITFunction``s): ``python _aot_compile.py LAUNCHES.jsonl
[ARCH]``. Each line: ``{"module", "name", "types": {arg: "*fp32" | "i32" | "none" ..}, "consts":
{arg: value}}``. Prints ``compiled N failed M`` and, per failing kernel, its constexprs and error.
The launches compile in a process per core (each compile is single-threaded Python and LLVM)."""
import importlib
import json
import os
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def _compile(line: str, arch: int):
    """None, or (kernel name, constexprs, error) for one recorded launch."""
    r = json.loads(line)
    fn = getattr(importlib.import_module(r["module"]), r["name"])
    sig, consts = {}, dict(r["consts"])
    for name in fn.arg_names:
        t = r["types"].get(name, "constexpr")
        if t == "none":  # an absent optional pointer: Triton specializes None as a constexpr
            t, consts[name] = "constexpr", None
        sig[name] = t
    try:
        k = triton.compile(ASTSource(fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32))
        if "cubin" not in k.asm:
            raise RuntimeError("no cubin")
        return None
    except Exception as e:  # noqa: BLE001 - report every kernel's failure, then fail
        msg = " | ".join(x.strip() for x in "".join(traceback.format_exception_only(type(e), e)).splitlines()
                         if x.strip())
        return r["name"], r["consts"], msg[-800:]


def main() -> None:
    arch = int(sys.argv[2]) if len(sys.argv) > 2 else 90
    lines = [line for line in open(sys.argv[1]) if line.strip()]
    with ProcessPoolExecutor(max_workers=max(1, min(len(os.sched_getaffinity(0)), 8))) as pool:
        bad = [b for b in pool.map(_compile, lines, [arch] * len(lines)) if b is not None]
    print(f"compiled {len(lines) - len(bad)} failed {len(bad)} (Triton {triton.__version__}, sm_{arch})")
    for name, consts, msg in bad:
        print(f"FAILED {name} {consts}: {msg}")


if __name__ == "__main__":
    main()
