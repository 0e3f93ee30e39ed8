"""Loaders for real checkpoints (offline) and small reference models.

``load_model(spec)`` takes a bundled name (``smollm2-135m``, ``minilm-l6``), a local Hugging
Face model directory (config.json + safetensors), a model in the local Hugging Face cache by its
``org/name`` (offline), a ``.gguf`` file of any family ``transformers`` reads (dequantized to fp32) or a float ONNX file (``models/onnx_import.py``;
its tokenizer is read from the file's directory when ``tokenizer.json`` is there) and returns a
:class:`LoadedModel`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from finegrain.errors import InputError


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    task: str  # "causal-lm" | "encoder" | "tensor" (float inputs: calibration / evaluation tensors from a file)
    source: dict  # how to find it again; goes into the artifact manifest
    weights: Any = None  # load_hf_lazy: the checkpoint the empty parameters are read from, block by block
    weight_names: dict | None = None  # load_hf_lazy: parameter name -> checkpoint key (tied weights stored once)

    @property
    def max_seq_len(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", None) or 2048)


def _bundled() -> dict[str, Callable[[], LoadedModel]]:
    from finegrain.models.bundled import load_minilm, load_smollm2

    return {"smollm2-135m": load_smollm2, "minilm-l6": load_minilm}


BUNDLED_NAMES = ("smollm2-135m", "minilm-l6")
DEFAULT_MODEL = "smollm2-135m"


def load_model(spec: str | Path) -> LoadedModel:
    """A bundled model by name, or a local Hugging Face model directory."""
    spec = str(spec)
    if spec in BUNDLED_NAMES:
        return _bundled()[spec]()
    path = Path(spec)
    if path.suffix == ".onnx" and path.is_file():
        return _load_onnx_file(path)
    if path.suffix == ".gguf" and path.is_file():
        return _load_gguf_file(path)
    if path.is_dir():
        from finegrain.models.hf_dir import load_hf_dir

        return load_hf_dir(path)
    cached = hf_cache_snapshot(spec)
    if cached is not None:
        from finegrain.models.hf_dir import load_hf_dir

        loaded = load_hf_dir(cached)
        loaded.source = {**loaded.source, "hub_id": spec}
        return loaded
    raise InputError(f"model {spec!r} is neither a bundled model ({', '.join(BUNDLED_NAMES)}), a local "
                     "Hugging Face model directory, a model in the local Hugging Face cache (org/name), a .gguf file "
                     "nor an .onnx file")


def load_model_lazy(spec: str | Path) -> LoadedModel:
    """A model whose weights stay on disk until block-by-block compilation reads them
    (``driver/stream.py``, ``finegrain quantize --stream``): a local Hugging Face causal-LM directory
    or one in the local Hugging Face cache (safetensors), or a Llama / Qwen2 ``.gguf`` file (each tensor
    dequantized when read; the bundled ``smollm2-135m`` is one). ``LoadedModel.weights`` is the checkpoint; the model's parameters are empty."""
    spec = str(spec)
    path = Path(spec)
    if spec == "smollm2-135m":  # the bundled GGUF file
        from finegrain.models.bundled import SMOLLM2_DIST, SMOLLM2_FILE, _locate

        path = _locate(SMOLLM2_DIST, SMOLLM2_FILE)
    if path.suffix == ".gguf" and path.is_file():
        arch = gguf_architecture(path)
        if arch not in OWN_GGUF_ARCHS:
            raise InputError(f"{path}: --stream reads GGUF architectures {', '.join(OWN_GGUF_ARCHS)} tensor by tensor; "
                             f"this file is {arch!r} (compile it whole, without --stream)")
        from finegrain.models.gguf_llama import GGUFCheckpoint
        from finegrain.models.lazy import empty_model

        try:
            ckpt = GGUFCheckpoint(path)
        except (ValueError, KeyError, IndexError, TypeError, OSError, RuntimeError) as e:
            raise InputError(f"{path}: not a GGUF file finegrain can load ({type(e).__name__}: {str(e)[:300]})") from None
        model, keys = empty_model(ckpt.config, ckpt, str(path), model_cls=ckpt.model_cls)
        loaded = gguf_tokenizer(path)
        return LoadedModel(model, loaded, "causal-lm", {"model": str(path.resolve()), "format": "gguf",
                                                        "gguf_architecture": arch}, weights=ckpt, weight_names=keys)
    from finegrain.models.hf_dir import load_hf_lazy

    where = path if path.is_dir() else hf_cache_snapshot(spec)
    if where is None:
        raise InputError(f"--stream: {spec!r} is not a local Hugging Face model directory (config.json + safetensors), "
                         "a model in the local Hugging Face cache, nor a Llama / Qwen2 .gguf file")
    return load_hf_lazy(where)


