"""Models whose weights stay on disk: the empty model block-by-block compilation captures
(``driver/stream.py``), matched against a checkpoint that reads one tensor at a time
(``io/checkpoint.SafetensorsCheckpoint``, ``models/gguf_llama.GGUFCheckpoint``: ``keys()``,
``shape(name)``, ``load(name)`` -> float32, ``path``)."""
from __future__ import annotations

import torch

from finegrain.errors import InputError


def empty_model(config, checkpoint, where: str, model_cls=None) -> tuple[torch.nn.Module, dict[str, str]]:
    """A ``transformers`` causal LM (``model_cls``, else ``AutoModelForCausalLM``) built from ``config``
    with **empty** float32 parameters: ``torch.empty`` pages nothing ever writes take no memory, and
    export reads only their shapes; buffers computed at construction (rotary tables) are real. Returns
    (model in eval mode, {parameter name: checkpoint key}); tied parameters share one tensor and may be
    stored once. The checkpoint must cover the model exactly (names and shapes, from its headers);
    anything else is an InputError naming the tensors."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers real
            if model_cls is None:
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
            else:
                model = model_cls(config).float()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as e:
        raise InputError(f"{where}: transformers cannot build this model ({type(e).__name__}: {str(e)[:300]})") from None
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # outside the context: its patched register_parameter would not share the tensor
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    empty: dict[int, torch.nn.Parameter] = {}
    for mod in model.modules():
        for n, p in list(mod._parameters.items()):
            if p is not None:
                if id(p) not in empty:
                    empty[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=torch.float32), requires_grad=False)
                mod._parameters[n] = empty[id(p)]
    keys, problems = {}, []
    stored_keys = set(checkpoint.keys())
    for names in aliases.values():
        stored = [n for n in names if n in stored_keys]
        if not stored:
            problems.append(f"missing {names[0]}")
            continue
        for n in names:
            keys[n] = stored[0]
        want = tuple(model.get_parameter(names[0]).shape)
        if tuple(checkpoint.shape(stored[0])) != want:
            problems.append(f"{stored[0]} is {list(checkpoint.shape(stored[0]))}, the model needs {list(want)}")
    extra = sorted(stored_keys - set(keys.values()) - {n for ns in aliases.values() for n in ns})
    problems += [f"unexpected {k}" for k in extra[:4]]
    if problems:
        raise InputError(f"{where}: the checkpoint does not match the {type(model).__name__} its config describes "
                         f"({'; '.join(problems[:6])}{' ...' if len(problems) > 6 else ''})")
    return model.eval(), keys
