"""Float ONNX models in: the importer runs ONNX graphs with torch ops; they go through the same
pipeline (capture with a dynamic sequence length, formats, allocation) and export back to ONNX."""
import numpy as np
import onnx
import pytest
import torch

import finegrain
from finegrain.models.onnx_import import ImportError_, load_onnx

ort = pytest.importorskip("onnxruntime")


pytestmark = pytest.mark.onnx


@pytest.fixture(scope="module")
def tiny_onnx(tiny_llama, tiny_inputs, tmp_path_factory):
    example, _, _ = tiny_inputs
    path = tmp_path_factory.mktemp("onnx") / "tiny_fp.onnx"
    fp = finegrain.compile(tiny_llama, example, recipe={"name": "fp", "rules": []}, progress=False)
    fp.export_onnx(path)
    return path


def test_tiny_llama_import_runs_like_onnxruntime(tiny_onnx, tiny_inputs):
    _, _, test = tiny_inputs
    s = ort.InferenceSession(str(tiny_onnx))
    want = s.run(None, {s.get_inputs()[0].name: test.numpy()})[0]
    with torch.no_grad():
        got = load_onnx(tiny_onnx)(test).numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_imported_llama_quantizes_like_the_torch_model(tiny_onnx, tiny_llama, tiny_inputs, tmp_path):
    example, calib, test = tiny_inputs
    mod = load_onnx(tiny_onnx)
    cm = finegrain.compile(mod, example, recipe="w4a16-g128-gptq", calibration=calib, progress=False)
    ref = finegrain.compile(tiny_llama, example, recipe="w4a16-g128-gptq", calibration=calib, progress=False)
    assert len(cm.quantized) == len(ref.quantized) == 14  # the linears are found: MatMul on constant weights
    assert sorted(q["shape"] for q in cm.quantized.values()) == sorted(q["shape"] for q in ref.quantized.values())
    assert (cm(test) - ref(test)).abs().max() <= 1e-4 * ref(test).abs().max()
    longer = torch.randint(0, 256, (1, 41))  # the sequence length stayed dynamic through the import
    assert (cm(longer) - ref(longer)).abs().max() <= 1e-4 * ref(longer).abs().max()
    info = cm.export_onnx(tmp_path / "q.onnx", style="matmulnbits")  # and back out to ONNX
    s = ort.InferenceSession(info["path"])
    out = s.run(None, {s.get_inputs()[0].name: test.numpy()})[0]
    assert np.abs(out - cm(test).numpy()).max() <= 1e-5 * np.abs(out).max()


def test_minilm_onnx_import(minilm, tmp_path):
    tok = minilm.tokenizer
    enc = tok(["The quick brown fox jumps over the lazy dog.", "finegrain quantizes networks"], padding="max_length",
              max_length=16, return_tensors="pt")
    example = (enc["input_ids"], enc["attention_mask"])
    names = ("input_ids", "attention_mask")
    fp = finegrain.compile(minilm.model, example, recipe={"name": "fp", "rules": []}, progress=False, input_names=names)
    fp.export_onnx(tmp_path / "minilm.onnx")
    # captured with batch 2: the export has dynamic batch and sequence (here 3 x 7)
    s = ort.InferenceSession(str(tmp_path / "minilm.onnx"))
    enc3 = tok(["one", "two three", "four five six seven eight"], padding=True, return_tensors="pt")
    assert enc3["input_ids"].shape == (3, 7)
    out3 = s.run(None, {"input_ids": enc3["input_ids"].numpy(), "attention_mask": enc3["attention_mask"].numpy()})[0]
    with torch.no_grad():
        want3 = minilm.model(**enc3).last_hidden_state.numpy()
    assert np.abs(out3 - want3).max() <= 1e-3
    mod = load_onnx(tmp_path / "minilm.onnx", max_seq_len=512)
    enc2 = tok(["A longer sentence, to see that the imported graph keeps a dynamic length."], return_tensors="pt")
    x2 = (enc2["input_ids"], enc2["attention_mask"])
    with torch.no_grad():
        want = minilm.model(input_ids=x2[0], attention_mask=x2[1]).last_hidden_state
        assert (mod(*x2) - want).abs().max() <= 1e-3
    recipe = {"name": "w4", "rules": [{"role": "linear", "weight": "int4-g32-asym-fp16"}]}
    cm = finegrain.compile(mod, example, recipe=recipe, calibration=[example], progress=False, input_names=names)
    ref = finegrain.compile(minilm.model, example, recipe=recipe, calibration=[example], progress=False,
                            input_names=names)
    assert len(cm.quantized) == 36
    got, exp = cm(*x2), ref(*x2)
    assert (got - exp).abs().max() <= 1e-2 * exp.abs().max()
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.95  # W4 g32 error only


def test_unsupported_op_names_the_node(tmp_path):
    h = onnx.helper
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])
    g = h.make_graph([h.make_node("Einsum", ["x", "x"], ["y"], name="my_einsum", equation="ij,ij->ij")], "g", [x], [y])
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 21)]), str(tmp_path / "m.onnx"))
    with pytest.raises(ImportError_, match="my_einsum.*Einsum"):
        load_onnx(tmp_path / "m.onnx")
    with pytest.raises(finegrain.errors.InputError, match="does not exist"):
        load_onnx(tmp_path / "missing.onnx")


def test_load_model_takes_an_onnx_file(tiny_onnx):
    from finegrain.errors import InputError
    from finegrain.jobs import compile_loaded
    from finegrain.models import load_model

    lm = load_model(str(tiny_onnx))
    assert lm.task == "causal-lm" and lm.source["format"] == "onnx" and lm.tokenizer is None
    with pytest.raises(InputError, match="no tokenizer"):
        compile_loaded(lm, "w4a16-g128")


def test_convolutional_onnx_ops_import(tmp_path):
    """Conv (grouped, strided, padded, 1-D and 2-D), MaxPool, AveragePool, global pooling, Flatten and
    an unfused BatchNormalization (hand-written ONNX) run as ONNX Runtime runs them."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from finegrain.models.onnx_import import load_onnx

    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((8, 2, 3, 3)), "b1": rng.standard_normal(8), "g": rng.uniform(0.5, 2, 8),
             "beta": rng.standard_normal(8), "mean": rng.standard_normal(8), "var": rng.uniform(0.5, 2, 8),
             "w2": rng.standard_normal((6, 8, 3)), "fc": rng.standard_normal((6, 5))}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 0, 2, 1], strides=[1, 2], group=2),
        helper.make_node("BatchNormalization", ["c1", "g", "beta", "mean", "var"], ["bn"], epsilon=1e-3),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["mp"], kernel_shape=[2, 2], strides=[2, 1], pads=[0, 1, 0, 1]),
        helper.make_node("AveragePool", ["mp"], ["ap"], kernel_shape=[2, 1]),
        helper.make_node("ReduceMean", ["ap"], ["m"], axes=[2], keepdims=0),
        helper.make_node("Conv", ["m", "w2"], ["c2"], pads=[1, 1], dilations=[2]),
        helper.make_node("GlobalAveragePool", ["c2"], ["gp"]),
        helper.make_node("Flatten", ["gp"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 12, 18])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "cnn.onnx"
    onnx.save(model, str(path))
    x = rng.standard_normal((1, 4, 12, 18)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    m = load_onnx(path)
    assert m.input_float == [True]
    got = m(torch.from_numpy(x)).detach().numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
