"""ONNX files from strangers: external data stays inside the model's directory and within its
files; declared initializer sizes are checked; unreadable files are one clear error."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from finegrain.errors import InputError  # noqa: E402
from finegrain.models import load_model  # noqa: E402


pytestmark = pytest.mark.onnx


def _model(weight: TensorProto):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [weight])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _external(name, location, offset=0, length=64):
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[4, 4])
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def test_clean_model_loads(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(_model(numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")), p)
    assert load_model(p).model.input_names == ["x"]


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/hostname", "sub/../../secret.bin"])
def test_external_data_outside_the_directory_refused(tmp_path, location):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
    d = tmp_path / "model"
    d.mkdir()
    onnx.save(_model(_external("w", location)), d / "m.onnx")
    with pytest.raises(InputError, match="outside the model's directory"):
        load_model(d / "m.onnx")


def test_external_data_symlink_out_refused(tmp_path):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
    d = tmp_path / "model"
    d.mkdir()
    (d / "w.bin").symlink_to(tmp_path / "secret.bin")
    onnx.save(_model(_external("w", "w.bin")), d / "m.onnx")
    with pytest.raises(InputError, match="outside the model's directory"):
        load_model(d / "m.onnx")


def test_external_data_beyond_the_file_refused(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"\0" * 64)
    onnx.save(_model(_external("w", "w.bin", offset=32, length=64)), tmp_path / "m.onnx")
    with pytest.raises(InputError, match="lies outside"):
        load_model(tmp_path / "m.onnx")


def test_declared_size_bomb_and_wrong_size(tmp_path):
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1 << 20, 1 << 20], raw_data=b"\0" * 64)
    onnx.save(_model(t), tmp_path / "m.onnx")
    with pytest.raises(InputError, match="declares dims"):
        load_model(tmp_path / "m.onnx")
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4, 4], raw_data=b"\0" * 8)
    onnx.save(_model(t), tmp_path / "m.onnx")
    with pytest.raises(InputError, match="does not hold the data its shape says"):
        load_model(tmp_path / "m.onnx")


def test_garbage_file_is_one_clear_error(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"\xff\x00garbage" * 100)
    with pytest.raises(InputError, match="not a readable ONNX model"):
        load_model(tmp_path / "m.onnx")
