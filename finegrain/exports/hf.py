"""Write a compiled model as a Hugging Face directory in the **compressed-tensors** schema.

This is the checkpoint llm-compressor writes and vLLM serves (tensor / pipeline parallel on GPUs);
``transformers`` with the ``compressed-tensors`` package loads it on CPU too, which is how the
tests prove it. What goes where:

* integer weights, 1-8 bits, per group (K a multiple of the group), channel or tensor, symmetric or
  asymmetric, float scales: ``pack-quantized`` (``weight_packed`` int32, dense bit packing of the
  codes offset by 2^(bits-1); ``weight_scale``; ``weight_zero_point`` packed along the output dim;
  ``weight_shape``); with INT8 dynamic per-token activations and INT8 weights: ``int-quantized``
  (``weight`` int8) - the W8A8 that vLLM runs on INT8 GEMMs;
* FP8 E4M3 weights per channel / tensor: ``float-quantized`` (``weight`` float8_e4m3fn), with FP8
  dynamic per-token activations when the graph has them;
* NVFP4 (E2M1, E4M3 scales per 16, fp32 tensor scale) and MXFP4 (E8M0 scales per 32) weights:
  ``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized`` (two E2M1 codes per byte), weight-only;
* several formats in one model (mixed bit allocation): one config group per (weight, activation)
  scheme, targets named module by module, top-level format ``mixed-precision``;
* every other tensor dense under its source name; folds are already in the weights (a folded norm's
  weight is written as the identity of its family); the config is the source model's, kept in
  the artifact's manifest at compile time.

A static FP8 KV cache (preset ``kv8-fp8-static``: E4M3, one calibrated scale per layer for keys and
one for values) is written as the config's ``kv_cache_scheme`` and each layer's ``self_attn.k_scale`` /
``v_scale``: the FP8 cache vLLM serves. Dynamic per-token KV quantizers and windowed KV writes (KIVI,
RotateKV, ZipCache) have no form there and are refused by node; they are never dropped silently.

Refused by name, with nothing written: an online Hadamard or grouped MoE GEMM (no per-module form),
a tensor a fold added that the architecture has no place for (e.g. an Outlier Suppression+ shift
bias on a bias-free linear), formats the schema lacks (codebooks, BitMoD, MX INT, DGQ two-level
scales, static activation scales, FP4 activations), groups that do not divide K.

Scales are written in fp32 (finegrain's fp16 scales convert exactly) so the loaded weights equal
finegrain's dequantized weights bit for bit; dynamic activation quantization follows the loading
library's own convention (compressed-tensors: symmetric INT8 scale = max|x| / 127.5, finegrain:
max|x| / 127), so W8A8 logits agree to the activation rounding, not exactly.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from finegrain.errors import ExportError, listed
from finegrain.exports.graph import QuantLinear, read_graph
from finegrain.formats import QuantFormat
from finegrain.io.files import EXPORT_MARKER, atomic_directory, dumps_json
from finegrain.version import __version__

CT_VERSION = "0.20.1"  # the compressed-tensors release whose schema this writes (and the tests load)
FLOAT_SCALES = ("fp16", "fp32", "bf16")


def hf_config_of(cm) -> dict:
    cfg = (cm.source or {}).get("hf_config")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        raise ExportError("this artifact has no Hugging Face config (it was compiled from a model that is not a "
                          "transformers model, or by a finegrain older than the HF export): re-compile it from the "
                          "Hugging Face model")
    if "auto_map" in cfg:
        raise ExportError("the artifact's config has 'auto_map' (custom modelling code); finegrain does not "
                          "write checkpoints that need code to load")
    return copy.deepcopy(cfg)


def _architecture(cfg: dict):
    """(transformers config object, the Auto class that builds it) for a config dict."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    causal = any(isinstance(a, str) and a.endswith("ForCausalLM") for a in cfg.get("architectures") or [])
    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "transformers_version"})
    return config, (AutoModelForCausalLM if causal else AutoModel)


