"""Convolutional models (issue #22 item 2): BatchNorm folded into its conv, conv weights quantized
per output channel or in groups along input channels, images of any width (declared inputs), ONNX
Runtime running the QDQ conv, and a small CNN trained here keeping its accuracy quantized."""
import math

import pytest
import torch

import finegrain
from finegrain.compiler.ir import conv_matrix, conv_weight
from finegrain.errors import InputError
from finegrain.formats import QuantFormat
from tests.backends.targets import BUILD

WIDTH = {"image": {"dynamic": {3: "width"}}}


class Net(torch.nn.Module):
    def __init__(self, classes: int = 4):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(16)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.bn2 = torch.nn.BatchNorm2d(32)
        self.conv1d = torch.nn.Conv1d(32, 32, 3, padding=1)
        self.hidden = torch.nn.Linear(32, 32)
        self.fc = torch.nn.Linear(32, classes)

    def forward(self, image):
        x = torch.relu(self.bn(self.conv(image)))
        x = torch.relu(self.bn2(self.conv2(x))).mean(dim=2)  # [N, C, W]: a 1-D signal along the width
        x = torch.relu(self.conv1d(x)).amax(dim=2)
        return self.fc(torch.relu(self.hidden(x)))


def _random_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net().eval()
    for bn in (net.bn, net.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    return net


@pytest.mark.parametrize("shape", [(8, 6, 3), (8, 6, 3, 3), (4, 2, 3, 3, 2)])
@pytest.mark.parametrize("tag", ["int4-g32-asym-fp16", "int8-channel-sym-fp16"])
def test_conv_matrix_round_trips(shape, tag):
    w = torch.randn(shape)
    f = QuantFormat.parse(tag)
    m = conv_matrix(w, f)
    assert torch.equal(conv_weight(m, w.shape, f), w)
    if f.granularity == "group":  # one row per (output channel, tap): the input channels of that tap
        taps = math.prod(shape[2:])
        assert m.shape == (shape[0] * taps, shape[1])
        assert torch.equal(m[1], w[0, :, *[0] * (len(shape) - 3), 1] if len(shape) > 3 else w[0, :, 1])
    else:
        assert m.shape == (shape[0], w[0].numel())


def test_batchnorm_folds_into_its_conv_exactly():
    net = _random_net()
    x = torch.randn(2, 1, 12, 20)
    cm = finegrain.compile(net, (x,), {"name": "float", "rules": [{"role": "conv"}]}, inputs=WIDTH, progress=False)
    targets = [str(n.target) for n in cm.gm.graph.nodes if n.op == "call_function"]
    assert not any("batch_norm" in t for t in targets)
    assert [(f["site"], f["action"], f["into"]) for f in cm.folds if f["pass"] == "fold_batchnorm"] == \
        [("bn", "folded", "conv"), ("bn2", "folded", "conv2")]
    with torch.no_grad():
        ref = net(x)
        assert (cm(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_a_batchnorm_after_something_else_is_refused_by_name():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, image):
            return self.bn(torch.relu(self.conv(image))).mean(dim=(2, 3))

    cm = finegrain.compile(Odd().eval(), (torch.randn(1, 1, 8, 8),), {"name": "f", "rules": [{"role": "conv"}]},
                           progress=False)
    rec = [f for f in cm.folds if f["pass"] == "fold_batchnorm"]
    assert rec[0]["action"] == "refused" and "not a convolution" in rec[0]["detail"] and rec[0]["site"] == "bn"


@pytest.mark.parametrize("tag", ["int4-g32-asym-fp16", "int8-channel-sym-fp16", "int4-g8-sym-fp16"])
def test_conv_weights_are_quantized_as_their_matrix(tag):
    net = _random_net()
    x = torch.randn(1, 1, 12, 20)
    cm = finegrain.compile(net, (x,), {"name": tag, "rules": [{"role": "conv", "weight": tag}]}, inputs=WIDTH,
                           progress=False)
    f = QuantFormat.parse(tag)
    assert set(cm.quantized) == {"conv", "conv2", "conv1d"}
    ref = finegrain.compile(net, (x,), {"name": "float", "rules": [{"role": "conv"}]}, inputs=WIDTH, progress=False)
    for name, shape in (("conv", (16, 1, 3, 3)), ("conv2", (32, 16, 3, 3)), ("conv1d", (32, 32, 3))):
        w = dict(ref.gm.named_buffers())[f"{name}.weight"]  # BatchNorm already folded in
        m = conv_matrix(w, f)
        assert cm.quantized[name]["shape"] == list(m.shape)
        assert cm.quantized[name]["bits"] == f.storage_bits(tuple(m.shape))
        by_hand = conv_weight(f.dequantize(f.quantize(m)), w.shape, f)  # RTN of the matrix view
        node = next(n for n in cm.gm.graph.nodes if n.op == "call_function" and n.meta.get("finegrain_module") == name
                    and "conv" in str(n.target))
        from torch.fx.interpreter import Interpreter

        seen = {}

        class Grab(Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                if n is node:
                    seen["w"] = self.env[n.args[1]]
                return out

        Grab(cm.gm).run(x)
        assert torch.equal(seen["w"], by_hand.to(seen["w"].dtype)), name
    with torch.no_grad():  # and the model is still the model, within the format's error
        y, r = cm(x), net(x)
        assert 0 < (y - r).abs().max() <= 0.2 * r.abs().max()


@pytest.mark.onnx
@pytest.mark.parametrize("preset, form", [("w4a16-conv", "block 32 along input channels"), ("w8a8-conv", "axis 0")])
def test_images_of_any_width_on_torch_and_onnx(tmp_path, preset, form):
    net = _random_net()
    calib = [(torch.randn(1, 1, 12, w),) for w in (16, 20, 28, 36)]
    cm = finegrain.compile(net, (torch.randn(1, 1, 12, 20),), preset, calib, inputs=WIDTH, progress=False)
    spec = cm.input_specs[0]
    assert spec["name"] == "image" and spec["dynamic_dims"] == [3] and spec["dims"][0]["label"] == "width"
    cm.save(tmp_path / "art")
    loaded = finegrain.load(tmp_path / "art")
    info = loaded.export_onnx(tmp_path / "m.onnx")
    conv_forms = {k: v for k, v in info["weights"].items() if k.startswith("conv")}
    assert len(conv_forms) == 3 and all(v.endswith("-> Conv") and form in v for v in conv_forms.values())
    with loaded.session("onnx") as s:
        for w in (8, 20, 57):
            x = torch.randn(2 if w == 57 else 1, 1, 12, w) if False else torch.randn(1, 1, 12, w)
            ref = loaded(x)
            assert (s.run(x) - ref).abs().max() <= 1e-4 * ref.abs().max() + 1e-6, w
    with pytest.raises(InputError, match=r"dim 2 must be 12"):
        loaded(torch.randn(1, 1, 10, 20))


def test_declared_inputs_are_checked():
    net = _random_net()
    x = torch.randn(1, 1, 12, 20)
    with pytest.raises(InputError, match=r"'images' not among the model's inputs \(image\)"):
        finegrain.compile(net, (x,), "w4a16-conv", inputs={"images": {"dynamic": {3: "width"}}}, progress=False)
    with pytest.raises(InputError, match="dim 7 is not a dim"):
        finegrain.compile(net, (x,), "w4a16-conv", inputs={"image": {"dynamic": {7: "w"}}}, progress=False)
    with pytest.raises(InputError, match="example has size 1"):
        finegrain.compile(net, (x,), "w4a16-conv", inputs={"image": {"dynamic": {0: "batch"}}}, progress=False)

    class Fixed(torch.nn.Module):  # a linear over the width: export specializes the dim
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(20, 4)

        def forward(self, image):
            return self.fc(image)

    with pytest.raises(InputError, match="only works with size 20 there"):
        finegrain.compile(Fixed(), (torch.randn(1, 12, 20),), "w8a16", inputs={"image": {"dynamic": {2: "width"}}},
                          progress=False)


def _bars(n: int, gen: torch.Generator, width: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A 4-class image task: a horizontal bar, a vertical bar, a diagonal or a square, at a random
    place, in noise."""
    y = torch.randint(0, 4, (n,), generator=gen)
    x = 0.5 * torch.randn(n, 1, 12, width, generator=gen)
    for i in range(n):
        r, c = (int(v) for v in torch.randint(2, 9, (2,), generator=gen))
        c = min(c, width - 4)
        if y[i] == 0:
            x[i, 0, r, c - 2:c + 3] += 1.5
        elif y[i] == 1:
            x[i, 0, r - 2:r + 3, c] += 1.5
        elif y[i] == 2:
            for k in range(-2, 3):
                x[i, 0, r + k, c + k] += 1.5
        else:
            x[i, 0, r - 1:r + 2, c - 1:c + 2] += 1.0
    return x, y


def test_a_trained_cnn_keeps_its_accuracy_quantized(capsys):
    """Train the CNN on the synthetic task, quantize it (W8A8 static: int8 per-channel conv / linear
    weights, int8 per-tensor activations; W4: int4 groups of 32 along input channels), measure
    accuracy on held-out images of two widths: FP and quantized side by side."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xs, ys = _bars(1536, gen)
    for epoch in range(10):
        for i in range(0, len(xs), 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xs[i:i + 64]), ys[i:i + 64]).backward()
            opt.step()
    net.eval()
    tests = {w: _bars(512, gen, w) for w in (16, 24)}

    def accuracy(fn) -> dict:
        with torch.no_grad():
            return {w: float((fn(x).argmax(-1) == y).float().mean()) for w, (x, y) in tests.items()}

    fp = accuracy(net)
    calib = [(xs[i:i + 1],) for i in range(0, 64, 4)]
    rows = {"fp32": fp}
    crude = {"name": "w2-tensor", "rules": [{"role": "conv", "weight": "int2-tensor-sym-fp32"}]}  # the metric can fail
    for preset in ("w8a8-conv", "w4a16-conv", crude):
        cm = finegrain.compile(net, (xs[:1],), preset, calib, inputs=WIDTH, progress=False)
        preset = preset if isinstance(preset, str) else preset["name"]
        rows[preset] = accuracy(lambda x: torch.cat([cm(x[i:i + 1]) for i in range(len(x))]))
    with capsys.disabled():
        print("\nCNN accuracy (4-class bars, 512 held-out images per width):",
              "; ".join(f"{k} " + ", ".join(f"w{w} {a:.3f}" for w, a in v.items()) for k, v in rows.items()))
    assert min(fp.values()) >= 0.85
    for w in tests:
        assert rows["w8a8-conv"][w] >= fp[w] - 0.02
        assert rows["w4a16-conv"][w] >= fp[w] - 0.05
        assert rows["w2-tensor"][w] <= fp[w] - 0.1


def _ocr():
    """The OCR shape of the issue: a conv feature extractor, a BiLSTM and a GRU over the width."""
    class Ocr(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
            self.lstm = torch.nn.LSTM(8 * 6, 32, batch_first=True, bidirectional=True)
            self.gru = torch.nn.GRU(64, 32, batch_first=True)
            self.fc = torch.nn.Linear(32, 10)

        def forward(self, image):
            x = torch.relu(self.conv(image))  # [N, 8, 6, W]
            x = x.flatten(1, 2).transpose(1, 2)  # [N, W, 48]
            y, _ = self.lstm(x)
            y, _ = self.gru(y)
            return self.fc(y)

    torch.manual_seed(0)
    return Ocr().eval()


@pytest.mark.onnx
def test_recurrent_weights_are_quantized_or_said_to_stay_float(tmp_path):
    """LSTM / GRU gate matrices are quantizable ops (role ``recurrent``): the *-conv presets quantize
    them (exactly the format's rounding of each matrix), ONNX Runtime agrees; a recipe without a
    rule for them says they stay float, in the warnings."""
    model = _ocr()
    x = torch.randn(1, 1, 6, 20)
    # (torch.export specializes an LSTM's sequence length: declaring the width dynamic is refused by name)
    with pytest.raises(InputError, match="dim 3 was declared dynamic, but the model only works with size 20"):
        finegrain.compile(model, (x,), "w4a16-conv", inputs=WIDTH, progress=False)
    cm = finegrain.compile(model, (x,), "w4a16-conv", progress=False)
    rec = {k for k in cm.quantized if "lstm" in k or "gru" in k}
    assert rec == {f"lstm.weight_{a}_l0{d}" for a in ("ih", "hh") for d in ("", "_reverse")} | \
        {"gru.weight_ih_l0", "gru.weight_hh_l0"}
    f = QuantFormat.parse("int4-g32-asym-fp16")
    state = dict(model.named_parameters())
    from finegrain.compiler.ops import WEIGHT
    from torch.fx.interpreter import Interpreter

    seen = {}

    class Grab(Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.target is WEIGHT:
                seen[n.args[0].args[0].target.removesuffix("_qpacked")] = out
            return out

    Grab(cm.gm).run(x)
    for name in rec:  # the matrix the recurrence reads is the format's rounding of the float one
        w = state[name].detach()
        assert cm.quantized[name]["shape"] == list(w.shape)
        assert cm.quantized[name]["bits"] == f.storage_bits(tuple(w.shape))
        assert torch.equal(seen[name], f.dequantize(f.quantize(w)).to(w.dtype)), name
    with torch.no_grad():
        ref, y = model(x), cm(x)
    assert 0 < (y - ref).abs().max() <= 0.2 * ref.abs().max()
    cm.save(tmp_path / "ocr")  # the marker op is on the artifact loader's allow-list
    assert torch.equal(finegrain.load(tmp_path / "ocr")(x), y)
    info = cm.export_onnx(tmp_path / "ocr.onnx")
    assert sum("of the matrix" in v for v in info["weights"].values()) == 6
    with cm.session("onnx") as s:
        assert (s.run(x) - y).abs().max() <= 1e-4 * y.abs().max()
    if __import__("importlib").util.find_spec("tvm") is not None:  # TVM's LSTM / GRU over packed weights
        with cm.session("tvm", target=BUILD) as s:
            assert {v["kind"] for k, v in s.build["kernels"].items() if k.startswith(("lstm", "gru"))} == \
                {"recurrent (weight dequantized per call, fp32 recurrent)"}
            assert (s.run(x) - y).abs().max() <= 1e-4 * y.abs().max()
    plain = finegrain.compile(model, (x,), "w8a16", progress=False)  # linears only
    assert not any("lstm" in k for k in plain.quantized)
    assert any(w.startswith("6 recurrent weight(s)") and "stay float" in w for w in plain.warnings)
    assert any(w.startswith("1 conv weight(s)") for w in plain.warnings)


@pytest.mark.tvm
@pytest.mark.parametrize("preset, isa", [("w4a16-conv", "avx2"), ("w8a8-conv", "avx2"), ("w4a16-conv", "avx512")])
def test_tvm_runs_quantized_convs_over_any_width(preset, isa, tmp_path):
    """TVM: one ``main`` function over the declared width; conv weights stay packed (the low-bit
    kernels' layout) and are dequantized in the graph, the convs run in fp32; the hidden linear gets
    its low-bit kernel. Widths below, at and above the example's, one that is odd after the stride-2
    conv (dlight's implicit-GEMM schedule read past the input at such widths: convs skip it). Built
    for an AVX2 and an AVX-512 target; run where the host has the ISA."""
    from finegrain.backends.tvm.deploy import TvmDeployment
    from tests.backends.test_tvm_backend import ISA_TARGETS, _host_has

    net = _random_net()
    calib = [(torch.randn(1, 1, 12, w),) for w in (16, 20, 28)]
    cm = finegrain.compile(net, (torch.randn(1, 1, 12, 20),), preset, calib, inputs=WIDTH, progress=False)
    assert cm.check("tvm") == []
    m = cm.build(tmp_path / "dep", target=ISA_TARGETS[isa])
    if not _host_has(isa):
        pytest.skip(f"built for {isa}; this host cannot run it")
    with TvmDeployment(tmp_path / "dep") as s:
        kinds = {k: v["kind"] for k, v in m["kernels"].items()}
        assert kinds["conv.weight"].startswith("conv (weight dequantized per call") and kinds["hidden.weight"] == "int"
        for w in (8, 20, 33, 57):
            x = torch.randn(1, 1, 12, w)
            ref = cm(x)
            assert (s.run(x) - ref).abs().max() <= 1e-4 * ref.abs().max(), w
