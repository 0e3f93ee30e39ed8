"""Float ONNX models in: an ``nn.Module`` that runs an ONNX graph with torch ops, so that
``torch.export`` captures it into the same FX pipeline as any PyTorch model (folds, formats, bit
allocation, artifacts, ONNX export back out).

* Every ``MatMul`` / ``Gemm`` whose weight operand is a 2-D initializer (possibly through a
  ``Transpose``) runs as ``F.linear`` on the weight in the ``[N, K]`` layout, stored under the
  initializer's name (``onnx_`` + the name with ``.`` and ``/`` as ``_``), so it is a quantizable linear
  like a PyTorch model's; other initializers are buffers.
* Shape computations (``Shape`` and the small integer tensors derived from it) run as Python
  lists of ints, so a dynamic sequence length stays symbolic under ``torch.export``.
* Covered ops: those ``torch.onnx.export`` emits for Llama-style decoders and BERT-style encoders
  (listed in ``_OPS``); any other op raises :class:`ImportError_` naming the node. Nothing is
  unpickled: ONNX files are protobuf.

Tested on float ONNX exports of a tiny Llama and of MiniLM (outputs equal to onnxruntime's).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from finegrain.errors import InputError

_DT = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64, 9: torch.bool,
       10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


class ImportError_(InputError):
    """An ONNX model the importer does not cover (names the node and op)."""


def _is_shape(v) -> bool:
    return isinstance(v, list)


def _as_list(v):
    if _is_shape(v):
        return v
    if isinstance(v, torch.Tensor):
        return v.reshape(-1).tolist()
    return [v]


def _scalar(v):
    lst = _as_list(v)
    if len(lst) != 1:
        raise ValueError(f"expected one value, got {lst}")
    return lst[0]


def _norm_axes(axes, rank):
    return [a % rank for a in axes]


def _broadcast_list(a, b, fn):
    a, b = _as_list(a), _as_list(b)
    if len(a) == 1:
        a = a * len(b)
    if len(b) == 1:
        b = b * len(a)
    return [fn(x, y) for x, y in zip(a, b)]


def _binary(fn_t, fn_py):
    def op(node, a, b):
        at, bt = isinstance(a, torch.Tensor), isinstance(b, torch.Tensor)
        if not at and not bt:  # shape arithmetic: Python (symbolic) ints and lists
            return _broadcast_list(a, b, fn_py) if (_is_shape(a) or _is_shape(b)) else fn_py(a, b)
        if _is_shape(a) or _is_shape(b):
            return fn_t(_t(a), _t(b))
        if not at:  # a Python / symbolic scalar stays a scalar (no specialization)
            return fn_t(_scalar_like(a, b), b)
        return fn_t(a, b)
    return op


def _scalar_like(a, b: torch.Tensor):
    """Scalar ``a`` as a 0-d tensor of ``b``'s dtype (symbolic ints through ``sym_*``-safe ops)."""
    return torch.ones((), dtype=b.dtype) * a


def _t(v):
    if isinstance(v, torch.Tensor):
        return v
    if _is_shape(v):
        return torch.tensor(v, dtype=torch.int64) if all(isinstance(x, int) for x in v) else torch.stack(
            [torch.as_tensor(x) for x in v])
    return torch.as_tensor(v)


def _reshape(node, x, shape):
    shape = _as_list(shape)
    if not isinstance(x, torch.Tensor):  # shape data: stays Python
        vals = _as_list(x)
        return vals[0] if shape == [] else vals
    allow_zero = node.attr.get("allowzero", 0)
    out = [x.shape[i] if (s == 0 and not allow_zero) else s for i, s in enumerate(shape)]
    return x.reshape(out)


def _slice(node, x, starts, ends, axes=None, steps=None):
    starts, ends = _as_list(starts), _as_list(ends)
    axes = list(range(len(starts))) if axes is None else _as_list(axes)
    steps = [1] * len(starts) if steps is None else _as_list(steps)
    if _is_shape(x):
        (s, e, st), = zip(starts, ends, steps)
        return x[s:e:st]  # Python slicing clamps out-of-range bounds like ONNX
    idx = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st < 0:
            raise ImportError_(f"node {node.name}: Slice with negative steps is not supported")
        dim = x.shape[a % x.dim()]
        if isinstance(e, int) and e >= (1 << 62):
            e = None
        if isinstance(s, int) and s < 0:
            s = s + dim
        if isinstance(e, int) and e < 0:
            e = e + dim
        idx[a % x.dim()] = slice(s, e, st)
    return x[tuple(idx)]