def skeleton(cfg: dict) -> torch.nn.Module:
    """The architecture ``cfg`` describes, on the meta device (no memory, no weights)."""
    try:
        config, auto = _architecture(cfg)
        with torch.device("meta"):
            return auto.from_config(config)
    except (ValueError, KeyError, TypeError, ImportError) as e:
        raise ExportError(f"transformers cannot build the architecture {cfg.get('architectures') or cfg.get('model_type')!r} "
                          f"from the artifact's config ({type(e).__name__}: {str(e)[:200]})") from None


def _identity_norm_weight(model: torch.nn.Module, module: str, name: str, shape) -> torch.Tensor:
    """The weight that makes a (folded) norm's affine the identity, as the family initializes it
    (ones; zeros where the norm scales by 1 + w)."""
    try:
        mod = copy.deepcopy(model.get_submodule(module)).to_empty(device="cpu")
        model._init_weights(mod)
        w = mod.get_parameter(name.rsplit(".", 1)[-1]).detach().float()
        if w.shape == torch.Size(shape):
            return w.clone()
    except (AttributeError, RuntimeError, TypeError, NotImplementedError):
        pass
    return torch.ones(shape)


# ---- schemes -------------------------------------------------------------------------------------
def _activation_args(f: QuantFormat | None) -> dict | None:
    if f is None:
        return None
    if not f.dynamic:
        raise ValueError(f"static activation format {f.tag} (calibrated scales are not exported yet)")
    if f.granularity != "token" or not f.symmetric or f.clip != 1.0:
        raise ValueError(f"activation format {f.tag}: compressed-tensors quantizes activations dynamically per token "
                         "(symmetric, full range) here")
    if f.kind == "int" and f.bits == 8:
        return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    if f.kind == "e4m3":
        return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}
    raise ValueError(f"activation format {f.tag} has no compressed-tensors form (INT8 or FP8 E4M3 per token)")


def _weight_args(f: QuantFormat, k: int) -> dict:
    if f.block_rows:
        raise ValueError(f"weight format {f.tag}: 2-D block scales are not exported to compressed-tensors yet")
    if f.kind == "int":
        if not 1 <= f.bits <= 8:
            raise ValueError(f"weight format {f.tag}: compressed-tensors packs 1-8 bit integers")
        if f.scale not in FLOAT_SCALES:
            raise ValueError(f"weight format {f.tag}: {f.scale} scales (two-level / exponent scales) are not in the "
                             "compressed-tensors integer schema")
        args = {"num_bits": f.bits, "type": "int", "symmetric": f.symmetric, "dynamic": False}
    elif f.kind == "e2m1" and f.granularity == "group" and (f.group_size, f.scale) in ((16, "e4m3"), (32, "e8m0")):
        if k % f.group_size:
            raise ValueError(f"weight format {f.tag}: K = {k} is not a multiple of the group size {f.group_size}")
        nv = f.scale == "e4m3"  # NVFP4: E4M3 block scales and an fp32 tensor scale; MXFP4: E8M0 block scales
        return {"num_bits": 4, "type": "float", "symmetric": True, "group_size": f.group_size,
                "strategy": "tensor_group" if nv else "group", "dynamic": False,
                "scale_dtype": "torch.float8_e4m3fn" if nv else "torch.uint8"}
    elif f.kind == "e4m3":
        if f.granularity not in ("channel", "tensor") or f.scale not in FLOAT_SCALES:
            raise ValueError(f"weight format {f.tag}: FP8 weights export per channel or per tensor")
        args = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
    else:
        raise ValueError(f"weight format {f.tag} ({f.element}) has no compressed-tensors form here (INT1-8, FP8 E4M3, "
                         "NVFP4 e2m1-g16-e4m3, MXFP4 e2m1-g32-e8m0)")
    if f.granularity == "group":
        if k % f.group_size:
            raise ValueError(f"weight format {f.tag}: K = {k} is not a multiple of the group size {f.group_size} "
                             "(compressed-tensors groups must divide K)")
        args.update(strategy="group", group_size=f.group_size)
    elif f.granularity in ("channel", "tensor"):
        args["strategy"] = f.granularity
    else:
        raise ValueError(f"weight format {f.tag}: granularity {f.granularity} is not a weight layout")
    return args


