"""Load a local Hugging Face model directory (config.json + safetensors), never the network."""
from __future__ import annotations

import json
from pathlib import Path

from finegrain.errors import InputError
from finegrain.models import LoadedModel


def load_hf_dir(path: str | Path) -> LoadedModel:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputError(f"{path} is not a Hugging Face model directory: config.json is missing")
    if not list(path.glob("*.safetensors")):
        extra = " (only .bin weights found: convert them to safetensors; finegrain does not unpickle)" \
            if list(path.glob("*.bin")) else ""
        raise InputError(f"{path} has no weights: no *.safetensors file{extra}")
    archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    causal = any(a.endswith("ForCausalLM") for a in archs)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    cls = AutoModelForCausalLM if causal else AutoModel
    model = cls.from_pretrained(str(path), config=config, local_files_only=True, dtype="float32",
                                use_safetensors=True).eval()
    tokenizer = None
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return LoadedModel(model, tokenizer, "causal-lm" if causal else "encoder", {"model": str(path.resolve())})
