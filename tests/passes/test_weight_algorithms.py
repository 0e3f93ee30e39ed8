"""RTN vs clip search vs GPTQ on a real layer with real activations (MiniLM-L6's weights on
Brown calibration text, held-out WikiText-2 rows for the error), GPTQ's invariants, and the
Hessian in the stats store."""
import pytest
import torch

from finegrain.compiler.stats import StatsStore
from finegrain.formats import QuantFormat
from finegrain.passes.weight_algorithms import clip_search, gptq, rtn


def _inputs_of(loaded, module_name: str, texts: list[str]) -> torch.Tensor:
    """Rows (real tokens only) entering ``module_name`` over ``texts``, batched."""
    mod = dict(loaded.model.named_modules())[module_name]
    seen = []
    h = mod.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    rows = []
    with torch.inference_mode():
        for b in range(0, len(texts), 32):
            enc = loaded.tokenizer(texts[b:b + 32], return_tensors="pt", truncation=True, max_length=128, padding=True)
            loaded.model(**enc)
            rows.append(seen.pop()[enc["attention_mask"].bool()])
    h.remove()
    return torch.cat(rows)


@pytest.fixture(scope="module")
def real_layer(minilm):
    from finegrain.data import brown_paragraphs, wikitext2_test

    name = "encoder.layer.2.output.dense"  # K = 1536 (the FFN down projection)
    calib = _inputs_of(minilm, name, brown_paragraphs()[:400])  # ~10k rows > K: a well-posed Hessian
    test_lines = [line for line in wikitext2_test().splitlines() if len(line) > 200][:48]
    held_out = _inputs_of(minilm, name, test_lines)
    w = dict(minilm.model.named_modules())[name].weight.detach().float().clone()
    return w, calib.T @ calib / calib.shape[0], held_out


def _out_err(w, fmt, q, x):
    return ((fmt.dequantize(q) - w) @ x.T).pow(2).sum().item() / (w @ x.T).pow(2).sum().item()


@pytest.mark.parametrize("tag", ["int4-g128-asym-fp16", "int3-g128-asym-fp16", "e2m1-g16-sym-e4m3", "lm3-g128-sym-fp16"])
def test_gptq_and_clip_lower_held_out_output_error(real_layer, tag):
    w, h, x = real_layer
    fmt = QuantFormat.parse(tag)
    e_rtn = _out_err(w, fmt, rtn(w, fmt), x)
    e_clip = _out_err(w, fmt, clip_search(w, fmt, h)[0], x)
    e_gptq = _out_err(w, fmt, gptq(w, fmt, h, rtn(w, fmt)), x)
    assert e_clip < e_rtn
    assert e_gptq < 0.85 * e_rtn  # GPTQ's error compensation, measured on text it never saw


def test_gptq_with_a_diagonal_hessian_is_rtn():
    """With no input correlations GPTQ has nothing to compensate through: it must equal RTN."""
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(0))
    fmt = QuantFormat.parse("int4-g64-asym-fp16")
    q = gptq(w, fmt, torch.eye(256) * 3.0, rtn(w, fmt), act_order=False)
    assert torch.equal(q.codes, rtn(w, fmt).codes)


def test_gptq_act_order_keeps_groups_contiguous_and_handles_dead_inputs():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 192, generator=g)
    x = torch.randn(500, 192, generator=g) * torch.linspace(0.1, 3, 192)
    x[:, 7] = 0  # a dead input channel
    h = x.T @ x / 500
    fmt = QuantFormat.parse("int4-g64-sym-fp16")
    params = rtn(w, fmt)
    q = gptq(w, fmt, h, params, act_order=True, block=32)
    assert torch.equal(q.scale, params.scale)  # static groups: the stored layout is the format's
    assert q.codes.shape == w.shape
    assert (q.codes[:, 7] == 0).all()  # the dead column is zeroed
    err = lambda qq: ((fmt.dequantize(qq) - w) @ x.T).pow(2).sum()  # noqa: E731
    assert err(q) < err(params)


def test_gptq_names_the_layer_when_shapes_disagree():
    from finegrain.errors import InputError

    w = torch.randn(4, 8)
    fmt = QuantFormat.parse("int4-channel-sym-fp16")
    with pytest.raises(InputError, match="mlp.down_proj"):
        gptq(w, fmt, torch.eye(9), rtn(w, fmt), where="mlp.down_proj")


def test_clip_search_mse_objective_never_worse_than_rtn():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(2)).pow(3)
    for tag in ("int4-g128-asym-fp16", "int4-tensor-sym-fp32", "e2m1-g32-sym-e8m0", "int4-g128-asym-int8"):
        fmt = QuantFormat.parse(tag)
        q, ratios = clip_search(w, fmt, None)
        assert (fmt.dequantize(q) - w).pow(2).sum() <= (fmt.fake_quantize(w) - w).pow(2).sum() * 1.0001
        assert ((ratios >= 0.5) & (ratios <= 1.0)).all()


def test_stats_hessian_only_when_asked():
    xs = [torch.randn(2, 7, 16) for _ in range(3)]
    plain, with_h = StatsStore(), StatsStore(hessian=True)
    for x in xs:
        plain.update("a", x)
        with_h.update("a", x)
    assert plain["a"].xtx is None
    allx = torch.cat([x.reshape(-1, 16) for x in xs])
    torch.testing.assert_close(with_h["a"].hessian, allx.T @ allx / allx.shape[0])