def scheme_of(lin: QuantLinear) -> tuple[str, dict]:
    """(compression format, {"weights": ..., "input_activations": ...}) or ValueError naming why not."""
    if lin.q.codebook is not None:
        raise ValueError(f"weight format {lin.fmt.tag} uses a codebook; compressed-tensors has none")
    if len(lin.shape) != 2:
        raise ValueError(f"weight of shape {lin.shape}; the export covers 2-D linear weights")
    weights = _weight_args(lin.fmt, lin.shape[1])
    if lin.fmt.kind == "e2m1":
        if lin.activation is not None:
            raise ValueError(f"FP4 weights with {lin.activation.tag} activations: finegrain's FP4 activations take their "
                             "scales at run time, compressed-tensors' NVFP4 / MXFP4 activations need calibrated global "
                             "scales (weight-only FP4 exports)")
        fmt_name = "nvfp4-pack-quantized" if lin.fmt.scale == "e4m3" else "mxfp4-pack-quantized"
        return fmt_name, {"weights": weights, "input_activations": None}
    acts = _activation_args(lin.activation)
    if lin.fmt.kind == "e4m3":
        if acts is not None and acts["type"] != "float":
            raise ValueError(f"FP8 weights with {lin.activation.tag} activations: no compressed-tensors form")
        return "float-quantized", {"weights": weights, "input_activations": acts}
    if acts is not None and acts["type"] == "float":
        raise ValueError(f"integer weights with FP8 activations ({lin.activation.tag}): no compressed-tensors form")
    if acts is not None and lin.fmt.bits == 8:
        return "int-quantized", {"weights": weights, "input_activations": acts}
    return "pack-quantized", {"weights": weights, "input_activations": acts}


