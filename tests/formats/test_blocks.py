"""2-D block formats (``block_rows``): scales shared by R rows x a group of K, the block-wise FP8
of recent MoE releases (``e4m3-g128x128-sym-fp32``, preset ``fp8-block``)."""
import pytest
import torch

from finegrain.formats import QuantFormat, scales
from finegrain.formats.ops import dequantize_packed
from finegrain.formats.packing import pack


def test_tag_round_trip_and_validation():
    f = QuantFormat.parse("e4m3-g128x128-sym-fp32")
    assert (f.group_size, f.block_rows, f.tag) == (128, 128, "e4m3-g128x128-sym-fp32")
    assert QuantFormat.from_dict(f.to_dict()) == f
    for bad in ("int8-channel-sym-fp16", "int4-g128-asym-fp16", "int8-g128-sym-fp32-dyn", "int4-g128-sym-int8"):
        base = QuantFormat.parse(bad).to_dict()
        with pytest.raises(ValueError, match="block_rows"):
            QuantFormat(**{**base, "block_rows": 128})
    with pytest.raises(ValueError, match="block_rows"):
        QuantFormat(kind="int", bits=8, granularity="group", group_size=32, block_rows=0)


def test_each_block_gets_the_scale_of_its_own_values():
    """300 x 576 with 128 x 128 blocks: 3 row blocks (the last of 44 rows) x 5 groups (the last of
    64 columns); every block's scale is its absmax / 448, shared by all its rows."""
    f = QuantFormat.parse("e4m3-g128x128-sym-fp32")
    w = torch.randn(300, 576, generator=torch.Generator().manual_seed(0))
    w[280, 530] = 90.0  # an outlier in the last, ragged block only
    q = f.quantize(w)
    assert q.scale.shape == (300, 5)
    for rb, rows in enumerate((slice(0, 128), slice(128, 256), slice(256, 300))):
        for g in range(5):
            block = w[rows, g * 128:(g + 1) * 128]
            assert torch.all(q.scale[rows, g] == block.abs().max() / 448)
    assert q.scale[256, 4] == torch.tensor(90.0) / 448 and q.scale[255, 4] < 0.02  # the outlier stays in its block
    err = (f.dequantize(q) - w).abs().max()
    assert err <= 90.0 / 448 * 16  # within one E4M3 step of the largest block's top binade


def test_stored_scales_are_one_per_block_and_load_back_exactly():
    f = QuantFormat.parse("e4m3-g128x128-sym-fp32")
    w = torch.randn(300, 576, generator=torch.Generator().manual_seed(1))
    q = f.quantize(w)
    stored = scales.stored_scale(f, q)
    assert stored.shape == (3, 5) == f.stored_param_shape((300, 576))
    d = dequantize_packed(pack(q.codes, f.bits, f.signed), stored, torch.empty(0, dtype=torch.uint8), f.tag,
                          [300, 576], torch.float32)
    assert torch.equal(d, f.dequantize(q))
    assert f.storage_bits((300, 576)) == 300 * 576 * 8 + 15 * 32
    assert f.stored_bytes((300, 576)) == 300 * 576 + 15 * 4
    per_row = QuantFormat.parse("e4m3-g128-sym-fp32")
    assert per_row.storage_bits((300, 576)) - f.storage_bits((300, 576)) == (300 - 3) * 5 * 32


def test_two_level_and_integer_elements_in_blocks():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(2))
    for tag in ("int8-g64x32-sym-fp16", "e2m1-g32x16-sym-e8m0", "e4m3-g128x128-sym-e4m3"):
        f = QuantFormat.parse(tag)
        q = f.quantize(w)
        rows = f.block_rows
        assert torch.equal(q.scale, q.scale[::rows].repeat_interleave(rows, 0)), tag
        rel = (f.dequantize(q) - w).norm() / w.norm()
        assert rel < (0.2 if f.kind == "e2m1" else 0.05), (tag, rel)


def test_a_clip_ratio_per_group_is_refused():
    f = QuantFormat.parse("int8-g64x32-sym-fp16")
    with pytest.raises(ValueError, match="2-D blocks"):
        f.quantize(torch.randn(64, 128), clip=torch.ones(64, 2))


def test_backends_and_exports_say_what_they_do_with_blocks(compiled):
    """fp8-block: the reference and the GPU kernels run it, TVM falls back to groups along K with
    per-row scales (its low-bit kernel; tests/backends/test_tvm_backend.py runs it), ONNX refuses it
    by name, the compressed-tensors export refuses the block layout instead of writing a wrong scale
    shape."""
    from finegrain.exports.hf import _weight_args

    cm = compiled("fp8-block")
    assert cm.check("torch") == []
    onnx = cm.check("onnx")
    assert any("2-D block scales have no ONNX form" in r.why for r in onnx)
    assert cm.check("tvm") == []
    with pytest.raises(ValueError, match="2-D block scales are not exported to compressed-tensors"):
        _weight_args(QuantFormat.parse("e4m3-g128x128-sym-fp32"), 256)