def gguf_tokenizer_cache(path: Path) -> Path:
    """Where :func:`gguf_tokenizer` keeps the tokenizer it converted from the GGUF file ``path``:
    ``$FINEGRAIN_CACHE`` (default ``~/.cache/finegrain``) / one folder per file (name, resolved path,
    size, mtime) and ``transformers`` version."""
    import hashlib

    import transformers

    from finegrain.io.files import cache_dir

    path = Path(path).resolve()
    st = path.stat()
    where = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    return cache_dir() / f"tokenizer-{path.stem}-{where}-{st.st_size}-{st.st_mtime_ns}-transformers{transformers.__version__}"


def gguf_tokenizer(path: Path):
    """The tokenizer in a GGUF file's header, or None when it has none transformers reads (token ids
    only). ``transformers`` converts it from the header (~10 s for SmolLM2's 49,152 tokens and merges);
    the first load saves the result as an ordinary tokenizer folder (``tokenizer.json``: data, loaded
    without remote code) in :func:`gguf_tokenizer_cache` and later loads read that (~0.5 s). A damaged
    cache is converted again and replaced; where the cache cannot be written it is converted each time."""
    import shutil

    from transformers import AutoTokenizer

    from finegrain.io.files import atomic_directory

    path = Path(path)
    cache = gguf_tokenizer_cache(path)
    if cache.exists():
        try:
            return AutoTokenizer.from_pretrained(str(cache), local_files_only=True)
        except Exception:  # noqa: BLE001 - a damaged cache, whatever its damage: converted again below
            shutil.rmtree(cache, ignore_errors=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception:  # noqa: BLE001 - a GGUF without a tokenizer transformers reads: token ids only
        return None
    try:
        with atomic_directory(cache) as tmp:
            tok.save_pretrained(str(tmp))
    except (OSError, InputError):  # a read-only home, or another process saved it first
        pass
    return tok


def hf_cache_snapshot(spec: str) -> Path | None:
    """The local snapshot of ``org/name`` in the Hugging Face cache (``models--org--name/snapshots/…``,
    ``HF_HUB_CACHE`` / ``HF_HOME`` honoured), offline: never the network; None when not cached."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*", spec) or ".." in spec:
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    import os

    cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME")
                                                else None)
    try:
        return Path(snapshot_download(spec, local_files_only=True, cache_dir=cache))
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None


OWN_GGUF_ARCHS = ("llama", "qwen2")  # read by models/gguf_llama.py; the rest by transformers' GGUF loader


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file (header only)."""
    from finegrain.io.gguf_file import read_gguf

    try:
        reader = read_gguf(path)
        field = reader.fields["general.architecture"]
        return str(field.contents())
    except (ValueError, KeyError, IndexError, TypeError, OSError, RuntimeError) as e:
        raise InputError(f"{path}: not a GGUF file finegrain can read ({type(e).__name__}: {str(e)[:300]})") from None


def _load_gguf_file(path: Path) -> LoadedModel:
    """Llama / Qwen2 GGUF files through finegrain's own reader (exact Q/K un-permutation); every other
    family ``transformers`` can dequantize (Qwen3, Phi-3, Gemma 2/3, Mistral, StableLM, Falcon, …)
    through ``transformers``' GGUF loader, in fp32. No pickle either way: GGUF is a flat tensor file."""
    arch = gguf_architecture(path)
    if arch in OWN_GGUF_ARCHS:
        from finegrain.models.gguf_llama import load_gguf_llama

        try:
            model = load_gguf_llama(path)
        except (ValueError, KeyError, IndexError, TypeError, OSError, RuntimeError) as e:  # parse / shape errors
            raise InputError(f"{path}: not a GGUF file finegrain can load ({type(e).__name__}: {str(e)[:300]})") from None
    else:
        model = _load_gguf_transformers(path, arch)
    tokenizer = gguf_tokenizer(path)
    return LoadedModel(model, tokenizer, "causal-lm", {"model": str(path.resolve()), "format": "gguf",
                                                       "gguf_architecture": arch})


def _load_gguf_transformers(path: Path, arch: str) -> torch.nn.Module:
    import logging

    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    supported = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})
    if arch not in supported:
        raise InputError(f"{path}: GGUF architecture {arch!r} is not one transformers can dequantize "
                         f"({', '.join(supported)})")
    quiet = logging.getLogger("transformers.modeling_utils")
    level = quiet.level
    try:
        quiet.setLevel(logging.ERROR)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True,
                                                     trust_remote_code=False, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for a bad / unsupported file; one line for the user
        raise InputError(f"{path}: transformers could not load this {arch} GGUF file ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''})") from None
    finally:
        quiet.setLevel(level)
    return model.eval()


def _load_onnx_file(path: Path) -> LoadedModel:
    from finegrain.models.onnx_import import load_onnx

    module = load_onnx(path)
    tokenizer = None
    if (path.parent / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), local_files_only=True, trust_remote_code=False)
    # float inputs (images, features): a tensor model, calibrated / evaluated on tensors the user gives
    task = "tensor" if any(module.input_float) else "causal-lm" if len(module.input_names) == 1 else "encoder"
    return LoadedModel(module, tokenizer, task, {"model": str(path), "format": "onnx",
                                                 "inputs": module.input_names})
