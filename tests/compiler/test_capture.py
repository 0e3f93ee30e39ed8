"""Capture and graph queries on a small Llama built from a config and on the real MiniLM."""
import pytest
import torch

from finegrain.compiler.capture import capture
from finegrain.compiler.ir import FQN, get_tensor, producer, quantizable_ops
from finegrain.errors import CaptureError, InputError


@pytest.fixture(scope="module")
def llama_gm(tiny_llama, tiny_inputs):
    return capture(tiny_llama, tiny_inputs[0])


def test_capture_matches_eager_at_other_lengths(tiny_llama, llama_gm):
    for seq in (5, 37):
        ids = torch.randint(0, tiny_llama.config.vocab_size, (1, seq))
        with torch.no_grad():
            torch.testing.assert_close(llama_gm(ids), tiny_llama(ids).logits, rtol=1e-5, atol=1e-5)


def test_linear_kept_and_found_with_fqns(tiny_llama, llama_gm):
    ops = quantizable_ops(llama_gm)
    linears = [o for o in ops if o.kind == "linear"]
    assert len(linears) == 7 * tiny_llama.config.num_hidden_layers + 1
    assert [o.role for o in linears].count("lm_head") == 1 and linears[-1].role == "lm_head"
    names = {o.name for o in linears}
    assert "model.layers.1.mlp.down_proj" in names and "lm_head" in names
    q = next(o for o in linears if o.name == "model.layers.0.self_attn.q_proj")
    assert q.weight_fqn == "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(get_tensor(llama_gm, q.weight.target), tiny_llama.model.layers[0].self_attn.q_proj.weight)
    assert [o.kind for o in ops].count("embedding") == 1


def test_tied_weights_stored_once(tiny_llama, llama_gm):
    assert tiny_llama.lm_head.weight is tiny_llama.model.embed_tokens.weight
    emb = [n for n in llama_gm.graph.nodes if n.op == "get_attr" and n.target == "model.embed_tokens.weight"]
    assert len(emb) == 1 and len(emb[0].users) == 2  # embedding and lm_head read one node
    names = dict(llama_gm.named_buffers())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert all(n.meta[FQN] != "lm_head.weight" for n in llama_gm.graph.nodes if n.op == "get_attr")


def test_producer_walk_stops_at_compute(llama_gm):
    ops = {o.name: o for o in quantizable_ops(llama_gm)}
    norm_mul = producer(ops["model.layers.0.self_attn.q_proj"].activation)
    assert norm_mul.target == torch.ops.aten.mul.Tensor  # the RMSNorm's multiply by its weight
    assert any(a.op == "get_attr" and a.target.endswith("input_layernorm.weight") for a in norm_mul.args)
    # o_proj reads attention output through a reshape of a transpose: the walk stops at the transpose
    o_src = producer(ops["model.layers.0.self_attn.o_proj"].activation)
    assert o_src.target not in (torch.ops.aten.mul.Tensor,) and "layernorm" not in str(o_src.args)