def _unsqueeze(node, x, axes):
    axes = _as_list(axes)
    if not isinstance(x, torch.Tensor):  # a scalar int of a shape computation
        return [x] if not _is_shape(x) else x
    for a in sorted(_norm_axes(axes, x.dim() + len(axes))):
        x = x.unsqueeze(a)
    return x


def _squeeze(node, x, axes=None):
    if _is_shape(x):
        return x[0] if len(x) == 1 else x
    if axes is None:
        return x.squeeze()
    for a in sorted(_norm_axes(_as_list(axes), x.dim()), reverse=True):
        x = x.squeeze(a)
    return x


def _gather(node, data, idx):
    axis = node.attr.get("axis", 0)
    if _is_shape(data):
        if isinstance(idx, torch.Tensor) and idx.dim() == 0:
            return data[int(idx)]
        lst = _as_list(idx)
        return [data[i] for i in lst] if (isinstance(idx, list) or idx.dim() == 1) else data[lst[0]]
    idx = _t(idx)
    axis %= data.dim()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = torch.index_select(data, axis, idx.reshape(-1))
    return out.reshape(*data.shape[:axis], *idx.shape, *data.shape[axis + 1:])


def _concat(node, *xs):
    if any(_is_shape(x) for x in xs) and all(_is_shape(x) or (isinstance(x, torch.Tensor) and x.numel() <= 64)
                                             for x in xs):
        return [v for x in xs for v in _as_list(x)]
    return torch.cat([_t(x) for x in xs], dim=node.attr["axis"])


def _expand(node, x, shape):
    shape = _as_list(shape)
    x = _t(x)
    rank = max(x.dim(), len(shape))
    xs = [1] * (rank - x.dim()) + list(x.shape)
    ss = [1] * (rank - len(shape)) + shape
    out = [a if (isinstance(b, int) and b == 1) else b for a, b in zip(xs, ss)]
    return x.reshape(xs).expand(out)


def _where(node, c, a, b):
    if _is_shape(c) or (_is_shape(a) and _is_shape(b)):
        return [x if cc else y for cc, x, y in zip(_as_list(c), *[_as_list(v) * (len(_as_list(c)) if len(_as_list(v)) == 1
                                                                              else 1) for v in (a, b)])]
    return torch.where(_t(c), _t(a), _t(b))


def _cast(node, x):
    dt = _DT[node.attr["to"]]
    if _is_shape(x):
        return x
    return x.to(dt)


def _range(node, start, limit, delta):
    return torch.arange(_scalar(start), _scalar(limit), _scalar(delta))


def _constant_of_shape(node, shape):
    val = node.attr.get("value")
    v = torch.zeros(1) if val is None else val
    return torch.full(_as_list(shape), v.reshape(-1)[0].item(), dtype=v.dtype)


def _reduce(fn):
    def op(node, x, axes=None):
        keep = bool(node.attr.get("keepdims", 1))
        axes = node.attr.get("axes", axes)
        if axes is None:
            return fn(x, dim=list(range(x.dim())), keepdim=keep)
        return fn(x, dim=_norm_axes(_as_list(axes), x.dim()), keepdim=keep)
    return op


def _gather_elements(node, data, idx):
    axis = node.attr.get("axis", 0) % data.dim()
    return torch.gather(data, axis, torch.where(idx < 0, idx + data.shape[axis], idx))


def _gather_nd(node, data, idx):
    b = node.attr.get("batch_dims", 0)
    if b:
        raise ImportError_(f"node {node.name}: GatherND with batch_dims is not supported")
    k = idx.shape[-1]
    flat = idx.reshape(-1, k)
    out = data[tuple(flat[:, i] for i in range(k))]
    return out.reshape(*idx.shape[:-1], *data.shape[k:])


