"""Ahead-of-time TVM deployments: ``cm.build(out=...)`` / ``finegrain build`` write a directory

    manifest.json   what it is: format version, inputs, functions, parameter order, target, TVM
                    version, the quantization it carries, build report, SHA-256 of every file
    model.so        the compiled Relax VM executable (``tvm.runtime.load_module``)
    params.bin      the weights in TVM's parameter format (``tvm.runtime.load_param_dict``;
                    no pickle), packed low-bit codes as int32 words, fp32 scales
    tokenizer/      when the model has one
    tuning/         MetaSchedule's database when built with ``tune_trials`` > 0 (reused by the
                    next build into the same directory)

The executable has two functions taking ``(input_ids, *params)``: ``decode`` (one token) and
``prefill`` (2 ..max_seq_len tokens); a model with float inputs (images, features) has one,
``main``, taking its inputs with the dims the artifact declares dynamic (manifest ``inputs``). A KV-cache build (``compile(kv_cache=True)``; manifest
``kv``) takes ``(input_ids, position_ids, past_key_0, past_value_0, ..., *params)``; a generation
costs one ``prefill`` and one ``decode`` per new token. With ``kv.cache == "static"`` (the
default, ``lower_cache.py``) the pasts are views ``[1, past, kv_heads, head_dim]`` of one
preallocated ``[1, max_seq_len, kv_heads, head_dim]`` buffer per layer for K and for V, and the
functions return ``(logits, new_key_0, new_value_0, ...)``, written into the buffers at the cache
position; with ``"concat"`` they return ``(logits, present_key_0, ...)`` (past + new,
``[batch, kv_heads, seq, head_dim]``), the next call's past. :meth:`TvmDeployment.run_all` keeps
the artifact's contract (head-major pasts in, presents out) for either. :class:`TvmDeployment` (``finegrain.load`` returns one
for such a directory) runs it with only ``tvm.runtime`` (and torch for tensors in/out);
``examples/run_tvm_deploy.py`` generates text from a KV-cache build the same way without finegrain
(TVM runtime, numpy, the ``tokenizers`` package).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from finegrain.backends.base import Artifact, Session
from finegrain.errors import ArtifactError, InputError
from finegrain.io.files import (atomic_directory, dumps_json, file_records, load_listed_tokenizer,
                                     read_json_file, verify_files)

DEPLOY_VERSION = 2  # 2: files carry their byte counts
MANIFEST, LIB, PARAMS, TOKENIZER, TUNING = "manifest.json", "model.so", "params.bin", "tokenizer", "tuning"
CACHES = ("static", "concat")  # how a KV-cache build holds the cache (lower_cache.py)


def parse_target(target: str | dict | None) -> dict:
    """``None`` / ``"llvm"`` -> this machine's CPU; a dict or a JSON object string -> itself."""
    from finegrain.backends.tvm.build import host_target

    if target is None or target == "llvm":
        return host_target()
    if isinstance(target, str):
        try:
            target = json.loads(target)
        except json.JSONDecodeError:
            raise InputError(f"target {target!r}: give 'llvm' (this CPU) or a JSON target like "
                             '\'{"kind": "llvm", "mcpu": "znver3", "num-cores": 2}\'') from None
    if not isinstance(target, dict) or target.get("kind") != "llvm":
        raise InputError(f"target {target!r}: only CPU (kind 'llvm') targets are built today")
    check_cpu_target(target)
    return target


def check_cpu_target(target: dict) -> None:
    """Refuse, before any build, an LLVM target this machine's LLVM does not know or cannot run:
    an unknown ``mcpu`` (LLVM would silently build for a generic CPU), a bogus or foreign
    ``mtriple`` (the library is linked and loaded here), a bad ``num-cores``."""
    from tvm.target import codegen

    host = codegen.llvm_get_system_triple()
    triple = target.get("mtriple", host)
    if not isinstance(triple, str) or triple.split("-")[0] not in codegen.llvm_get_targets():
        raise InputError(f"target mtriple {str(triple)[:60]!r} is not a triple this LLVM knows")
    if triple.split("-")[0] != host.split("-")[0]:
        raise InputError(f"target mtriple {triple!r}: deployments are linked and run on this machine ({host}); "
                         "cross-compiling is not supported")
    cpu = target.get("mcpu")
    if cpu is not None and (not isinstance(cpu, str) or not codegen.llvm_is_valid_cpu(cpu, triple)):
        raise InputError(f"target mcpu {str(cpu)[:60]!r} is not a CPU LLVM knows for {triple} (e.g. znver3, "
                         "skylake-avx512, x86-64-v3)")
    cores = target.get("num-cores", 1)
    if not isinstance(cores, int) or isinstance(cores, bool) or not 1 <= cores <= 1024:
        raise InputError(f"target num-cores {cores!r}: must be an integer in [1, 1024]")


