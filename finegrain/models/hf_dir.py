"""Load a local Hugging Face model directory (config.json + safetensors), never the network and
never code from the directory: ``trust_remote_code=False`` everywhere, a config or tokenizer
config with ``auto_map`` (custom modelling code) is refused, and a checkpoint whose weights do not
cover the model exactly (missing, unexpected or mis-shaped tensors) is an error instead of a model
with silently random-initialized layers."""
from __future__ import annotations

from pathlib import Path

from finegrain.errors import FinegrainError, InputError
from finegrain.models import LoadedModel
from finegrain.io.files import read_json_file

MAX_CONFIG_BYTES = 16 << 20


def _config_json(path: Path, name: str) -> dict:
    try:
        d = read_json_file(path / name, MAX_CONFIG_BYTES)
    except FinegrainError as e:
        raise InputError(str(e)) from None
    if not isinstance(d, dict):
        raise InputError(f"{path / name}: must hold a JSON object")
    if "auto_map" in d:
        raise InputError(f"{path / name} has 'auto_map': the model needs its own Python code from the directory; "
                         "finegrain never runs code shipped with a model (trust_remote_code=False). Use a "
                         "transformers architecture or export the model to ONNX")
    return d


def load_hf_dir(path: str | Path) -> LoadedModel:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputError(f"{path} is not a Hugging Face model directory: config.json is missing")
    if not list(path.glob("*.safetensors")):
        extra = " (only .bin weights found: convert them to safetensors; finegrain does not unpickle)" \
            if list(path.glob("*.bin")) else ""
        raise InputError(f"{path} has no weights: no *.safetensors file{extra}")
    archs = _config_json(path, "config.json").get("architectures") or []
    has_tokenizer = (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    if (path / "tokenizer_config.json").is_file():
        _config_json(path, "tokenizer_config.json")
    causal = isinstance(archs, list) and any(isinstance(a, str) and a.endswith("ForCausalLM") for a in archs)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        cls = AutoModelForCausalLM if causal else AutoModel
        model, info = cls.from_pretrained(str(path), config=config, local_files_only=True, dtype="float32",
                                          use_safetensors=True, trust_remote_code=False, output_loading_info=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as e:
        raise InputError(f"{path}: transformers cannot load this model ({type(e).__name__}: {str(e)[:300]})") from None
    problems = [(k, sorted(info.get(k) or [])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")]
    problems = [(k, v) for k, v in problems if v]
    if problems:
        detail = "; ".join(f"{k.replace('_', ' ')} ({len(v)}): {', '.join(map(str, v[:4]))}"
                           f"{' ...' if len(v) > 4 else ''}" for k, v in problems)
        raise InputError(f"{path}: the checkpoint does not match the {type(model).__name__} its config describes "
                         f"({detail}); refusing to quantize a model with randomly initialized or dropped weights")
    tokenizer = None
    if has_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        except Exception as e:  # tokenizers raises its own exception types
            raise InputError(f"{path}: the tokenizer does not load ({type(e).__name__}: {str(e)[:300]})") from None
    return LoadedModel(model.eval(), tokenizer, "causal-lm" if causal else "encoder", {"model": str(path.resolve())})


def load_hf_lazy(path: str | Path) -> LoadedModel:
    """A local Hugging Face causal-LM directory for block-by-block compilation (``--stream``): the
    model is built with **empty** parameters (``torch.empty``: no memory until written, and nothing
    writes them) and its weights stay in the safetensors files (``LoadedModel.weights``, an
    ``io.checkpoint.SafetensorsCheckpoint``) until ``driver/stream.py`` reads each block's. The
    checkpoint must cover the model exactly (names and shapes, from the headers alone); tied weights
    may be stored once. Same refusals as :func:`load_hf_dir` (no ``auto_map``, no pickle)."""
    from transformers import AutoConfig, AutoTokenizer

    from finegrain.io.checkpoint import SafetensorsCheckpoint
    from finegrain.models.lazy import empty_model

    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputError(f"{path} is not a Hugging Face model directory: config.json is missing")
    archs = _config_json(path, "config.json").get("architectures") or []
    if not (isinstance(archs, list) and any(isinstance(a, str) and a.endswith("ForCausalLM") for a in archs)):
        raise InputError(f"{path}: block-by-block compilation (--stream) takes causal LMs (config 'architectures' "
                         f"ending in ForCausalLM), got {archs!r}")
    ckpt = SafetensorsCheckpoint(path)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as e:
        raise InputError(f"{path}: transformers cannot read this config ({type(e).__name__}: {str(e)[:300]})") from None
    model, keys = empty_model(config, ckpt, str(path))
    tokenizer = None
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        if (path / "tokenizer_config.json").is_file():
            _config_json(path, "tokenizer_config.json")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        except Exception as e:  # tokenizers raises its own exception types
            raise InputError(f"{path}: the tokenizer does not load ({type(e).__name__}: {str(e)[:300]})") from None
    return LoadedModel(model, tokenizer, "causal-lm", {"model": str(path.resolve())}, weights=ckpt, weight_names=keys)