def _layer_norm(node, x, w, b=None):
    axis = node.attr.get("axis", -1) % x.dim()
    return torch.nn.functional.layer_norm(x, x.shape[axis:], w, b, node.attr.get("epsilon", 1e-5))


def _softmax(node, x):
    return torch.softmax(x, dim=node.attr.get("axis", -1))


def _transpose(node, x):
    perm = node.attr.get("perm", list(reversed(range(x.dim()))))
    return x.permute(perm)


def _cumsum(node, x, axis):
    if node.attr.get("exclusive", 0) or node.attr.get("reverse", 0):
        raise ImportError_(f"node {node.name}: CumSum exclusive / reverse is not supported")
    return torch.cumsum(x, dim=_scalar(axis))


def _split(node, x, split=None):
    axis = node.attr.get("axis", 0)
    sizes = _as_list(split) if split is not None else node.attr.get("split")
    if sizes is None:
        n = node.attr.get("num_outputs", len(node.outputs))
        sizes = [math.ceil(x.shape[axis] / n)] * n
    return tuple(torch.split(x, sizes, dim=axis))


def _clip(node, x, lo=None, hi=None):
    return torch.clamp(x, None if lo is None else _t(lo), None if hi is None else _t(hi))


def _div(a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _pads(node, spatial: int) -> tuple[list[int], list[int] | None]:
    """ONNX ``pads`` ([x1_begin, x2_begin, ..., x1_end, x2_end]) as a symmetric torch padding, or
    (zeros, an explicit F.pad list) when begin != end; ``auto_pad`` other than NOTSET is refused."""
    if node.attr.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET", "VALID", b"VALID"):
        raise ImportError_(f"node {node.name}: auto_pad {node.attr['auto_pad']!r} is not supported (give explicit pads)")
    pads = list(node.attr.get("pads", [0] * (2 * spatial)))
    begin, end = pads[:spatial], pads[spatial:]
    if begin == end:
        return begin, None
    explicit = []
    for b, e in zip(reversed(begin), reversed(end)):  # F.pad: last dim first
        explicit += [b, e]
    return [0] * spatial, explicit


def _conv(node, x, w, b=None):
    spatial = w.dim() - 2
    pad, explicit = _pads(node, spatial)
    if explicit is not None:
        x = torch.nn.functional.pad(x, explicit)
    fn = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)[spatial - 1]
    return fn(x, w, b, stride=node.attr.get("strides", [1] * spatial), padding=pad,
              dilation=node.attr.get("dilations", [1] * spatial), groups=node.attr.get("group", 1))


def _pool(kind: str):
    def run(node, x):
        k = list(node.attr["kernel_shape"])
        spatial = len(k)
        pad, explicit = _pads(node, spatial)
        if explicit is not None:
            x = torch.nn.functional.pad(x, explicit, value=float("-inf") if kind == "max" else 0.0)
        stride = node.attr.get("strides", [1] * spatial)
        ceil = bool(node.attr.get("ceil_mode", 0))
        if kind == "max":
            fn = (torch.nn.functional.max_pool1d, torch.nn.functional.max_pool2d, torch.nn.functional.max_pool3d)[spatial - 1]
            return fn(x, k, stride, pad, dilation=node.attr.get("dilations", [1] * spatial), ceil_mode=ceil)
        fn = (torch.nn.functional.avg_pool1d, torch.nn.functional.avg_pool2d, torch.nn.functional.avg_pool3d)[spatial - 1]
        return fn(x, k, stride, pad, ceil_mode=ceil, count_include_pad=bool(node.attr.get("count_include_pad", 0)))
    return run


def _batch_norm(node, x, scale, bias, mean, var):
    return torch.nn.functional.batch_norm(x, mean, var, scale, bias, False, 0.0, node.attr.get("epsilon", 1e-5))


def _flatten(node, x):
    axis = node.attr.get("axis", 1) % max(x.dim(), 1)
    return x.reshape(*x.shape[:axis], -1) if axis else x.reshape(1, -1)