def build_deployment(cm, out: str | Path, target: str | dict | None = None, tune_trials: int = 0,
                     max_seq_len: int = 2048, overwrite: bool = False, progress: bool = False,
                     int8: bool = True, cache: str = "static", kv_storage: str = "packed") -> dict:
    """Build ``cm`` (a CompiledModel) into the deployment directory ``out``; returns the manifest.
    ``int8=False`` keeps W(<=4)A8 linears on the fp32-compute kernel (for comparisons). ``cache``
    (KV-cache artifacts): ``"static"`` preallocated buffers written in place (``lower_cache.py``)
    or ``"concat"`` (the graph's own past + new concatenation; kept for comparisons). ``kv_storage``
    (static caches of a quantized KV cache): ``"packed"`` holds the layers that pack as codes
    (``lower_cache.pack_cache``, ``window_cache.py``), ``"float"`` every layer in an fp32 cache of the
    formats' values (the same logits: 4-13x the memory, for builds whose packed decode is slower,
    such as RotateKV's grouped heads, whose decode takes each past key back through the grouped
    rotation every step)."""
    import tvm

    from finegrain.version import __version__
    from finegrain.backends.tvm.build import build_executable
    from finegrain.backends.tvm.lower import import_relax

    target = parse_target(target)
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists; pass overwrite=True (--overwrite) to replace it (its tuning/ database "
                         "is then reused)")
    from finegrain.backends.tvm.lower import is_tensor_specs

    kv = getattr(cm, "kv", None)
    if kv:
        max_seq_len = min(max_seq_len, kv["max_seq_len"])
    if cache not in CACHES:
        raise InputError(f"cache {cache!r}: one of {list(CACHES)}")
    if kv_storage not in ("packed", "float"):
        raise InputError(f"kv_storage {kv_storage!r}: 'packed' (the formats' codes) or 'float' (an fp32 cache)")
    t0 = time.perf_counter()
    buffers: list = []
    unpacked: list = []  # windowed KV layers a static cache keeps in fp32, and why
    mod, params, kernels = import_relax(cm.gm, cm.input_specs, max_seq_len, target, int8=int8, cache=cache,
                                        kv_buffers=buffers, kv_unpacked=unpacked, kv_storage=kv_storage)
    functions = ({"main": {"inputs": "as declared (inputs[].dims)"}} if is_tensor_specs(cm.input_specs) else
                 {"decode": {"seq_len": [1, 1]}, "prefill": {"seq_len": [2, max_seq_len]}})
    import_s = time.perf_counter() - t0
    with atomic_directory(out, overwrite) as tmp:
        if tune_trials > 0 and (out / TUNING).is_dir():
            shutil.copytree(out / TUNING, tmp / TUNING)
        ex, report = build_executable(mod, target, tune_trials, tmp / TUNING, progress=progress)
        report["import_s"] = round(import_s, 2)
        ex.export_library(str(tmp / LIB))
        tvm.runtime.save_param_dict_to_file({name: tvm.runtime.tensor(t.detach().numpy()) for name, t in params},
                                            str(tmp / PARAMS))
        if cm.tokenizer is not None:
            cm.tokenizer.save_pretrained(str(tmp / TOKENIZER))
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*")
                       if p.is_file() and not p.relative_to(tmp).as_posix().startswith(TUNING + "/"))
        report["total_s"] = round(time.perf_counter() - t0, 2)
        manifest = {
            "finegrain_tvm_deploy": DEPLOY_VERSION,
            "finegrain_version": __version__,
            "tvm_version": tvm.__version__,
            "target": target,
            "inputs": cm.input_specs,
            "functions": functions,
            "params": [name for name, _ in params],
            **({"kv": {**kv, "max_seq_len": max_seq_len, "cache": cache,
                       **({"buffers": buffers} if cache == "static" else {}),
                       **({"fp32_windowed": unpacked} if unpacked else {})}} if kv else {}),
            "kernels": kernels,
            "recipe": cm.recipe.to_dict(),
            "source": cm.source,
            "quantized": cm.quantized,
            "build": report,
            "files": file_records(tmp, files),
        }
        (tmp / MANIFEST).write_text(dumps_json(manifest))
    return manifest