def test_minilm_capture(minilm):
    enc = minilm.tokenizer(["a short one", "and a slightly longer sentence"], padding=True, return_tensors="pt")
    ex = (enc["input_ids"], enc["attention_mask"])
    gm = capture(minilm.model, ex, input_names=("input_ids", "attention_mask"))
    ops = quantizable_ops(gm)
    assert sum(o.kind == "linear" for o in ops) == 6 * 6  # q,k,v,o,intermediate,output per layer
    enc3 = minilm.tokenizer(["x", "y z", "a much longer third sentence here"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = minilm.model(input_ids=enc3["input_ids"], attention_mask=enc3["attention_mask"]).last_hidden_state
        torch.testing.assert_close(gm(enc3["input_ids"], enc3["attention_mask"]), ref, rtol=1e-4, atol=1e-4)


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _Branchy()

    def forward(self, x):
        return self.inner(x)


class _Branchy(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: export cannot trace it
            return x * 2
        return x


def test_unexportable_model_names_the_module():
    with pytest.raises(CaptureError) as e:
        capture(_DataDependent(), (torch.randn(2, 3),), dynamic=False)
    msg = str(e.value)
    assert "inner" in msg and "_Branchy" in msg and "what to try" in msg


def test_nan_weights_are_named(tiny_llama):
    import copy

    bad = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        bad.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(InputError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        capture(bad, (torch.zeros(1, 4, dtype=torch.long),))


def test_decompose_keeps_linear(tiny_llama, tiny_inputs):
    gm = capture(tiny_llama, tiny_inputs[0], decompose=True)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.linear.default in targets and torch.ops.aten.silu.default not in targets
    ids = torch.randint(0, tiny_llama.config.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), tiny_llama(ids).logits, rtol=1e-5, atol=1e-5)


def test_cache_kwarg_follows_the_installed_transformers(tiny_llama):
    """transformers 5.2x takes the cache as ``cache=`` (``past_key_values`` deprecated); 5.17 (the
    GPU machine's) only as ``past_key_values``, and would swallow ``cache=`` into ``**kwargs``."""
    import inspect

    from finegrain.compiler.capture import cache_kwarg

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None, **kwargs):
            return input_ids

    assert cache_kwarg(Old()) == "past_key_values"
    name = cache_kwarg(tiny_llama)
    assert name in inspect.signature(tiny_llama.forward).parameters


class _EvenLength(torch.nn.Module):
    """Works only on even sequence lengths (pairs of tokens): a real narrowing of the range."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 4)

    def forward(self, ids):
        x = self.emb(ids)
        return x.reshape(x.shape[0], x.shape[1] // 2, 8).sum(-1)


def test_a_guard_the_named_range_cannot_prove_falls_back_to_the_inferred_range(tiny_llama, monkeypatch):
    """torch 2.11 with transformers 5.17 (the GPU machine's pair) rejects the named sequence range of
    every HF model with a guard it cannot prove (``min(16 * seq, 32 * seq) == 16 * seq``). Capture then
    lets export infer the range, and keeps the graph only if the inferred range holds the named one:
    simulated here by an export that rejects named dims as torch 2.11 does; a model that really narrows
    the range (even lengths only) still fails."""
    real = torch.export.export
    calls = []

    def named(x):
        if isinstance(x, (tuple, list)):
            return any(named(v) for v in x)
        return isinstance(x, dict) and any(isinstance(v, torch.export.Dim) for v in x.values())

    def export(model, args, dynamic_shapes=None, strict=False):
        calls.append(named(dynamic_shapes))
        if named(dynamic_shapes):
            raise torch._dynamo.exc.UserError(torch._dynamo.exc.UserErrorType.CONSTRAINT_VIOLATION,
                                              "Constraints violated (seq)! Not all values of seq satisfy the "
                                              "generated guard min(16*s, 32*s) == 16*s.")
        return real(model, args, dynamic_shapes=dynamic_shapes, strict=strict)

    monkeypatch.setattr(torch.export, "export", export)
    gm = capture(tiny_llama, (torch.randint(0, 64, (1, 6)),))
    assert calls == [True, False]
    for seq in (3, 37):  # the range is not narrowed: other lengths run, odd ones included
        ids = torch.randint(0, tiny_llama.config.vocab_size, (1, seq))
        with torch.no_grad():
            torch.testing.assert_close(gm(ids), tiny_llama(ids).logits, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(torch.export, "export", real)
    with pytest.raises(CaptureError, match="could not capture"):  # the real narrowing: the named range's error
        capture(_EvenLength(), (torch.randint(0, 16, (1, 6)),))


def test_one_trace_export_equals_export_then_decompositions(llama_gm, tiny_llama, monkeypatch):
    """``export_decomposed`` (one ATen-dispatch trace on the pinned torch) gives the ops and the
    outputs of ``export`` then ``run_decompositions`` (the path any other torch takes): linear and
    SDPA kept whole where the table leaves them out, everything else decomposed alike."""
    import collections

    from finegrain.compiler.capture import export_decomposed

    def table():
        t = torch.export.default_decompositions()
        for op in (torch.ops.aten.linear.default, torch.ops.aten.scaled_dot_product_attention.default):
            t.pop(op, None)
        return t

    ids = torch.randint(0, tiny_llama.config.vocab_size, (1, 9))
    shapes = ({1: torch.export.Dim("seq", min=2, max=64)},)

    def ops(ep):  # the computation, not export's own shape / metadata checks
        return collections.Counter(str(n.target) for n in ep.graph.nodes if n.op == "call_function"
                                   and "assert" not in str(n.target) and "sym_" not in str(n.target)
                                   and not str(n.target).startswith("<built-in"))

    from torch.export import _trace

    assert torch.__version__.startswith("2.13."), "the one-trace path is verified on the pinned torch only"
    traces, export = [], _trace._export
    monkeypatch.setattr(_trace, "_export", lambda *a, **k: traces.append(k["pre_dispatch"]) or export(*a, **k))
    one = export_decomposed(llama_gm, (ids,), table(), dynamic_shapes=shapes)
    assert traces == [False]  # one trace, at ATen dispatch
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")  # what the GPU machine runs: the public path
    two = export_decomposed(llama_gm, (ids,), table(), dynamic_shapes=shapes)
    assert traces == [False, True]  # torch.export.export's training-IR trace, then run_decompositions
    assert ops(one) == ops(two), ops(one) - ops(two) or ops(two) - ops(one)
    assert ops(one)["aten.linear.default"] == 7 * tiny_llama.config.num_hidden_layers + 1
    assert ops(one)["aten.scaled_dot_product_attention.default"] == tiny_llama.config.num_hidden_layers
    assert not any("silu" in k or "transpose" in k for k in ops(one))  # decomposed
    for seq in (4, 13):
        x = torch.randint(0, tiny_llama.config.vocab_size, (1, seq))
        torch.testing.assert_close(one.module()(x), two.module()(x), rtol=0, atol=0)
        torch.testing.assert_close(one.module()(x), llama_gm(x), rtol=1e-5, atol=1e-5)
