"""Recipes: rules from graph role or name pattern to formats, plus pass options; and presets.

A :class:`Rule` matches quantizable ops by ``role`` (``linear``, ``lm_head``, ``router``,
``embedding``, ``matmul``, ``conv``; see ``compiler/ir.py``; mixture-of-experts expert weights
have role ``linear``, their routers ``router``, so ``role="linear"`` rules leave routers in float) and/or a regular expression over the op's name (the
module path of its weight, e.g. ``model.layers.3.mlp.down_proj``). The *last* matching rule wins,
so a recipe reads "defaults first, exceptions after". A rule with ``weight=None`` and
``activation=None`` keeps the op in floating point.

Recipes round-trip through dict / JSON / YAML and are validated on load; errors name the field
(``rules[2].weight.bits``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finegrain.configs import check_fields
from finegrain.errors import RecipeError
from finegrain.formats import QuantFormat

ROLES = ("linear", "lm_head", "router", "embedding", "matmul", "conv", "recurrent")
# conv: quantized as a matrix (ir.conv_matrix); recurrent: LSTM / GRU / RNN weight matrices (weights only)
WEIGHT_ROLES = ("linear", "lm_head", "router", "embedding", "conv", "recurrent")
ACT_ROLES = ("linear", "lm_head", "router", "conv")  # conv: per-tensor activation formats only (channels are dim 1)
EXPERT_ALLOCATION = ("expert", "grouped")
WEIGHT_ALGORITHMS = ("rtn", "clip", "gptq")
CLIP_OBJECTIVES = ("output", "mse")
SENSITIVITIES = ("auto", "output", "fisher")
# bit allocation's default palette (``--budget`` without candidates): INT2..INT8 weights
DEFAULT_CANDIDATES = ("int2-g64-asym-fp16", "int3-g64-asym-fp16", "int3-g128-asym-fp16", "int4-g64-asym-fp16",
                      "int4-g128-asym-fp16", "int8-channel-sym-fp16")
ACT_RANGES = ("absmax", "p99.99", "p99.9")  # static activation range estimator
SMOOTHING = ("smoothquant", "os+", "awq")
ACT_CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)  # act_clip_search's candidate ratios
ROTATION_MODES = ("residual", "online")
KV_AXES = ("head_dim", "tokens")  # what a KV format's groups run along (compiler/ops.kv_append)
MAX_RECIPE_BYTES = 1 << 20


def _is_number(v: Any) -> bool:
    """A finite int or float; booleans are not numbers here."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Rule:
    role: str | None = None
    pattern: str | None = None
    weight: QuantFormat | None = None
    activation: QuantFormat | None = None

    def __post_init__(self) -> None:
        if self.role is None and self.pattern is None:
            raise ValueError("role/pattern: a rule needs a role, a name pattern, or both")
        if self.role is not None and self.role not in ROLES:
            raise ValueError(f"role: {self.role!r} is not one of {ROLES}")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"pattern: {self.pattern!r} is not a valid regular expression ({e})") from None
        if self.weight is not None and self.weight.dynamic:
            raise ValueError("weight.dynamic: weights are quantized offline; dynamic applies to activations")
        if self.role is not None and self.weight is not None and self.role not in WEIGHT_ROLES:
            raise ValueError(f"weight: weight formats for role {self.role!r} are not supported yet ({WEIGHT_ROLES})")
        if self.role is not None and self.activation is not None and self.role not in ACT_ROLES:
            raise ValueError(f"activation: activation formats for role {self.role!r} are not supported yet")
        if self.role == "conv" and self.activation is not None and self.activation.granularity != "tensor":
            raise ValueError(f"activation: a conv's input is [N, C, ...] with channels on dim 1; only per-tensor "
                             f"activation formats apply to it, not {self.activation.tag}")

    def matches(self, role: str, name: str) -> bool:
        return (self.role is None or self.role == role) and (self.pattern is None or re.search(self.pattern, name) is not None)


KV_KINDS = ("int", "e4m3")  # KV-cache elements: INT2-8, FP8 E4M3 (the 8-bit float cache of vLLM / TensorRT-LLM)


def kv_static(fmt: QuantFormat | None) -> bool:
    """Whether a KV-cache format has one calibrated scale per layer and tensor (static, symmetric,
    per tensor: vLLM's FP8 cache); the one rule the pass, the recipe check and the backends share."""
    return fmt is not None and not fmt.dynamic and fmt.granularity == "tensor" and fmt.symmetric


def _check_kv_format(tag, where: str, static_ok: bool = True) -> None:
    """A KV-cache format tag (or None: float): a dynamic integer or FP8 E4M3 format per token or per
    group, or (``static_ok``) a static symmetric one per tensor (one calibrated scale per layer)."""
    if tag is None:
        return
    try:
        fmt = QuantFormat.parse(tag) if isinstance(tag, str) else None
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    ok = fmt is not None and fmt.kind in KV_KINDS and (
        (fmt.dynamic and fmt.granularity in ("token", "group"))
        or (static_ok and kv_static(fmt) and fmt.scale in ("fp32", "fp16", "bf16")))
    if not ok:
        raise ValueError(f"{where}: {tag!r} must be a dynamic integer or FP8 E4M3 format per token or per group "
                         "along the head dim (e.g. int4-g32-asym-fp16-dyn, e4m3-token-sym-fp32-dyn)"
                         + (", or a static symmetric one per tensor with a float scale (e4m3-tensor-sym-fp32: one "
                            "calibrated scale per layer, vLLM's FP8 cache)" if static_ok else ""))