_BUFFER_DTYPES = ("float32", "float16", "int32", "uint8")


def _check_buffers(kv: dict, where: str) -> list[dict]:
    """A static build's cache buffers from its manifest (data: names, dtypes, widths); a build from
    before packed caches lists none and holds fp32 ``[.., head_dim]`` per layer, K then V."""
    bufs = kv.get("buffers")
    if bufs is None:
        return [{"name": f"past_{k}_{i}", "dtype": kv["dtype"], "width": kv["head_dim"]}
                for i in range(kv["layers"]) for k in ("key", "value")]
    if not isinstance(bufs, list) or not 2 * kv["layers"] <= len(bufs) <= 8 * kv["layers"]:
        raise ArtifactError(f"{where}: expected a list of 2..8 buffers per layer")
    for i, b in enumerate(bufs):
        if (not isinstance(b, dict) or b.get("dtype") not in _BUFFER_DTYPES or not isinstance(b.get("width"), int)
                or isinstance(b.get("width"), bool) or not 0 < b["width"] <= 4 * kv["head_dim"]):
            raise ArtifactError(f"{where}[{i}]: needs a dtype among {list(_BUFFER_DTYPES)} and a width in "
                                f"1..{4 * kv['head_dim']}")
        rows = b.get("rows")
        if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or not 0 < rows <= kv["max_seq_len"]):
            raise ArtifactError(f"{where}[{i}]: 'rows' (a ring buffer's fixed length) must be an int in "
                                f"1..{kv['max_seq_len']}")
    return bufs


def is_deployment(path: str | Path) -> bool:
    mf = Path(path) / MANIFEST
    if not mf.is_file():
        return False
    try:
        m = read_json_file(mf)
    except ArtifactError:
        return False
    return isinstance(m, dict) and "finegrain_tvm_deploy" in m


