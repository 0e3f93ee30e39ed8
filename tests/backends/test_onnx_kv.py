"""The KV-cache graph through ONNX Runtime (past_key_i / present_key_i in and out of the exported
model) and through onnxruntime-genai, the real client of the exported folder: its logits at every
generated position equal finegrain's reference and its greedy tokens equal the reference's."""
import numpy as np
import pytest
import torch

import finegrain

pytestmark = pytest.mark.onnx
FLOAT = {"name": "float", "rules": [{"role": "linear"}]}


@pytest.fixture(scope="module")
def kv_models(tiny_llama):
    gen = torch.Generator().manual_seed(5)
    example = (torch.randint(0, 256, (1, 16), generator=gen),)
    calib = [(torch.randint(0, 256, (1, 32), generator=gen),) for _ in range(2)]
    return {r: finegrain.compile(tiny_llama, example, recipe=r, calibration=calib, progress=False, kv_cache=True)
            for r in ("w4a16-g128", "w8a8")}


def _rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("recipe", ["w4a16-g128", "w8a8"])
@pytest.mark.parametrize("style", ["qdq", "matmulnbits"])
def test_onnx_session_decodes_over_the_cache(kv_models, recipe, style):
    cm = kv_models[recipe]
    x = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(6))
    ref = cm(x)
    with cm.session("onnx", style=style) as s:
        assert _rel(ref, s.run(x)) <= 1e-4
        logits, state = s.prefill(x[:, :7])
        outs = [logits]
        for t in range(7, 20):
            logits, state = s.step(state, x[:, t:t + 1])
            outs.append(logits)
    assert _rel(ref, torch.cat(outs, 1)) <= 1e-4
    assert state["past"][0].shape[2] == 20


def test_onnxruntime_genai_loads_and_generates(kv_models, tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    from finegrain.backends.onnx import export_genai

    cm = kv_models["w4a16-g128"]
    info = export_genai(cm, tmp_path / "genai")
    assert {"model.onnx", "genai_config.json"} <= set(info["files"])
    assert all(f.startswith("MatMulNBits") for f in info["weights"].values())
    model = og.Model(str(tmp_path / "genai"))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=26, do_sample=False)
    g = og.Generator(model, params)
    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(7))
    g.append_tokens(prompt[0].numpy().astype(np.int32))
    tokens, logits = [], [torch.from_numpy(np.array(g.get_logits())).reshape(-1)]
    while not g.is_done():
        g.generate_next_token()
        tokens.append(int(g.get_next_tokens()[0]))
        if not g.is_done():
            logits.append(torch.from_numpy(np.array(g.get_logits())).reshape(-1))
    assert len(tokens) == 20
    ref = cm.generate(prompt, 20)
    assert tokens == ref.tokens
    # the logits genai decoded from, position by position, are the reference's
    seq = torch.cat([prompt, torch.tensor([tokens[:-1]])], 1)
    want = cm(seq)[0, prompt.shape[1] - 1:]
    got = torch.stack(logits[:len(want)])
    assert _rel(want, got) <= 1e-4


def test_genai_export_needs_the_cache_graph(compiled, tmp_path):
    from finegrain.backends.onnx import export_genai
    from finegrain.errors import ExportError

    with pytest.raises(ExportError, match="kv_cache=True"):
        export_genai(compiled("w8a16"), tmp_path / "g")
    assert not (tmp_path / "g").exists()