_OPS = {
    "Conv": _conv, "MaxPool": _pool("max"), "AveragePool": _pool("avg"), "BatchNormalization": _batch_norm,
    "GlobalAveragePool": lambda n, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "GlobalMaxPool": lambda n, x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True),
    "Relu": lambda n, a: torch.relu(a), "LeakyRelu": lambda n, a: torch.nn.functional.leaky_relu(a, n.attr.get("alpha", 0.01)),
    "Flatten": _flatten,
    "Add": _binary(torch.add, lambda x, y: x + y), "Sub": _binary(torch.sub, lambda x, y: x - y),
    "Mul": _binary(torch.mul, lambda x, y: x * y), "Div": _binary(_div, lambda x, y: x // y),
    "Equal": _binary(torch.eq, lambda x, y: x == y), "Less": _binary(torch.lt, lambda x, y: x < y),
    "Greater": _binary(torch.gt, lambda x, y: x > y), "LessOrEqual": _binary(torch.le, lambda x, y: x <= y),
    "GreaterOrEqual": _binary(torch.ge, lambda x, y: x >= y),
    "Max": _binary(torch.maximum, max), "Min": _binary(torch.minimum, min),
    "And": lambda n, a, b: torch.logical_and(a, b), "Or": lambda n, a, b: torch.logical_or(a, b),
    "Not": lambda n, a: torch.logical_not(a), "Pow": lambda n, a, b: torch.pow(a, b),
    "Sqrt": lambda n, a: torch.sqrt(a), "Reciprocal": lambda n, a: torch.reciprocal(a),
    "Neg": lambda n, a: torch.neg(a), "Exp": lambda n, a: torch.exp(a), "Log": lambda n, a: torch.log(a),
    "Abs": lambda n, a: torch.abs(a), "Sin": lambda n, a: torch.sin(a), "Cos": lambda n, a: torch.cos(a),
    "Tanh": lambda n, a: torch.tanh(a), "Sigmoid": lambda n, a: torch.sigmoid(a), "Erf": lambda n, a: torch.erf(a),
    "IsNaN": lambda n, a: torch.isnan(a), "Identity": lambda n, a: a,
    "MatMul": lambda n, a, b: torch.matmul(a, b), "Softmax": _softmax, "Transpose": _transpose,
    "Shape": lambda n, x: list(x.shape)[n.attr.get("start", 0):n.attr.get("end")],
    "Gather": _gather, "GatherND": _gather_nd, "GatherElements": _gather_elements, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Slice": _slice,
    "Concat": _concat, "Reshape": _reshape, "Expand": _expand, "Where": _where, "Cast": _cast, "Range": _range,
    "CumSum": _cumsum, "ConstantOfShape": _constant_of_shape, "ReduceMean": _reduce(torch.mean),
    "ReduceSum": _reduce(torch.sum), "ReduceMax": _reduce(torch.amax), "LayerNormalization": _layer_norm,
    "Gelu": lambda n, a: torch.nn.functional.gelu(a, approximate=n.attr.get("approximate", "none")),
    "Split": _split, "Clip": _clip, "Floor": lambda n, a: torch.floor(a),
}


class _Node:
    __slots__ = ("name", "op", "inputs", "outputs", "attr", "linear")

    def __init__(self, name, op, inputs, outputs, attr):
        self.name, self.op, self.inputs, self.outputs, self.attr = name, op, inputs, outputs, attr
        self.linear = None  # (weight attribute, bias attribute or None, activation input) for linears


def _attr(a):
    import onnx

    v = onnx.helper.get_attribute_value(a)
    if a.type == onnx.AttributeProto.TENSOR:
        return torch.from_numpy(np.array(onnx.numpy_helper.to_array(v)))
    if isinstance(v, bytes):
        return v.decode()
    return list(v) if isinstance(v, (list, tuple)) else v


def _safe(name: str) -> str:
    """Attribute name for an initializer: ``onnx_`` + the name with ``.``/``/`` etc. as ``_`` (the
    prefix keeps them apart from the names torch.onnx gives its own constants on re-export)."""
    return "onnx_" + "".join(c if c.isalnum() or c == "_" else "_" for c in name)


MAX_INITIALIZER_BYTES = 1 << 34