# ---- tensors -------------------------------------------------------------------------------------
def pack_int32(values: np.ndarray, bits: int) -> np.ndarray:
    """compressed-tensors' dense packing: unsigned ``bits``-bit values along the last axis, element i
    at bit i * bits of the row's little-endian int32 stream (rows padded to 32 elements)."""
    rows, cols = values.shape
    padded = -(-cols // 32) * 32
    v = np.zeros((rows, padded), dtype=np.uint32)
    v[:, :cols] = values
    stream = ((v[..., None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8).reshape(rows, -1)
    words = np.packbits(stream, axis=1, bitorder="little").view("<i4")
    return words[:, : -(-cols * bits // 32)].copy()


def _signed_codes(lin: QuantLinear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes and zero points in compressed-tensors' signed range [-2^(b-1), 2^(b-1) - 1]."""
    f, q = lin.fmt, lin.q
    off = 1 << (f.bits - 1)
    codes = q.codes.to(torch.int32)
    zero = None
    if not f.symmetric:
        codes = codes - (0 if f.signed else off)
        zero = q.zero.to(torch.int32) - (0 if f.signed else off)
    lo, hi = -off, off - 1
    bad = (codes < lo) | (codes > hi)
    if bad.any() or (zero is not None and ((zero < lo) | (zero > hi)).any()):
        raise ValueError(f"codes of {f.tag} outside the signed {f.bits}-bit range")
    return codes, zero


def compressed_tensors_of(lin: QuantLinear, fmt_name: str) -> dict[str, torch.Tensor]:
    n, k = lin.shape
    q, f = lin.q, lin.fmt
    g = k // f.group_size if f.granularity == "group" else 1
    if fmt_name in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):  # E2M1 codes: sign bit 3, low nibble first
        c = q.codes.to(torch.uint8).reshape(n, k)
        out = {"weight_packed": (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous(),
               "weight_scale": lin.stored_scale.reshape(n, g).contiguous()}
        if fmt_name == "nvfp4-pack-quantized":  # effective scale = E4M3 scale / global (finegrain: x scale2)
            out["weight_global_scale"] = (1.0 / q.scale2.float()).reshape(1).contiguous()
        return out
    scale = q.scale.float().reshape(n, g) if f.granularity != "tensor" else q.scale.float().reshape(1)
    out = {"weight_scale": scale.contiguous()}
    if fmt_name == "float-quantized":
        out["weight"] = q.codes.to(torch.uint8).view(torch.float8_e4m3fn).reshape(n, k).contiguous()
        return out
    codes, zero = _signed_codes(lin)
    if fmt_name == "int-quantized":
        out["weight"] = codes.to(torch.int8).reshape(n, k).contiguous()
        if zero is not None:
            out["weight_zero_point"] = zero.to(torch.int8).reshape(scale.shape).contiguous()
        return out
    off = 1 << (f.bits - 1)
    out["weight_packed"] = torch.from_numpy(pack_int32((codes.reshape(n, k) + off).numpy().astype(np.uint32), f.bits))
    out["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
    if zero is not None:
        if f.granularity == "tensor":
            out["weight_zero_point"] = zero.reshape(1).to(torch.int8)
        else:  # packed along the output dim (dim 0)
            zp = (zero.reshape(n, g) + off).numpy().astype(np.uint32).T
            out["weight_zero_point"] = torch.from_numpy(pack_int32(zp, f.bits).T.copy())
    return out


# ---- the export ----------------------------------------------------------------------------------
def collect(cm) -> tuple[dict, torch.nn.Module, dict, list[str], dict]:
    """(config, architecture skeleton, {checkpoint key: QuantLinear | dense tensor}, problems): the
    source architecture's state dict filled from the compiled graph by name. A folded norm's weight
    becomes its family's identity; a tied head is left out; any tensor the graph lacks or has extra
    is a problem, named."""
    cfg = hf_config_of(cm)
    model = skeleton(cfg)
    contents = read_graph(cm.gm)
    problems = list(contents.problems)
    expected = model.state_dict()
    computed_buffers = {n for n, _ in model.named_buffers()} - set(expected)
    tie = bool(cfg.get("tie_word_embeddings", getattr(model.config, "tie_word_embeddings", False)))
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = next((f"{n}.weight" for n, m in model.named_modules() if out_emb is not None and m is out_emb), None) \
        if tie else None
    folded_norms = {r.get("site") for r in cm.folds if r.get("pass") == "fold_norms" and r.get("action") == "folded"}
    state: dict = {}
    for key, meta in expected.items():
        if key in contents.linears:
            lin = contents.linears[key]
            if list(meta.shape) != lin.shape:
                problems.append(f"{key}: shape {lin.shape} in the graph, {list(meta.shape)} in the architecture")
            else:
                state[key] = lin
        elif key in contents.dense:
            t = contents.dense[key]
            if t.shape != meta.shape:
                problems.append(f"{key}: shape {list(t.shape)} in the graph, {list(meta.shape)} in the architecture")
            else:
                state[key] = t.detach().contiguous()
        elif tie and key == head:
            continue  # tied to the input embedding, stored once
        elif key.rsplit(".", 1)[0] in folded_norms:
            state[key] = _identity_norm_weight(model, key.rsplit(".", 1)[0], key, meta.shape)
        else:
            problems.append(f"{key}: the {type(model).__name__} checkpoint needs this tensor and the compiled graph has "
                            "none of that name (the compiled forward does not compute with it, e.g. a pooler whose "
                            "output finegrain's capture drops, or a pass removed it)")
    literals = {n for n in contents.dense if n.startswith("lifted_tensor_")}  # literals of the forward code
    for name in sorted(set(contents.dense) - set(expected) - computed_buffers - literals):
        problems.append(f"{name}: a tensor in the compiled graph (a fold added it) with no place in the "
                        f"{type(model).__name__} checkpoint")
    if tie and head is not None and head in state:
        cfg["tie_word_embeddings"] = False  # the head was quantized or transformed on its own
    return cfg, model, state, problems, contents.kv


def plan_hf(cm) -> dict:
    """Everything the export writes, or ExportError listing every refusal (nothing written)."""
    cfg, model, state, problems, kv = collect(cm)
    tensors: dict[str, torch.Tensor] = {}
    schemes: dict[str, tuple[str, dict]] = {}
    forms: dict[str, str] = {}
    for key, item in state.items():
        if not isinstance(item, QuantLinear):
            tensors[key] = item
            continue
        lin = item
        try:
            fmt_name, scheme = scheme_of(lin)
        except ValueError as e:
            problems.append(f"{lin.module}: {e}")
            continue
        schemes[lin.module] = (fmt_name, scheme)
        for suffix, t in compressed_tensors_of(lin, fmt_name).items():
            tensors[f"{lin.module}.{suffix}"] = t
        forms[lin.module] = f"{fmt_name} {lin.fmt.tag}" + (f" x {lin.activation.tag}" if lin.activation else "")
    kv_scheme = None
    if kv:
        kv_scheme, kv_tensors = kv_cache_scheme(model, kv, problems)
        tensors.update(kv_tensors)
    if problems:
        raise ExportError(f"compressed-tensors export of {cfg.get('architectures')}: {len(problems)} thing(s) cannot "
                          "be written:\n  " + listed(problems))
    return {"config": cfg, "tensors": tensors, "schemes": schemes, "forms": forms, "kv_cache_scheme": kv_scheme}


def _attention_modules(model) -> list[tuple[str, torch.nn.Module]]:
    """The decoder's attention modules in layer order (``<...>.self_attn``: where the checkpoint's
    ``k_scale`` / ``v_scale`` live)."""
    return [(name, m) for name, m in model.named_modules() if name.endswith("self_attn")]


def kv_cache_scheme(model, kv: dict, problems: list[str]) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """compressed-tensors' ``kv_cache_scheme`` and the ``<layer>.self_attn.k_scale`` / ``v_scale``
    tensors of a graph's static KV-cache scales ``kv`` (``exports/graph.KVScale`` by (layer, kind)):
    FP8 E4M3 with one scale per layer and tensor, the static cache vLLM serves (and ``transformers``
    with ``compressed-tensors`` fake-quantizes on each cache update). Anything else is a problem."""
    attn = [name for name, _ in _attention_modules(model)]
    layers = len(attn)
    fmts = {s.fmt for s in kv.values()}
    if len(fmts) != 1 or next(iter(fmts)).kind != "e4m3" or len(kv) != 2 * layers:
        problems.append(f"KV cache: {', '.join(sorted(f.tag for f in fmts))} on {len(kv)} of the {2 * layers} key / value "
                        "caches; compressed-tensors' kv_cache_scheme takes one FP8 E4M3 per-tensor format for every "
                        "layer's keys and values (preset kv8-fp8-static)")
        return None, {}
    tensors = {f"{attn[s.layer]}.{s.kind[0]}_scale": s.scale.reshape(1).float().clone() for s in kv.values()}
    return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False,
            "group_size": None, "block_structure": None, "observer": "minmax", "actorder": None}, tensors


def quantization_config(schemes: dict[str, tuple[str, dict]], kv_scheme: dict | None = None) -> dict:
    groups: dict[str, dict] = {}
    keyed: dict[str, str] = {}
    for module, (fmt_name, scheme) in schemes.items():
        key = dumps_json([fmt_name, scheme])
        if key not in keyed:
            keyed[key] = f"group_{len(keyed)}"
            groups[keyed[key]] = {"targets": [], "weights": scheme["weights"],
                                  "input_activations": scheme["input_activations"], "output_activations": None,
                                  "format": fmt_name}
        groups[keyed[key]]["targets"].append(module)
    formats = {g["format"] for g in groups.values()} or {"dense"}  # dense: a KV-cache scheme over float weights
    return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": groups, "ignore": [], "kv_cache_scheme": kv_scheme,
            "global_compression_ratio": None, "version": CT_VERSION}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_hf(cm, out: str | Path, overwrite: bool = False, dtype: str = "float32") -> dict:
    """Write ``out`` (a Hugging Face model directory in the compressed-tensors schema, see the
    module docstring). ``dtype``: the model dtype of the float tensors (embeddings, norms, float
    layers) and of integer / FP8 weight scales; ``float32`` (default) is exact, ``bfloat16`` /
    ``float16`` halve those bytes as GPU checkpoints do, rounding them (fp16 keeps finegrain's fp16
    scales exact). Returns {"path", "bytes", "formats": {module: form}, "groups": n}."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: one of {', '.join(DTYPES)}")
    plan = plan_hf(cm)
    if not plan["schemes"] and plan["kv_cache_scheme"] is None:
        raise ExportError("the artifact has no quantized linear and no static KV-cache scales: nothing to write in the "
                          "compressed-tensors schema")
    cfg = plan["config"]
    cfg["quantization_config"] = quantization_config(plan["schemes"], plan["kv_cache_scheme"])
    cfg["dtype"] = dtype
    cfg.pop("torch_dtype", None)
    to = DTYPES[dtype]
    if to is not torch.float32:  # FP4 scales keep their own dtypes (E4M3 / E8M0) and the fp32 global scale
        plan["tensors"] = {k: t.to(to) if t.dtype == torch.float32 and not k.endswith("_global_scale") else t
                           for k, t in plan["tensors"].items()}
    out = Path(out)
    with atomic_directory(out, overwrite) as tmp:
        save_file(plan["tensors"], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(dumps_json(cfg) + "\n")
        (tmp / EXPORT_MARKER).write_text(dumps_json({
            "finegrain_export": "compressed-tensors", "finegrain_version": __version__, "dtype": dtype,
            "recipe": cm.recipe_name, "source": {k: v for k, v in (cm.source or {}).items() if k != "hf_config"},
            "forms": plan["forms"]}) + "\n")
        if cm.tokenizer is not None:
            cm.tokenizer.save_pretrained(str(tmp))
    files = sorted(p.name for p in out.iterdir())
    return {"path": str(out), "bytes": sum((out / f).stat().st_size for f in files), "files": files,
            "weights_bytes": (out / "model.safetensors").stat().st_size, "forms": plan["forms"],
            "groups": len(cfg["quantization_config"]["config_groups"]), "kv_cache_scheme": plan["kv_cache_scheme"]}


def load_hf_export(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load an exported directory with the real client: ``transformers`` + ``compressed-tensors``
    (the ``test`` extra), offline, no remote code; weights decompressed on CPU. compressed-tensors
    decodes FP4 (NVFP4 / MXFP4) into bfloat16 only: load those with ``dtype=torch.bfloat16``."""
    from finegrain.io.files import read_json_file

    cfg = read_json_file(Path(path) / "config.json")
    kv_scheme = (cfg.pop("quantization_config", None) or {}).get("kv_cache_scheme")
    _, auto = _architecture(cfg)
    model = auto.from_pretrained(str(path), local_files_only=True, trust_remote_code=False, dtype=dtype).eval()
    if kv_scheme:
        hook_kv_cache_scheme(model, kv_scheme, Path(path) / "model.safetensors")
    return model


def hook_kv_cache_scheme(model, kv_scheme: dict, weights: Path) -> int:
    """Quantize ``model``'s cache writes as a checkpoint's ``kv_cache_scheme`` says, with
    compressed-tensors' own ``QuantizedKVCache`` (its ``forward_quantize`` of each key / value
    update, the checkpoint's ``k_scale`` / ``v_scale``), where ``from_pretrained`` did not: this
    transformers (5.25) passes the cache to attention as ``cache=``, and compressed-tensors 0.20.1
    recognizes cached attention by a ``past_key_values`` argument, so it skips the scheme and
    loads the scales as unexpected keys. Two pre-hooks hand the library's hook the cache under
    the name it reads, and back. Returns the number of attention modules hooked (0 when the
    library had already applied the scheme)."""
    from compressed_tensors.modeling.kvcache import KV_CACHE_ATTR, initialize_hooked_kv_cache
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, QuantizationStatus
    from compressed_tensors.quantization.lifecycle.initialize import initialize_attn_qparams
    from safetensors import safe_open

    attns = _attention_modules(model)
    if any(hasattr(m, KV_CACHE_ATTR) for _, m in attns):
        return 0
    args = QuantizationArgs.model_validate(kv_scheme)

    def to_library(module, a, kwargs):
        if "cache" in kwargs:
            kwargs["past_key_value"] = kwargs.pop("cache")
        return a, kwargs

    def back(module, a, kwargs):
        if "past_key_value" in kwargs:
            kwargs["cache"] = kwargs.pop("past_key_value")
        return a, kwargs

    with safe_open(str(weights), "pt") as f:
        stored = set(f.keys())
        for name, m in attns:
            m.register_forward_pre_hook(to_library, with_kwargs=True, prepend=True)
            initialize_hooked_kv_cache(model, m)  # the library's hook: wraps the cache in QuantizedKVCache
            m.register_forward_pre_hook(back, with_kwargs=True)
            m.quantization_scheme = QuantizationScheme(targets=[name], input_activations=args)
            initialize_attn_qparams(m, m.quantization_scheme, force_zero_point=False)
            m.quantization_status = QuantizationStatus.COMPRESSED
            for kind in ("k", "v"):
                key = f"{name}.{kind}_scale"
                if key not in stored:
                    raise ExportError(f"{weights}: kv_cache_scheme is set but {key} is missing")
                getattr(m, f"{kind}_scale").data.copy_(f.get_tensor(key).reshape(getattr(m, f"{kind}_scale").shape))
    return len(attns)


def asymmetric_groups(path: str | Path) -> list[str]:
    """Names of the config groups with asymmetric weights (which transformers 5.24 + compressed-tensors
    0.20.1 cannot load: upstream llm-compressor#1618)."""
    from finegrain.io.files import read_json_file

    qc = read_json_file(Path(path) / "config.json").get("quantization_config") or {}
    return [name for name, g in (qc.get("config_groups") or {}).items()
            if not (g.get("weights") or {}).get("symmetric", True)]


def decode_hf_export(path: str | Path) -> torch.nn.Module:
    """The exported directory decoded by compressed-tensors' own compressors (``decompress`` of each
    module's format, from the library's registry) into the plain ``transformers`` architecture of its
    config: the client path for checkpoints ``from_pretrained`` cannot load (asymmetric)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import load_file

    from finegrain.io.files import read_json_file

    path = Path(path)
    cfg = read_json_file(path / "config.json")
    qc = cfg.pop("quantization_config")
    sd = load_file(str(path / "model.safetensors"))
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key in list(sd):
        mod, _, local = key.rpartition(".")
        if local.startswith("weight"):
            by_module.setdefault(mod, {})[local] = sd[key]
    state: dict[str, torch.Tensor] = {}
    for group in qc["config_groups"].values():
        scheme = QuantizationScheme(targets=group["targets"], weights=QuantizationArgs(**group["weights"]))
        comp = BaseCompressor.get_value_from_registry(group.get("format") or qc["format"])
        for mod in group["targets"]:
            for local in by_module[mod]:
                del sd[f"{mod}.{local}"]
            state[f"{mod}.weight"] = comp.decompress(by_module[mod], scheme)["weight"].float()
    kv_scheme = qc.get("kv_cache_scheme")
    if kv_scheme:  # the cache scales go to the library's QuantizedKVCache (hook_kv_cache_scheme), not the weights
        sd = {k: v for k, v in sd.items() if not k.endswith(("self_attn.k_scale", "self_attn.v_scale"))}
    state.update(sd)
    config, auto = _architecture(cfg)
    model = auto.from_config(config).float().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n in missing if getattr(config, "tie_word_embeddings", False) and n.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise ExportError(f"{path}: decoded tensors do not match the architecture (missing {sorted(set(missing) - tied)[:4]}, "
                          f"unexpected {sorted(unexpected)[:4]})")
    if tied:
        model.tie_weights()
    if kv_scheme:
        hook_kv_cache_scheme(model, kv_scheme, path / "model.safetensors")
    return model