def test_gptq_on_clip_searched_scales(real_layer):
    """gptq_clip: GPTQ's error compensation on top of the clip search's group scales."""
    w, h, x = real_layer
    fmt = QuantFormat.parse("int3-g128-asym-fp16")
    params = clip_search(w, fmt, h)[0]
    both = gptq(w, fmt, h, params)
    assert torch.equal(both.scale, params.scale)
    assert _out_err(w, fmt, both, x) < _out_err(w, fmt, params, x)


def test_gptq_refreshed_groups_follow_the_updated_weights(real_layer):
    """Without act-order, ``refresh`` recomputes each group's scales from the error-updated
    weights (GPTQ's original scheme): the scales differ from the up-front ones after group 0."""
    w, h, x = real_layer
    fmt = QuantFormat.parse("int4-g128-asym-fp16")
    static = gptq(w, fmt, h, rtn(w, fmt), act_order=False)
    fresh = gptq(w, fmt, h, rtn(w, fmt), act_order=False, refresh=lambda cur: rtn(cur, fmt))
    assert torch.equal(fresh.scale[:, 0], static.scale[:, 0]) and not torch.equal(fresh.scale[:, 1:], static.scale[:, 1:])
    assert _out_err(w, fmt, fresh, x) < _out_err(w, fmt, rtn(w, fmt), x)


def test_gptq_with_a_shared_factor_equals_gptq_alone(real_layer):
    """Linears reading one input share the Hessian's factorization (q / k / v, gate / up): GPTQ
    given ``gptq_factor(h)`` returns the same codes as GPTQ factoring ``h`` itself."""
    from finegrain.passes.weight_algorithms import gptq_factor

    w, h, _ = real_layer
    fmt = QuantFormat.parse("int4-g128-asym-fp16")
    f = gptq_factor(h, damp=0.05)
    for rows in (slice(0, 96), slice(96, 160)):  # two "linears" on one input
        alone = gptq(w[rows], fmt, h, rtn(w[rows], fmt), damp=0.05)
        shared = gptq(w[rows], fmt, h, rtn(w[rows], fmt), damp=0.05, factor=f)
        assert torch.equal(alone.codes, shared.codes)


@pytest.mark.parametrize("tag,act_order", [("int4-g128-asym-fp16", True), ("int4-g64-asym-fp16", False),
                                           ("int3-g32-sym-fp16", True), ("int8-channel-sym-fp32", True),
                                           ("int2-g64-asym-fp16", True), ("int8-tensor-sym-fp32", True),
                                           ("int4-g64-asym-int8", True)])  # one scale; DGQ's two-level scales
def test_gptq_integer_sweep_equals_the_generic_sweep(real_layer, monkeypatch, tag, act_order):
    """GPTQ's sweep for integer formats (``_integer_block``: parameters gathered per block, fewer
    operations per column) gives the generic sweep's codes (``quantize_column`` column by column),
    value for value, on a real layer's Hessian with ragged groups (K = 1000 is not a multiple of 64 or
    128) and ragged lazy blocks (block 96)."""
    import finegrain.passes.weight_algorithms as wa

    w, h, _ = real_layer
    w, h = w[:200, :1000], h[:1000, :1000]
    fmt = QuantFormat.parse(tag)
    params = rtn(w, fmt)
    fast = gptq(w, fmt, h, params, act_order=act_order, block=96)
    monkeypatch.setattr(wa, "IntFamily", type("NotAFamily", (), {}))  # every format takes the generic sweep
    generic = gptq(w, fmt, h, params, act_order=act_order, block=96)
    assert torch.equal(fast.codes, generic.codes) and torch.equal(fast.scale, generic.scale)
    assert not torch.equal(fast.codes, params.codes)  # GPTQ moved codes away from round-to-nearest


def test_gptq_factor_is_the_cholesky_factor_of_the_inverse(real_layer):
    """``gptq_factor``'s U (one Cholesky of the reversed Hessian, one triangular solve) is the upper
    Cholesky factor of the damped, permuted ``H^-1``: ``U^T U = H^-1``, upper, positive diagonal."""
    from finegrain.passes.weight_algorithms import gptq_factor

    _, h, _ = real_layer
    f = gptq_factor(h, damp=0.01)
    hd = h.double()[f.perm][:, f.perm]
    hd = hd + 0.01 * torch.diag(hd).mean() * torch.eye(len(hd), dtype=hd.dtype)
    want = torch.linalg.cholesky(torch.linalg.inv(hd), upper=True)
    assert torch.equal(f.U, f.U.triu()) and bool((f.U.diagonal() > 0).all())
    torch.testing.assert_close(f.U.double(), want, rtol=1e-4, atol=1e-6 * want.abs().max().item())


def test_gram_equals_the_dense_product():
    from finegrain.compiler.stats import gram

    gen = torch.Generator().manual_seed(0)
    for k in (16, 300, 577):
        x = torch.randn(200, k, generator=gen)
        g = gram(x)
        torch.testing.assert_close(g, x.T @ x, rtol=1e-5, atol=1e-3)
        assert torch.equal(g, g.T)