def read_onnx_file(path: Path):
    """``onnx.load`` for a file from anyone: external data only from files inside the model's
    directory (no absolute paths, ``..`` or symlinks out), within those files' sizes, and each
    initializer's declared size within sane limits before anything is read; onnx / protobuf errors
    become one InputError naming the file."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    from finegrain.errors import FinegrainError
    from finegrain.io.files import member_path

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise InputError(f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e)[:200]})") from None
    external = False
    for t in model.graph.initializer:
        if any(d < 0 for d in t.dims) or math.prod(t.dims) > MAX_INITIALIZER_BYTES:
            raise ImportError_(f"{path}: initializer {t.name!r} declares dims {list(t.dims)}")
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        external = True
        info = {e.key: e.value for e in t.external_data}
        try:
            f = member_path(path.parent, info.get("location"))
        except FinegrainError:
            raise ImportError_(f"{path}: initializer {t.name!r} names external data "
                               f"{str(info.get('location'))[:80]!r} outside the model's directory") from None
        if not f.is_file():
            raise ImportError_(f"{path}: external data file {info.get('location')!r} of {t.name!r} is missing")
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
        except ValueError:
            raise ImportError_(f"{path}: initializer {t.name!r} has a non-integer external offset/length") from None
        if offset < 0 or offset > f.stat().st_size or length > f.stat().st_size - offset:
            raise ImportError_(f"{path}: external data of {t.name!r} lies outside {info.get('location')!r}")
    if external:
        try:
            load_external_data_for_model(model, str(path.parent))
        except Exception as e:
            raise InputError(f"{path}: external data does not load ({type(e).__name__}: {str(e)[:200]})") from None
    return model


class OnnxModule(torch.nn.Module):
    """Runs an ONNX graph with torch ops (see the module docstring)."""

    def __init__(self, path: str | Path, max_seq_len: int | None = None):
        import onnx
        from types import SimpleNamespace

        super().__init__()
        # capture reads config.max_position_embeddings as the dynamic sequence length's upper bound
        # (a learned position table, e.g. BERT's 512, makes longer sequences impossible)
        self.config = SimpleNamespace(max_position_embeddings=max_seq_len)
        path = Path(path)
        if not path.is_file():
            raise InputError(f"ONNX model {path} does not exist")
        import onnx

        model = read_onnx_file(path)
        g = model.graph
        for imp in model.opset_import:
            if imp.domain not in ("", "ai.onnx"):
                raise ImportError_(f"{path}: opset domain {imp.domain!r} is not supported (float ONNX models only)")
        inits = {}
        for i in g.initializer:
            try:
                inits[i.name] = torch.from_numpy(np.array(onnx.numpy_helper.to_array(i)))
            except (ValueError, TypeError, RuntimeError) as e:
                raise ImportError_(f"{path}: initializer {i.name!r} (dims {list(i.dims)}) does not hold the data its "
                                   f"shape says ({type(e).__name__}: {str(e)[:120]})") from None
        self.input_names = [i.name for i in g.input if i.name not in inits]
        self.input_float = [onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).kind == "f"
                            if i.type.tensor_type.elem_type else False for i in g.input if i.name not in inits]
        self.output_names = [o.name for o in g.output]
        producers = {}
        nodes = []
        for i, n in enumerate(g.node):
            nd = _Node(n.name or f"node{i}", n.op_type, list(n.input), list(n.output),
                       {a.name: _attr(a) for a in n.attribute})
            if n.domain not in ("", "ai.onnx"):
                raise ImportError_(f"node {nd.name}: op {n.domain}::{n.op_type} is not supported")
            if nd.op == "Constant":
                inits[nd.outputs[0]] = nd.attr.get("value", torch.tensor(nd.attr.get("value_float",
                                                                                     nd.attr.get("value_int", 0))))
                continue
            if nd.op not in _OPS and nd.op != "Gemm":
                raise ImportError_(f"node {nd.name}: ONNX op {nd.op} is not supported by the importer yet")
            nodes.append(nd)
            for o in nd.outputs:
                producers[o] = nd
        users: dict[str, int] = {}
        for nd in nodes:
            for x in nd.inputs:
                users[x] = users.get(x, 0) + 1
        self._weights: dict[str, str] = {}  # initializer name -> attribute holding it as [N, K]
        for nd in nodes:
            w = self._linear_weight(nd, inits, producers)
            if w is None:
                continue
            name, tensor = w
            attr = _safe(name)
            if attr not in self._weights.values():
                self.register_parameter(attr, torch.nn.Parameter(tensor.contiguous(), requires_grad=False))
            self._weights[name] = attr
            bias = None
            if nd.op == "Gemm" and len(nd.inputs) > 2 and nd.inputs[2]:
                bias = _safe(nd.inputs[2])
                if not hasattr(self, bias):
                    self.register_buffer(bias, inits[nd.inputs[2]].reshape(-1).float())
            nd.linear = (attr, bias, nd.inputs[0])
        self._consts: dict[str, object] = {}
        for name, t in inits.items():
            if name in self._weights and all(nd.linear is not None for nd in nodes if name in nd.inputs):
                continue
            if t.dtype == torch.int64 and t.numel() <= 64 and t.dim() <= 1:
                self._consts[name] = t.tolist()  # shape data as Python ints / lists
            else:
                attr = _safe(name)
                while hasattr(self, attr):  # e.g. a tied weight that is also a linear's [N, K] parameter
                    attr += "_"
                self.register_buffer(attr, t)
                self._consts[name] = attr
        self._nodes = nodes

    @staticmethod
    def _linear_weight(nd, inits, producers):
        """(initializer name, weight [N, K]) when ``nd`` is a linear on a constant weight."""
        if nd.op == "Gemm":
            if nd.attr.get("transA", 0) or nd.attr.get("alpha", 1.0) != 1.0 or nd.attr.get("beta", 1.0) != 1.0:
                raise ImportError_(f"node {nd.name}: Gemm with transA / alpha / beta is not supported")
            w = inits.get(nd.inputs[1])
            if w is None:
                raise ImportError_(f"node {nd.name}: Gemm on a non-constant B is not supported")
            return nd.inputs[1], (w if nd.attr.get("transB", 0) else w.T).float()
        if nd.op != "MatMul":
            return None
        b = nd.inputs[1]
        if b in inits and inits[b].dim() == 2 and inits[b].is_floating_point():
            return b, inits[b].T.float()
        p = producers.get(b)
        if (p is not None and p.op == "Transpose" and p.inputs[0] in inits and inits[p.inputs[0]].dim() == 2
                and p.attr.get("perm", [1, 0]) == [1, 0]):
            return p.inputs[0], inits[p.inputs[0]].float()
        return None

    def forward(self, *inputs):
        env: dict[str, object] = {}
        for name, v in self._consts.items():
            env[name] = getattr(self, v) if isinstance(v, str) else v
        env.update(zip(self.input_names, inputs))
        for nd in self._nodes:
            if nd.linear is not None:
                w, b, x = nd.linear
                out = torch.nn.functional.linear(env[x], getattr(self, w), None if b is None else getattr(self, b))
                env[nd.outputs[0]] = out
                continue
            if nd.op == "Gemm":
                raise ImportError_(f"node {nd.name}: Gemm on a non-constant B is not supported")
            args = [env[i] if i else None for i in nd.inputs]
            try:
                out = _OPS[nd.op](nd, *args)
            except ImportError_:
                raise
            except Exception as e:
                raise ImportError_(f"node {nd.name} ({nd.op}): {type(e).__name__}: {e}") from e
            if isinstance(out, tuple):
                env.update(zip(nd.outputs, out))
            else:
                env[nd.outputs[0]] = out
        outs = [env[o] for o in self.output_names]
        return outs[0] if len(outs) == 1 else tuple(outs)


def load_onnx(path: str | Path, max_seq_len: int | None = None) -> OnnxModule:
    """A float ONNX model as a torch module for ``finegrain.compile`` (inputs positional, in the
    ONNX graph's input order). ``max_seq_len``: the longest sequence the model takes (models with
    a learned position table, e.g. 512 for BERT / MiniLM); capture bounds the dynamic length by it."""
    return OnnxModule(path, max_seq_len).eval()