class TvmDeployment(Session, Artifact):
    """A built deployment, loaded with the TVM runtime: ``dep(input_ids)`` -> logits (torch). It is
    both the loaded artifact (``backend == "tvm"``) and its own session.

    A deployment is code (``model.so`` runs when loaded): construct one only for a directory you
    trust. ``finegrain.load`` returns one only with ``allow_native=True``."""

    backend = "tvm"
    cache_buffers: list = []  # a static build's cache buffers (manifest kv.buffers)

    def __init__(self, path: str | Path, threads: int | None = None):
        import tvm

        from finegrain.io.signature import check_input_specs

        path = Path(path)
        manifest = read_json_file(path / MANIFEST)
        if not isinstance(manifest, dict):
            raise ArtifactError(f"{path / MANIFEST}: must hold a JSON object")
        version = manifest.get("finegrain_tvm_deploy")
        if version != DEPLOY_VERSION:
            raise ArtifactError(f"{path}: deployment version {version!r} is not supported (this finegrain reads "
                                f"{DEPLOY_VERSION})")
        verify_files(path, manifest.get("files"), required=(LIB, PARAMS))
        check_input_specs(manifest.get("inputs"), f"{path / MANIFEST}: inputs")
        funcs = manifest.get("functions")
        tensor = isinstance(funcs, dict) and set(funcs) == {"main"}  # a tensor-input model: one function
        if (not isinstance(funcs, dict) or not funcs or not isinstance(manifest.get("params"), list)
                or not (tensor or all(isinstance(v, dict) and isinstance(v.get("seq_len"), list)
                                      and len(v["seq_len"]) == 2 and all(isinstance(x, int) for x in v["seq_len"])
                                      for v in funcs.values()))):
            raise ArtifactError(f"{path / MANIFEST}: 'functions' and 'params' are malformed")
        if threads:
            import os

            os.environ["TVM_NUM_THREADS"] = str(threads)
        self.path, self.manifest = path, manifest
        self.input_specs = manifest["inputs"]
        self.quantized = manifest.get("quantized", {})
        self.source = manifest.get("source", {})
        self.max_seq_len = None if tensor else max(f["seq_len"][1] for f in funcs.values())
        self.recipe_name = (manifest.get("recipe") or {}).get("name")
        dev = tvm.cpu()
        self.vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(path / LIB)), dev)
        params = tvm.runtime.load_param_dict_from_file(str(path / PARAMS))
        missing = [n for n in manifest["params"] if n not in params]
        if missing:
            raise ArtifactError(f"{path / PARAMS}: parameters {missing[:3]} listed in the manifest are missing")
        self.params = [params[n] for n in manifest["params"]]
        self.dev = dev
        self.tokenizer = load_listed_tokenizer(path, manifest["files"], TOKENIZER)
        self.kv = manifest.get("kv")
        if self.kv is not None:
            from finegrain.compiler.capture import check_kv_layout

            check_kv_layout(self.kv, self.input_specs, str(path / MANIFEST))
            if self.kv.get("cache", "concat") not in CACHES:
                raise ArtifactError(f"{path / MANIFEST}: kv 'cache' must be one of {list(CACHES)}")
            if self.static_cache:
                self.cache_buffers = _check_buffers(self.kv, f"{path / MANIFEST}: kv 'buffers'")
            self.max_seq_len = min(self.max_seq_len, self.kv["max_seq_len"])

    def function_for(self, seq_len: int) -> str:
        for name, spec in self.manifest["functions"].items():
            lo, hi = spec["seq_len"]
            if lo <= seq_len <= hi:
                return name
        hi = max(s["seq_len"][1] for s in self.manifest["functions"].values())
        raise InputError(f"{self.path}: sequence length {seq_len} is outside what was built (1..{hi}); rebuild with a "
                         "larger max_seq_len (--max-seq-len)")

    def _call(self, inputs: list) -> tuple:
        """Run the function for ``inputs[0]``'s length on TVM tensors; the outputs as TVM tensors."""
        import tvm

        fn = "main" if self.max_seq_len is None else self.function_for(int(inputs[0].shape[1]))
        out = self.vm[fn](*inputs, *self.params)
        return (out,) if isinstance(out, tvm.runtime.Tensor) else tuple(out[i] for i in range(len(out)))

    def _tensor(self, x):
        import tvm

        return tvm.runtime.tensor(np.ascontiguousarray(x.detach().cpu().numpy()), self.dev)

    @property
    def static_cache(self) -> bool:
        return bool(self.kv) and self.kv.get("cache", "concat") == "static"

    @property
    def packed_cache(self) -> bool:
        return self.static_cache and any("packed" in b for b in self.cache_buffers)

    def run_all(self, *inputs: torch.Tensor) -> tuple:
        from finegrain.io.signature import check_inputs

        check_inputs(self.input_specs, inputs)
        if self.packed_cache:
            raise InputError(f"{self.path}: this build keeps the KV cache packed (codes and scales); it runs "
                             "through prefill / step / generate, not on float past tensors (build with --cache "
                             "concat for run_all's float presents)")
        if self.static_cache:  # the artifact's contract: head-major pasts in, presents out
            ids, pos, past = inputs[0], inputs[1], inputs[2:]
            start, n = past[0].shape[2], ids.shape[1]
            self.check_room(start, n)
            bufs = self._buffers()
            for b, p in zip(bufs, past):
                self._view(b, 0, start).copyfrom(np.ascontiguousarray(p.transpose(1, 2).numpy()))
            out = self._static_forward(ids, pos, bufs, start)
            return (out[0], *(torch.from_numpy(self._view(b, 0, start + n).numpy()).transpose(1, 2).contiguous()
                              for b in bufs))
        return tuple(torch.from_numpy(o.numpy()) for o in self._call([self._tensor(x) for x in inputs]))

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.kv and len(inputs) == 1:  # token ids alone: over an empty past
            return self.kv_forward(inputs[0], None, 0)[0]
        return self.run_all(*inputs)[0]

    def _buffers(self) -> list:
        """A static build's cache: per layer, K then V, ``[1, max_seq_len, kv_heads, head_dim]``
        fp32, or for a packed layer its codes / scales / zero points ``[1, max_seq_len, kv_heads,
        width]`` (manifest ``kv.buffers``)."""
        import tvm

        kv = self.kv
        return [tvm.runtime.empty((1, b.get("rows", kv["max_seq_len"]), kv["kv_heads"], b["width"]), b["dtype"],
                                  self.dev) for b in self.cache_buffers]

    def _view(self, buf, start: int, n: int):
        """Tokens ``start .. start + n`` of a static cache buffer, as a tensor sharing its memory."""
        heads, width, dtype = self.kv["kv_heads"], int(buf.shape[3]), str(buf.dtype)
        return buf._create_view((1, n, heads, width), dtype, start * heads * width * np.dtype(dtype).itemsize)

    def cache_bytes(self, tokens: int) -> int:
        """Bytes a static build's cache holds for ``tokens`` tokens (all layers, K and V)."""
        return sum(b.get("rows", tokens) * self.kv["kv_heads"] * b["width"] * np.dtype(b["dtype"]).itemsize
                   for b in self.cache_buffers)

    def _static_forward(self, ids: torch.Tensor, pos: torch.Tensor, bufs: list, start: int) -> tuple:
        """One call over a static cache: the past is views of ``bufs``' first ``start`` tokens; the
        new keys / values the function returns are written at ``start``. ``(logits, *bufs)``."""
        rings = ["rows" in b for b in self.cache_buffers]  # a packed window's ring: passed whole, written by the call
        out = self._call([self._tensor(ids), self._tensor(pos),
                          *(b if r else self._view(b, 0, start) for b, r in zip(bufs, rings))])
        for b, new in zip([b for b, r in zip(bufs, rings) if not r], out[1:]):
            new.copyto(self._view(b, start, ids.shape[1]))
        return (torch.from_numpy(out[0].numpy()), *bufs)

    def kv_forward(self, ids: torch.Tensor, past, start: int) -> tuple:
        """Over a KV-cache build: ``(logits, *presents)`` with the presents kept as TVM tensors (the
        next step's past is passed back without a copy through torch). A static build's presents
        are its cache buffers (``past`` None: new ones), the new tokens written in place."""
        import tvm

        from finegrain.compiler.capture import kv_inputs
        from finegrain.io.signature import check_inputs

        self.check_room(start, ids.shape[1])
        if self.static_cache:
            check_inputs(self.input_specs[:1], (ids,))
            want = [(1, b.get("rows", self.kv["max_seq_len"]), self.kv["kv_heads"], b["width"])
                    for b in self.cache_buffers]
            if past is not None and (len(past) != len(want) or not all(
                    isinstance(p, tvm.runtime.Tensor) and tuple(p.shape) == w for p, w in zip(past, want))):
                raise InputError(f"{self.path}: a static-cache build continues from the state of its own prefill "
                                 f"({len(want)} cache buffers, the first {list(want[0])})")
            return self._static_forward(ids, kv_inputs(self.kv, ids, [], start)[1],
                                        self._buffers() if past is None else list(past), start)
        if past is None:
            inputs = kv_inputs(self.kv, ids, None, start)
            check_inputs(self.input_specs, inputs)
            args = [self._tensor(x) for x in inputs]
        else:
            check_inputs(self.input_specs[:1], (ids,))
            ids_pos = kv_inputs(self.kv, ids, [], start)
            args = [self._tensor(x) for x in ids_pos] + [p if isinstance(p, tvm.runtime.Tensor) else self._tensor(p)
                                                          for p in past]
        out = self._call(args)
        return (torch.from_numpy(out[0].numpy()), *out[1:])

    def session(self, backend: str = "tvm", **options):
        if backend != "tvm" or options:
            raise InputError(f"{self.path} is a TVM deployment: it runs on backend 'tvm' only, without options")
        return self


class TvmSession(TvmDeployment):
    """``cm.session("tvm", ...)``: builds ``cm`` into a temporary directory and loads it."""

    def __init__(self, cm, target: str | dict | None = None, tune_trials: int = 0, max_seq_len: int = 2048,
                 threads: int | None = None, path: str | Path | None = None, int8: bool = True,
                 cache: str = "static", kv_storage: str = "packed"):
        import tempfile

        self._tmp = None
        if path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="finegrain-tvm-")
            path = Path(self._tmp.name) / "deploy"
            self.build = build_deployment(cm, path, target=target, tune_trials=tune_trials, max_seq_len=max_seq_len,
                                          int8=int8, cache=cache, kv_storage=kv_storage)
        super().__init__(path, threads=threads)
