"""The TVM INT4 group-wise linear kernel against finegrain's reference dequantize + matmul."""
import numpy as np
import pytest
import torch

from finegrain.formats import QuantFormat

tvm = pytest.importorskip("tvm")


@pytest.mark.parametrize("tag,m", [("int4-g128-asym-fp16", 1), ("int4-g64-sym-fp16", 3), ("int4-g128-asym-fp16", 16)])
def test_int4_kernel_matches_the_reference(tag, m):
    from finegrain.backends.tvm.kernels.int4 import int4_linear, pack_int4

    torch.manual_seed(0)
    k, n = 512, 256
    fmt = QuantFormat.parse(tag)
    w = torch.randn(n, k) * 0.05
    q = fmt.quantize(w)
    x = torch.randn(m, k)
    ref = x @ fmt.dequantize(q).T
    f = int4_linear(m, k, n, fmt.group_size, n_tile=64)
    p = pack_int4(fmt, q)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in (x.numpy(), p["w"], p["scale"], p["zs"], np.zeros((m, n), np.float32))]
    f(*args)
    assert np.abs(args[-1].numpy() - ref.numpy()).max() <= 1e-4 * ref.abs().max().item()


def test_int4_kernel_refuses_shapes_it_cannot_tile():
    from finegrain.backends.tvm.kernels.int4 import int4_linear, pack_int4

    with pytest.raises(ValueError, match="group"):
        int4_linear(1, 100, 64, 128, n_tile=64)
    fmt = QuantFormat.parse("int8-g128-asym-fp16")
    with pytest.raises(ValueError, match="not INT4"):
        pack_int4(fmt, fmt.quantize(torch.randn(8, 128)))