@dataclass(frozen=True)
class Recipe:
    """Rules plus the options of the passes they drive.

    Folds (``passes/fold_*.py``, exact in floating point, applied before quantization):
    ``fold_norms`` folds norm affine weights into the linears they feed; ``rotate`` with
    ``rotation_mode="residual"`` rotates each residual stream by a random Hadamard matrix folded
    into the weights (QuaRot; implies ``fold_norms``) and, with ``online_hadamard``, inserts an
    online Hadamard before activation-quantized linears whose input no offline rotation reaches
    (o_proj, down_proj); ``rotation_mode="online"`` folds nothing into the residual stream and
    puts an online Hadamard before every activation-quantized linear (norm weights stay unfolded,
    so weight quantization sees the original weights); ``smoothing`` migrates activation
    outliers into weights (``smoothquant``: per-channel scales; ``os+``: Outlier Suppression+
    shift and scales), with ``smoothing_alpha`` the SmoothQuant migration strength and
    ``smoothing_search`` a grid search of alpha (SmoothQuant) or the clipping threshold (OS+)
    minimizing the quantized output error of the consumers on calibration rows.
    ``float_calibration_samples`` (0: all): how many of the calibration batches the statistics pass
    over the float model runs; AWQ reads only the stats store's sample of rows per site, so its
    presets take that sample from the first few batches (a sequential weight algorithm still
    replays all of them).

    Weight algorithms (``passes/quantize_weights.py``): ``rtn`` rounds to nearest with scales
    from each group's range; ``clip`` searches ``clip_grid`` clip ratios in ``[clip_min, 1]`` per
    group, minimizing the group's output error ``dW_g H_gg dW_g^T`` with the calibration Hessian
    block (``clip_objective="output"``, AWQ / FineQuant-style) or its weight MSE (``"mse"``);
    ``gptq`` is GPTQ (Frantar et al. 2022) with ``gptq_damp`` relative damping, ``gptq_block``
    lazy-batch width and ``gptq_act_order`` (columns by decreasing Hessian diagonal, group
    parameters fixed up front, the "static groups" variant, so groups stay contiguous; without it
    each group's parameters are chosen when the sweep reaches it, from the error-updated weights,
    GPTQ's original scheme), on scales from the clip search when ``gptq_clip``. With ``sequential``
    (the default) GPTQ quantizes the linears in graph order, each on the inputs the already-quantized linears upstream produce (the calibration batches are
    replayed node by node, ``compiler/replay.py``); ``sequential=False`` takes every Hessian
    from the one calibration pass over the floating-point model. ``gptq_float_target`` (sequential
    only; GPTAQ's asymmetric calibration, Li et al. 2025): each linear's quantized output on the
    quantized model's inputs ``X_q`` is fitted to the *float* model's output ``W X_fp`` (a float
    replay runs beside the quantized one), i.e. GPTQ runs on ``W C H^-1`` with ``C = E[x_fp x_q^T]``,
    ``H = E[x_q x_q^T]``: the earlier layers' error is compensated too. ``act_clip_search``
    (sequential GPTQ) picks each dynamic INT activation's clip ratio on the replayed rows;
    ``act_outlier_fraction`` (FMPQ, COMET): for activations in groups along K, that fraction of each
    site's groups (at least one) — those whose quantization error moves the linears' outputs most on
    the replayed rows — is quantized at ``act_outlier_bits`` instead (fake-quantized both ways and
    selected per column by a constant mask: reference-exact, no new op).

    Bit allocation (``passes/allocate_bits.py``): with ``weight_candidates`` (format tags), every
    linear a rule quantizes gets one of them, chosen by an exact multiple-choice knapsack that
    minimizes the summed ``sensitivity`` (``output``: the layer output error
    ``tr(dW E[xx^T] dW^T)``; ``fisher``: the predicted loss increase ``1/2 sum F dW^2`` with the
    empirical Fisher of the calibration loss; ``auto``: ``fisher`` for causal LMs without online
    Hadamard ops, else ``output``) under ``budget_bits`` (bits per weight over those
    linears) or ``budget_bytes`` (bytes of the whole stored model). Linears reading one tensor
    (q/k/v, gate/up: one fused kernel) share a format. Mixture-of-experts weights (one grouped
    GEMM over ``[E, N, K]``) are allocated per expert with ``expert_allocation="expert"`` (each
    expert's error weighted by its calibration routing frequency; a grouped kernel then runs the
    experts in buckets of one format) or as one tensor with ``"grouped"`` (one format for all
    experts of the GEMM, for kernels that take a single format).

    KV cache (``passes/quantize_kv.py``; a graph compiled with ``kv_cache=True``): ``kv_key`` /
    ``kv_value`` are dynamic integer / FP8 E4M3 formats (per token, or groups along the head dim), or
    static symmetric per-tensor ones (one scale per layer, calibrated: vLLM's FP8 cache), each new key
    / value is quantized to when written to the cache; ``kv_rotate`` rotates keys and values by a
    Hadamard over the head dim first (queries and the attention output rotated to match).
    ``kv_key_axis`` / ``kv_value_axis``: ``head_dim`` (the format's groups run along the head dim,
    one token at a time) or ``tokens`` (KIVI's per-channel keys: each channel quantized over groups
    of G tokens, G the format's group size); ``kv_window``: the most recent tokens kept in float
    until that many newer ones follow (KIVI's residual); ``kv_sinks``: the first tokens never
    quantized (attention sinks); ``kv_sink_search`` (N > 0): the sinks found from calibration instead,
    RotateKV's attention-sink-aware quantization: of the first N positions, those whose residual stream
    carries a massive activation (a token RMS at least ``MASSIVE_RATIO`` times the median token's somewhere
    on the stream, in at least half the calibration batches) stay in float, ``kv_sinks`` becoming the
    larger of itself and one past the last such position (``passes/quantize_kv.py``); ``kv_pre_rope``: keys quantized before RoPE (RoPE undone at the
    token's position, applied again after dequantization: KVQuant / RotateKV), with ``kv_rotate``
    the pre-RoPE key Hadamard-rotated before quantization; ``kv_head_group`` (G > 1): the pre-RoPE keys
    quantized after a Hadamard over the channels of each group of G KV heads (RotateKV's grouped-head
    rotation; undone after dequantization; 0: one group of all the layer's KV heads); ``kv_reorder``: before it, the channels of all heads
    permuted by their calibration RMS, largest first (RotateKV's outlier-aware reordering: the
    outlier channels share a rotation group); ``kv_key_klt`` (with ``kv_pre_rope`` and ``kv_key_axis``
    ``tokens``): the pre-RoPE keys of each head quantized in their calibrated Karhunen-Loeve basis (the
    eigenvectors of their covariance, the calibration mean subtracted first), each component per channel
    over groups of G tokens at its own width in {0, 2, ..., 8} bits (0: dropped to the mean), the widths
    allocated on calibration to the least squared error within the bytes the key format would take
    (``passes/quantize_kv.klt_key_basis``; transform coding: keys are low-rank, so a few components carry
    most of the energy); ``kv_layers``: per-layer
    ``[layer, key format, value format]`` overriding ``kv_key`` / ``kv_value`` (null: float), e.g.
    KVTuner's layer-wise (K, V) bit pairs (``driver/kv_tune.py``). ZipCache: ``kv_zip_key`` /
    ``kv_zip_value`` (the low-precision formats) turn on saliency-mixed precision for keys / values:
    tokens are quantized in blocks of ``kv_zip_block`` (after the window and sinks), in each block the
    ``kv_zip_ratio`` fraction with the highest normalized attention score (``kv_zip_probes`` of the
    queries probe it) in ``kv_key`` / ``kv_value``, the rest in the low format; keys are quantized
    channel-separable token-wise (one normalizer per channel and block), or with
    ``kv_key_axis="tokens"`` per channel over each block's salient / other tokens (KIVI's keys).
    """

    name: str = "custom"
    rules: tuple[Rule, ...] = ()
    weight_algorithm: str = "rtn"
    act_range: str = "absmax"
    calibration_samples: int = 32
    calibration_seq_len: int = 512
    float_calibration_samples: int = 0
    fold_norms: bool = False
    rotate: bool = False
    rotation_seed: int = 0
    rotation_mode: str = "residual"
    online_hadamard: bool = True
    smoothing: str | None = None
    smoothing_alpha: float = 0.5
    smoothing_search: bool = True
    clip_grid: int = 20
    clip_min: float = 0.5
    clip_objective: str = "output"
    gptq_damp: float = 0.01
    gptq_block: int = 128
    gptq_act_order: bool = True
    gptq_clip: bool = False
    gptq_float_target: bool = False
    sequential: bool = True
    act_clip_search: bool = False
    act_outlier_fraction: float = 0.0
    act_outlier_bits: int = 8
    weight_candidates: tuple[str, ...] = ()
    budget_bits: float | None = None
    budget_bytes: int | None = None
    sensitivity: str = "auto"
    expert_allocation: str = "expert"
    kv_key: str | None = None
    kv_value: str | None = None
    kv_rotate: bool = False
    kv_key_axis: str = "head_dim"
    kv_value_axis: str = "head_dim"
    kv_window: int = 0
    kv_sinks: int = 0
    kv_sink_search: int = 0
    kv_pre_rope: bool = False
    kv_head_group: int = 1
    kv_reorder: bool = False
    kv_key_klt: bool = False
    kv_layers: tuple[tuple[int, str | None, str | None], ...] = ()
    kv_zip_key: str | None = None
    kv_zip_value: str | None = None
    kv_zip_ratio: float = 0.5
    kv_zip_block: int = 128
    kv_zip_probes: float = 0.1

    def __post_init__(self) -> None:
        for f in ("fold_norms", "rotate", "online_hadamard", "smoothing_search", "gptq_act_order", "gptq_clip",
                  "gptq_float_target", "kv_rotate", "kv_pre_rope", "kv_reorder", "kv_key_klt", "sequential",
                  "act_clip_search"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"{f}: must be true or false, got {getattr(self, f)!r}")
        if not isinstance(self.rotation_seed, int) or isinstance(self.rotation_seed, bool):
            raise ValueError(f"rotation_seed: must be an integer, got {self.rotation_seed!r}")
        if self.rotation_mode not in ROTATION_MODES:
            raise ValueError(f"rotation_mode: {self.rotation_mode!r} is not one of {ROTATION_MODES}")
        if self.rotation_mode == "online" and self.rotate and not self.online_hadamard:
            raise ValueError("online_hadamard: rotation_mode 'online' needs online_hadamard true")
        if self.smoothing is not None and self.smoothing not in SMOOTHING:
            raise ValueError(f"smoothing: {self.smoothing!r} is not one of {SMOOTHING} (or null)")
        if not _is_number(self.smoothing_alpha) or not 0.0 <= self.smoothing_alpha <= 1.0:
            raise ValueError(f"smoothing_alpha: must be a number in [0, 1], got {self.smoothing_alpha!r}")
        if self.weight_algorithm not in WEIGHT_ALGORITHMS:
            raise ValueError(f"weight_algorithm: {self.weight_algorithm!r} is not one of {WEIGHT_ALGORITHMS}")
        if self.clip_objective not in CLIP_OBJECTIVES:
            raise ValueError(f"clip_objective: {self.clip_objective!r} is not one of {CLIP_OBJECTIVES}")
        if not _is_number(self.clip_min) or not 0.0 < self.clip_min <= 1.0:
            raise ValueError(f"clip_min: must be a number in (0, 1], got {self.clip_min!r}")
        if not _is_number(self.gptq_damp) or not 0.0 < self.gptq_damp < 1.0:
            raise ValueError(f"gptq_damp: must be a number in (0, 1), got {self.gptq_damp!r}")
        if not isinstance(self.weight_candidates, tuple):
            object.__setattr__(self, "weight_candidates", tuple(self.weight_candidates))
        for i, tag in enumerate(self.weight_candidates):
            try:
                fmt = QuantFormat.parse(tag) if isinstance(tag, str) else None
            except ValueError as e:
                raise ValueError(f"weight_candidates[{i}]: {e}") from None
            if fmt is None or fmt.dynamic:
                raise ValueError(f"weight_candidates[{i}]: {tag!r} must be a static weight format tag")
        for f in ("kv_key", "kv_value"):
            _check_kv_format(getattr(self, f), f)
        layers = []
        for i, entry in enumerate(self.kv_layers or ()):
            if (not isinstance(entry, (list, tuple)) or len(entry) != 3 or not isinstance(entry[0], int)
                    or isinstance(entry[0], bool) or entry[0] < 0):
                raise ValueError(f"kv_layers[{i}]: expected [layer index, key format or null, value format or null], "
                                 f"got {entry!r}")
            for tag, what in ((entry[1], "key"), (entry[2], "value")):
                _check_kv_format(tag, f"kv_layers[{i}] {what}")
            layers.append((entry[0], entry[1], entry[2]))
        if len({e[0] for e in layers}) != len(layers):
            raise ValueError("kv_layers: a layer is listed twice")
        object.__setattr__(self, "kv_layers", tuple(layers))
        for f in ("kv_key_axis", "kv_value_axis"):
            if getattr(self, f) not in KV_AXES:
                raise ValueError(f"{f}: {getattr(self, f)!r} is not one of {KV_AXES}")
        for kind in ("key", "value"):
            low = getattr(self, f"kv_zip_{kind}")
            _check_kv_format(low, f"kv_zip_{kind}", static_ok=False)
            if low is not None and getattr(self, f"kv_{kind}") is None:
                raise ValueError(f"kv_zip_{kind}: ZipCache's low-precision {kind} format needs kv_{kind} (the salient "
                                 "tokens' format)")
            if low is not None and kind == "value" and self.kv_value_axis != "head_dim":
                raise ValueError("kv_zip_value: ZipCache quantizes values token-wise; kv_value_axis must be 'head_dim'")
        for f, lo_open in (("kv_zip_ratio", False), ("kv_zip_probes", True)):
            v = getattr(self, f)
            if not _is_number(v) or not (0 < v <= 1 if lo_open else 0 <= v <= 1):
                raise ValueError(f"{f}: must be a fraction in {'(0' if lo_open else '[0'}, 1], got {v!r}")
        if not isinstance(self.kv_zip_block, int) or isinstance(self.kv_zip_block, bool) \
                or not 1 <= self.kv_zip_block <= 1 << 16:
            raise ValueError(f"kv_zip_block: must be an integer number of tokens in [1, {1 << 16}], got "
                             f"{self.kv_zip_block!r}")
        if not isinstance(self.kv_head_group, int) or isinstance(self.kv_head_group, bool) \
                or not 0 <= self.kv_head_group <= 1024:
            raise ValueError(f"kv_head_group: must be an integer number of KV heads in [1, 1024] (0: all), got "
                             f"{self.kv_head_group!r}")
        if (self.kv_head_group != 1 or self.kv_reorder) and not (self.kv_pre_rope and self.kv_key_axis == "head_dim"):
            raise ValueError("kv_head_group / kv_reorder: RotateKV's grouped-head rotation and channel reordering "
                             "transform the pre-RoPE keys quantized along the head dim: set kv_pre_rope true and "
                             "leave kv_key_axis 'head_dim'")
        if self.kv_key_klt:
            key = QuantFormat.parse(self.kv_key) if self.kv_key else None
            if not (self.kv_pre_rope and self.kv_key_axis == "tokens") or key is None or key.kind != "int" \
                    or key.symmetric or not key.dynamic or key.granularity != "group" or self.kv_layers \
                    or self.kv_zip_key or self.kv_head_group != 1 or self.kv_reorder:
                raise ValueError("kv_key_klt: the pre-RoPE keys are coded per channel over groups of tokens in their "
                                 "calibrated basis: set kv_pre_rope true, kv_key_axis 'tokens' and kv_key a dynamic "
                                 "asymmetric integer format in groups (e.g. int2-g16-asym-fp16-dyn, whose bytes the "
                                 "widths share); not with kv_layers, ZipCache or RotateKV's grouped heads")
        for f in ("kv_window", "kv_sinks", "kv_sink_search"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 1 << 20:
                raise ValueError(f"{f}: must be an integer number of tokens in [0, {1 << 20}], got {v!r}")
        for kind in ("key", "value"):
            tags = [getattr(self, f"kv_{kind}")] + [e[1 if kind == "key" else 2] for e in self.kv_layers]
            static = [t for t in tags if t is not None and kv_static(QuantFormat.parse(t))]
            if static and self.kv_windowed(kind):
                raise ValueError(f"kv_{kind}: the static format {static[0]} (one calibrated scale per layer) quantizes "
                                 f"every {kind} as it is written; it does not combine with a per-channel axis, a float "
                                 "window, sinks, pre-RoPE keys or ZipCache (they take dynamic formats)")
        if self.sensitivity not in SENSITIVITIES:
            raise ValueError(f"sensitivity: {self.sensitivity!r} is not one of {SENSITIVITIES}")
        if self.expert_allocation not in EXPERT_ALLOCATION:
            raise ValueError(f"expert_allocation: {self.expert_allocation!r} is not one of {EXPERT_ALLOCATION}")
        if self.act_clip_search and not (self.weight_algorithm == "gptq" and self.sequential):
            raise ValueError("act_clip_search: searches on the rows sequential GPTQ replays; it needs weight_algorithm "
                             "'gptq' and sequential true")
        if not _is_number(self.act_outlier_fraction) or not 0 <= self.act_outlier_fraction <= 1:
            raise ValueError(f"act_outlier_fraction: must be a fraction in [0, 1], got {self.act_outlier_fraction!r}")
        if not isinstance(self.act_outlier_bits, int) or isinstance(self.act_outlier_bits, bool) \
                or not 2 <= self.act_outlier_bits <= 8:
            raise ValueError(f"act_outlier_bits: must be an integer in [2, 8], got {self.act_outlier_bits!r}")
        if self.act_outlier_fraction and not (self.weight_algorithm == "gptq" and self.sequential):
            raise ValueError("act_outlier_fraction: chooses each site's 8-bit groups on the rows sequential GPTQ "
                             "replays; it needs weight_algorithm 'gptq' and sequential true")
        if self.gptq_float_target and not (self.weight_algorithm == "gptq" and self.sequential):
            raise ValueError("gptq_float_target: fits each linear to the float model's output during sequential "
                             "GPTQ; it needs weight_algorithm 'gptq' and sequential true")
        if self.budget_bits is not None and self.budget_bytes is not None:
            raise ValueError("budget_bits: give budget_bits or budget_bytes, not both")
        if self.budget_bits is not None and (not _is_number(self.budget_bits) or not 0 < self.budget_bits <= 64):
            raise ValueError(f"budget_bits: must be a positive number of bits per weight, got {self.budget_bits!r}")
        if self.budget_bytes is not None and (not isinstance(self.budget_bytes, int) or isinstance(self.budget_bytes, bool)
                                              or self.budget_bytes <= 0):
            raise ValueError(f"budget_bytes: must be a positive integer, got {self.budget_bytes!r}")
        if (self.budget_bits is not None or self.budget_bytes is not None) and not self.weight_candidates:
            raise ValueError("weight_candidates: a budget needs candidate formats to choose from")
        if self.act_range not in ACT_RANGES:
            raise ValueError(f"act_range: {self.act_range!r} is not one of {ACT_RANGES}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name: must be a non-empty string, got {self.name!r}")
        for f, hi in (("calibration_samples", 1 << 16), ("calibration_seq_len", 1 << 20), ("clip_grid", 1000),
                      ("gptq_block", 1 << 16)):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= hi:
                raise ValueError(f"{f}: must be an integer in [1, {hi}], got {v!r}")
        v = self.float_calibration_samples
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 1 << 16:
            raise ValueError(f"float_calibration_samples: must be an integer in [0, {1 << 16}] (0: all), got {v!r}")

    def formats_for(self, role: str, name: str) -> tuple[QuantFormat | None, QuantFormat | None]:
        """(weight format, activation format) for an op; (None, None) keeps it in float."""
        chosen = (None, None)
        for rule in self.rules:
            if rule.matches(role, name):
                chosen = (rule.weight, rule.activation)
        return chosen

    def kv_windowed(self, kind: str) -> bool:
        """Whether the cache write of ``kind`` (``key`` / ``value``) quantizes only some of the tokens
        (per channel over token groups, a float window, sinks, pre-RoPE keys): one ``kv_append`` op
        (``passes/quantize_kv.py``) rather than a quantize / dequantize pair on each new token."""
        axis = self.kv_key_axis if kind == "key" else self.kv_value_axis
        return (axis == "tokens" or self.kv_window > 0 or self.kv_sinks > 0 or self.kv_sink_search > 0
                or (kind == "key" and self.kv_pre_rope) or self.kv_zip(kind))

    def kv_zip(self, kind: str) -> bool:
        """Whether ZipCache's saliency-mixed precision quantizes the cache of ``kind``."""
        return (self.kv_zip_key if kind == "key" else self.kv_zip_value) is not None

    @property
    def needs_static_stats(self) -> bool:
        return any(r.activation is not None and not r.activation.dynamic for r in self.rules)

    @property
    def needs_hessian(self) -> bool:
        """GPTQ, the output-error clip search and the output-error sensitivity of bit allocation
        read X^T X of each linear's input."""
        return self.needs_data_for_weights or (bool(self.weight_candidates) and self.sensitivity in ("output", "auto"))

    @property
    def needs_data_for_weights(self) -> bool:
        """The weight algorithm reads each linear's input Hessian (GPTQ, the output-error clip search)."""
        return self.weight_algorithm == "gptq" or (self.weight_algorithm == "clip" and self.clip_objective == "output")

    @property
    def sequential_gptq(self) -> bool:
        """GPTQ measures its Hessians on the partly quantized model (``sequential``). The clip
        search stays on the float model's: sequential, it measured slightly worse (SmolLM2,
        8 windows: 25.502 vs 25.379) at twice the compile time."""
        return self.sequential and self.weight_algorithm == "gptq"

    @property
    def needs_float_calibration(self) -> bool:
        """Whether the calibration pass over the float model has a reader: static activation
        scales, smoothing's search, bit allocation, a non-sequential weight algorithm's Hessians.
        Not round to nearest, the MSE clip search, nor a sequential weight algorithm (it measures
        what it needs itself)."""
        return (self.needs_static_stats or self.smoothing is not None or self.needs_float_hessian
                or bool(self.weight_candidates))

    @property
    def needs_float_hessian(self) -> bool:
        """X^T X in the calibration pass over the float model: the non-sequential weight
        algorithms and the output-error sensitivity of bit allocation (a sequential algorithm
        measures its Hessians itself, on the partly quantized model)."""
        return (self.needs_data_for_weights and not self.sequential_gptq) or (
            bool(self.weight_candidates) and self.sensitivity in ("output", "auto"))

    @property
    def candidate_formats(self) -> tuple[QuantFormat, ...]:
        return tuple(QuantFormat.parse(t) for t in self.weight_candidates)

    @property
    def kv_formats(self) -> list[str]:
        """Every KV-cache format tag the recipe names (``kv_key``, ``kv_value``, each ``kv_layers``
        pair's); empty when the cache stays float."""
        return [t for t in [self.kv_key, self.kv_value] + [t for e in self.kv_layers for t in e[1:]] if t is not None]

    @property
    def kv_static_scales(self) -> bool:
        """Whether a KV-cache format is static (its per-layer scales calibrated by ``quantize_kv``)."""
        return any(kv_static(QuantFormat.parse(t)) for t in self.kv_formats)

    @property
    def needs_calibration(self) -> bool:
        """Static activation scales, static KV-cache scales, smoothing, GPTQ, the output-error clip
        search and bit allocation need calibration data."""
        return (self.needs_static_stats or self.kv_static_scales or self.smoothing is not None or self.needs_hessian
                or bool(self.weight_candidates))

    # ---- serialization ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rules"}
        d["rules"] = [{k: v for k, v in dataclasses.asdict(r).items() if v is not None} for r in self.rules]
        d["weight_candidates"] = list(self.weight_candidates)
        d["kv_layers"] = [list(e) for e in self.kv_layers]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "Recipe":
        check_fields(cls, d, "recipe", RecipeError)
        rules_in = d.get("rules", [])
        if not isinstance(rules_in, list):
            raise RecipeError("rules: expected a list of rules")
        rules = [_rule_from_dict(r, f"rules[{i}]") for i, r in enumerate(rules_in)]
        try:
            return cls(**{**{k: v for k, v in d.items() if k != "rules"}, "rules": tuple(rules)})
        except (TypeError, ValueError) as e:
            raise RecipeError(f"recipe.{e}") from None

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        from finegrain.io.files import atomic_write_text

        atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
        try:
            if path.stat().st_size > MAX_RECIPE_BYTES:
                raise RecipeError(f"recipe file {path} is larger than {MAX_RECIPE_BYTES} bytes")
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeError(f"recipe file {path} cannot be read ({type(e).__name__}: {e})") from None
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:
            raise RecipeError(f"recipe file {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {e}") from None
        try:
            return cls.from_dict(data)
        except RecipeError as e:
            raise RecipeError(f"{path}: {e}") from None


def _rule_from_dict(d: Any, where: str) -> Rule:
    check_fields(Rule, d, where, RecipeError)
    kw = dict(d)
    try:
        for key in ("weight", "activation"):
            if kw.get(key) is not None:
                v = kw[key]
                kw[key] = QuantFormat.parse(v) if isinstance(v, str) else QuantFormat.from_dict(v, key)
        return Rule(**kw)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{where}.{e}") from None


# ---- presets ------------------------------------------------------------------------------------
def _w(bits: int, group: int | None, symmetric: bool) -> QuantFormat:
    if group is None:
        return QuantFormat(bits=bits, granularity="channel", symmetric=symmetric, scale="fp16")
    return QuantFormat(bits=bits, granularity="group", group_size=group, symmetric=symmetric, scale="fp16")


A8_DYNAMIC = QuantFormat(bits=8, granularity="token", symmetric=True, scale="fp32", dynamic=True)
A8_STATIC = QuantFormat(bits=8, granularity="tensor", symmetric=True, scale="fp32")
A4_DYNAMIC = QuantFormat(bits=4, granularity="token", symmetric=True, scale="fp32", dynamic=True)
A4_G64 = QuantFormat(bits=4, granularity="group", group_size=64, symmetric=True, scale="fp32", dynamic=True)


def _linears(name: str, weight: QuantFormat, act: QuantFormat | None = None, **opts: Any) -> Recipe:
    # lm_head and embeddings stay in float by default (as llm-compressor / AutoGPTQ do): the
    # tied SmolLM2 embedding is 21% of its weights and the logits are the most sensitive layer.
    return Recipe(name=name, rules=(Rule(role="linear", weight=weight, activation=act),), **opts)


PRESETS: dict[str, Recipe] = {
    "w8a8": _linears("w8a8", _w(8, None, True), A8_DYNAMIC),
    "w8a8-static": _linears("w8a8-static", _w(8, None, True), A8_STATIC),
    "w4a16-g128": _linears("w4a16-g128", _w(4, 128, False)),
    "w4a16-g64": _linears("w4a16-g64", _w(4, 64, False)),
    "w3a16-g128": _linears("w3a16-g128", _w(3, 128, False)),
    "w4a8-g128": _linears("w4a8-g128", _w(4, 128, False), A8_DYNAMIC),
    "w8a16": _linears("w8a16", _w(8, None, True)),
    "w4a4-g128": _linears("w4a4-g128", _w(4, 128, False), A4_DYNAMIC),
    # folds (passes/fold_*.py): smoothing for W8A8, rotation for 4-bit activations
    "w8a8-smooth": _linears("w8a8-smooth", _w(8, None, True), A8_DYNAMIC, smoothing="smoothquant"),
    "w8a8-os+": _linears("w8a8-os+", _w(8, None, True), A8_DYNAMIC, smoothing="os+"),
    "w4a8-rot": _linears("w4a8-rot", _w(4, 128, False), A8_DYNAMIC, rotate=True),
    "w4a8-hadamard": _linears("w4a8-hadamard", _w(4, 128, False), A8_DYNAMIC, rotate=True, rotation_mode="online"),
    "w4a4-rot": _linears("w4a4-rot", _w(4, 128, False), A4_DYNAMIC, rotate=True),
    "w4a4-hadamard": _linears("w4a4-hadamard", _w(4, 128, False), A4_DYNAMIC, rotate=True, rotation_mode="online"),
    "w4a4-rot-smooth": _linears("w4a4-rot-smooth", _w(4, 128, False), A4_DYNAMIC, rotate=True,
                                smoothing="smoothquant"),
}


def _block(tag: str) -> tuple[QuantFormat, QuantFormat]:
    """The same block format for weights (static) and activations (dynamic, scales at run time)."""
    return QuantFormat.parse(tag), QuantFormat.parse(tag + "-dyn")


# GPTQ as the presets run it (issue #18, measured in benchmarks/w4_accuracy.py): sequential (the
# recipe default), act-order, group scales from the output-error clip search, 5% damping
GPTQ = {"weight_algorithm": "gptq", "gptq_clip": True, "gptq_damp": 0.05}

# formats of issue #4: OCP MX (block 32, E8M0 scales), NVFP4 / NVINT4 (block 16, E4M3 x fp32
# scales), FP8, dual-grained W4A8, BitMoD, NormalFloat; and the weight algorithms
PRESETS.update({
    "mxint8": _linears("mxint8", *_block("int8-g32-sym-e8m0")),
    "mxfp8": _linears("mxfp8", *_block("e4m3-g32-sym-e8m0")),
    "mxfp6": _linears("mxfp6", *_block("e2m3-g32-sym-e8m0")),
    "mxfp4": _linears("mxfp4", *_block("e2m1-g32-sym-e8m0")),
    "nvfp4": _linears("nvfp4", *_block("e2m1-g16-sym-e4m3")),
    "nvint4": _linears("nvint4", *_block("int4-g16-sym-e4m3")),
    "mxfp4-rot": _linears("mxfp4-rot", *_block("e2m1-g32-sym-e8m0"), rotate=True),
    "nvfp4-rot": _linears("nvfp4-rot", *_block("e2m1-g16-sym-e4m3"), rotate=True),
    "nvint4-rot": _linears("nvint4-rot", *_block("int4-g16-sym-e4m3"), rotate=True),
    "fp8": _linears("fp8", QuantFormat.parse("e4m3-channel-sym-fp32"), QuantFormat.parse("e4m3-token-sym-fp32-dyn")),
    # block-wise FP8 (DeepSeek-V3 style): 128 x 128 weight blocks, activations in 1 x 128 groups per token
    "fp8-block": _linears("fp8-block", QuantFormat.parse("e4m3-g128x128-sym-fp32"),
                          QuantFormat.parse("e4m3-g128-sym-fp32-dyn")),
    "w4a16-g128-clip": _linears("w4a16-g128-clip", _w(4, 128, False), weight_algorithm="clip"),
    "w4a16-g128-gptq": _linears("w4a16-g128-gptq", _w(4, 128, False), **GPTQ),
    # AWQ (passes/fold_smoothing.py): activation-aware scales folded exactly, then clip search or GPTQ
    # AWQ's 256 rows per site come from the first 8 calibration batches (the float pass over all
    # 32 cost 37 s of a 2.5 min compile for the same sample size; ppl within noise: README, #18)
    "w4a16-g128-awq": _linears("w4a16-g128-awq", _w(4, 128, False), smoothing="awq", weight_algorithm="clip",
                               float_calibration_samples=8),
    "w4a16-g128-awq-gptq": _linears("w4a16-g128-awq-gptq", _w(4, 128, False), smoothing="awq",
                                    float_calibration_samples=8, **GPTQ),
    "w3a16-g128-awq-gptq": _linears("w3a16-g128-awq-gptq", _w(3, 128, False), smoothing="awq",
                                    float_calibration_samples=8, **GPTQ),
    "w3a16-g128-gptq": _linears("w3a16-g128-gptq", _w(3, 128, False), **GPTQ),
    "w4a16-g64-gptq": _linears("w4a16-g64-gptq", _w(4, 64, False), **GPTQ),
    # QuaRot's residual rotation (exact in float) before sequential GPTQ: weight-only, so no online
    # Hadamard; the rotated inputs make GPTQ's error compensation work across outlier channels
    "w4a16-g128-rot-gptq": _linears("w4a16-g128-rot-gptq", _w(4, 128, False), rotate=True, **GPTQ),
    "w4a16-g64-rot-gptq": _linears("w4a16-g64-rot-gptq", _w(4, 64, False), rotate=True, **GPTQ),
    "w3a16-g128-rot-gptq": _linears("w3a16-g128-rot-gptq", _w(3, 128, False), rotate=True, **GPTQ),
    # the same with the LM head and the embedding in int8 per channel (issue #18 item 4: on SmolLM2 they
    # are 113 MB of the 169 MB w4a16 artifact): the smallest W4 preset here
    "w4a16-g128-rot-gptq-head8": Recipe(name="w4a16-g128-rot-gptq-head8", rotate=True, **GPTQ, rules=(
        Rule(role="linear", weight=_w(4, 128, False)), Rule(role="lm_head", weight=_w(8, None, True)),
        Rule(role="embedding", weight=_w(8, None, True)))),
    # W4A4 (issue #18 item 4): rotation, sequential GPTQ, and each activation site's clip ratio searched
    # on the replayed rows; per token, or (the more accurate) in groups of 64 along K
    "w4a4-rot-gptq": _linears("w4a4-rot-gptq", _w(4, 128, False), A4_DYNAMIC, rotate=True, act_clip_search=True,
                              **GPTQ),
    "w4a4-g64-rot-gptq": _linears("w4a4-g64-rot-gptq", _w(4, 128, False), A4_G64, rotate=True,
                                  act_clip_search=True, **GPTQ),
    # W8A8 with rotation, sequential GPTQ and the activation clip search: SmolLM2 +0.19% (issue #18 target 0.5%)
    "w8a8-rot-gptq": _linears("w8a8-rot-gptq", _w(8, None, True), A8_DYNAMIC, rotate=True, act_clip_search=True,
                              **GPTQ),
    # COMET-style W4A4KV4 (issue #17 item 4): the above, FMPQ's few outlier activation groups at 8 bits
    # (an eighth of each site's groups of 64: 1 of 9 at hidden 576, 3 of 24 in down_proj on SmolLM2), plus a
    # 4-bit KV cache (KIVI-4 keys per channel quantized before RoPE, values per token, 128 newest tokens and
    # one sink in float); compile with kv_cache=True (--kv-cache). SmolLM2 +53.2% (all-4-bit activations
    # +59.0..62.6%; README, "W4A4KV4")
    "w4a4kv4": _linears("w4a4kv4", _w(4, 128, False), A4_G64, rotate=True, act_clip_search=True, **GPTQ,
                        act_outlier_fraction=0.125,
                        kv_key="int4-g32-asym-fp16-dyn", kv_value="int4-g32-asym-fp16-dyn", kv_key_axis="tokens",
                        kv_window=128, kv_pre_rope=True, kv_sinks=1),
    "w4a8-dgq": _linears("w4a8-dgq", QuantFormat.parse("int4-g128-asym-int8"), A8_DYNAMIC, weight_algorithm="clip"),
    "bitmod-w4": _linears("bitmod-w4", QuantFormat.parse("bitmod4-g128-sym-fp16")),
    "bitmod-w3": _linears("bitmod-w3", QuantFormat.parse("bitmod3-g128-sym-fp16")),
    # the most accurate 3-bit preset (issue #18, SmolLM2 +58.1% vs int3's +64.4%): BitMoD's per-group
    # datatypes, QuaRot's residual rotation, sequential GPTQ on 64 x 512 calibration tokens
    "bitmod-w3-rot-gptq": _linears("bitmod-w3-rot-gptq", QuantFormat.parse("bitmod3-g128-sym-fp16"), rotate=True,
                                   calibration_samples=64, **GPTQ),
    "nf4-g64": _linears("nf4-g64", QuantFormat.parse("nf4-g64-sym-fp16")),
})

# convolutional / vision / OCR models (issue #22): convs, linears and LSTM / GRU weights (weight-only:
# the recurrence's activations stay float); the classifier head (role lm_head) stays float as in the
# LLM presets; BatchNorm is folded into its conv by canonicalize
PRESETS.update({
    "w8a8-conv": Recipe(name="w8a8-conv", rules=(Rule(role="conv", weight=_w(8, None, True), activation=A8_STATIC),
                                                 Rule(role="linear", weight=_w(8, None, True), activation=A8_STATIC),
                                                 Rule(role="recurrent", weight=_w(8, None, True)))),
    "w4a16-conv": Recipe(name="w4a16-conv", rules=(Rule(role="conv", weight=_w(4, 32, False)),
                                                   Rule(role="linear", weight=_w(4, 32, False)),
                                                   Rule(role="recurrent", weight=_w(4, 32, False)))),
})


# KV cache presets (issue #17): the KV fields a weight recipe takes on (``with_kv``, ``finegrain quantize
# --kv-quant NAME``; compile with kv_cache=True). SmolLM2, WikiText-2, 4 windows of 2048 through the cache, float
# weights (README, "Quantized KV cache"): kv8 +0.09% (per token g64, same as one scale per token at head dim 64),
# kv8-fp8 +0.71%, kivi4 +0.77%, kivi2 +18.9%, zip42 +20.7%.
_KIVI = {"kv_key_axis": "tokens", "kv_window": 128, "kv_sinks": 1, "kv_pre_rope": True, "kv_rotate": True}
KV_PRESETS: dict[str, dict] = {
    # 8 bits, one (scale, zero) per token and head: no window, packed on TVM static builds
    "kv8": {"kv_key": "int8-token-asym-fp16-dyn", "kv_value": "int8-token-asym-fp16-dyn"},
    # FP8 E4M3 elements, one fp32 scale per token and head (the 8-bit float cache of vLLM / TensorRT-LLM, here
    # with a dynamic scale per token instead of one per tensor); no window: every backend runs it
    "kv8-fp8": {"kv_key": "e4m3-token-sym-fp32-dyn", "kv_value": "e4m3-token-sym-fp32-dyn"},
    # FP8 E4M3 with one calibrated fp32 scale per layer for keys and one for values (k_scale / v_scale): the
    # static FP8 cache vLLM serves from a compressed-tensors checkpoint's kv_cache_scheme (finegrain export-hf)
    "kv8-fp8-static": {"kv_key": "e4m3-tensor-sym-fp32", "kv_value": "e4m3-tensor-sym-fp32"},
    # INT8 with one calibrated fp32 scale per layer for keys and one for values: the cache ONNX Runtime's
    # GroupQueryAttention holds itself (k_quant_type PER_TENSOR, backends/onnx_gqa.py)
    "kv8-static": {"kv_key": "int8-tensor-sym-fp32", "kv_value": "int8-tensor-sym-fp32"},
    # KIVI-4 in the Hadamard-rotated space: keys per channel over 32 tokens, quantized before RoPE; values per
    # token in groups of 32; the newest 128 tokens and one sink in float
    "kivi4": {"kv_key": "int4-g32-asym-fp16-dyn", "kv_value": "int4-g32-asym-fp16-dyn", **_KIVI},
    # the same at 2 bits in groups of 16
    "kivi2": {"kv_key": "int2-g16-asym-fp16-dyn", "kv_value": "int2-g16-asym-fp16-dyn", **_KIVI},
    # RotateKV at 4 bits: pre-RoPE keys, their channels of all KV heads reordered by calibration RMS (outliers
    # first) and rotated by one Hadamard over all heads' channels; per token in groups of 64 along that rotated
    # row; values per token in groups of 64, Hadamard-rotated per head (folded into v_proj / o_proj); the sinks
    # in float: those of the first 16 positions whose residual stream carries a massive activation in calibration
    # (SmolLM2: position 0 alone, 177x the median token's RMS); no window (needs calibration batches)
    "rotatekv4": {"kv_key": "int4-g64-asym-fp16-dyn", "kv_value": "int4-g64-asym-fp16-dyn", "kv_rotate": True,
                  "kv_pre_rope": True, "kv_sink_search": 16, "kv_head_group": 0, "kv_reorder": True},
    # KIVI's settings with the pre-RoPE keys of each head coded in their calibrated Karhunen-Loeve basis
    # (kv_key_klt: widths 0 / 2-8 per component within int2-g16's bytes, groups of 16 tokens) and values per
    # token in groups of 64 at 3 bits: on SmolLM2 7436 B/token at 2048 (kivi2: 7271); needs calibration batches
    "klt-k2v3": {"kv_key": "int2-g16-asym-fp16-dyn", "kv_value": "int3-g64-asym-fp16-dyn", "kv_key_klt": True, **_KIVI},
    # ZipCache 4/2 on KIVI's keys: tokens released in blocks of 128; of each write's released tokens the half with
    # the highest normalized attention score (10% probe queries) at 4 bits, the rest at 2 (keys per channel over
    # each block's two subsets, quantized before RoPE; values per token in groups of 32); one sink in float
    "zip42": {"kv_key": "int4-g32-asym-fp16-dyn", "kv_value": "int4-g32-asym-fp16-dyn", "kv_key_axis": "tokens",
              "kv_zip_key": "int2-g32-asym-fp16-dyn", "kv_zip_value": "int2-g32-asym-fp16-dyn", "kv_zip_ratio": 0.5,
              "kv_zip_block": 128, "kv_zip_probes": 0.1, "kv_pre_rope": True, "kv_sinks": 1},
}


def with_kv(recipe: "str | Path | Recipe | dict", kv: str) -> Recipe:
    """``recipe`` with the KV cache preset ``kv`` (``KV_PRESETS``) added; a recipe that already
    quantizes or rotates the cache is refused (one source for the KV fields)."""
    r = get_recipe(recipe)
    if kv not in KV_PRESETS:
        raise RecipeError(f"unknown KV cache preset {kv!r}: one of {', '.join(KV_PRESETS)}")
    default = Recipe(name="-")
    set_ = [f.name for f in dataclasses.fields(Recipe)
            if f.name.startswith("kv_") and getattr(r, f.name) != getattr(default, f.name)]
    if set_:
        raise RecipeError(f"recipe {r.name!r} already sets {', '.join(set_)}: give the KV cache fields in the recipe "
                          f"or the preset {kv!r}, not both")
    return dataclasses.replace(r, name=f"{r.name}+{kv}", **KV_PRESETS[kv])


def get_recipe(spec: "str | Path | Recipe | dict") -> Recipe:
    """A preset name, a recipe file (.json/.yaml), a dict, or a Recipe."""
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, dict):
        return Recipe.from_dict(spec)
    s = str(spec)
    if s in PRESETS:
        return PRESETS[s]
    if Path(s).suffix in (".json", ".yaml", ".yml"):
        return Recipe.load(s)
    raise RecipeError(f"unknown recipe {s!r}: not a preset ({', '.join(PRESETS)}) nor a .json/.yaml recipe file")
