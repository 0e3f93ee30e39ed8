"""graph.json cannot run anything: every string that torch.fx would put into Python source is
checked, call targets come from an allow-list of real operator overloads, argument values are typed
JSON. Each attack class below was (or would be) code execution with a naive loader; each must be an
ArtifactError at load, and the sentinel file that the injected code would create never appears."""
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import finegrain
from finegrain.errors import ArtifactError
from finegrain.runtime.artifact import graph_module
from finegrain.runtime.graph_json import graph_from_json, graph_to_json


def payload(sentinel) -> str:
    return f"__import__('pathlib').Path({str(sentinel)!r}).touch()"


def first(g, op=None, target=None):
    return next(n for n in g if (op is None or n["op"] == op) and (target is None or n.get("target") == target))


def rename(g, old, new):
    """Rename node ``old`` to ``new`` everywhere (definition and every reference)."""
    text = json.dumps(g).replace(json.dumps({"node": old}), json.dumps({"node": new}))
    g = json.loads(text)
    for n in g:
        if n["name"] == old:
            n["name"] = new
    return g


def load_fails(path, match):
    with pytest.raises(ArtifactError, match=match):
        finegrain.load(path)


# ---- strings that reach torch.fx's generated source --------------------------------------------
def test_node_name_injection(tamper, sentinel):
    def edit(g):
        return rename(g, first(g, "call_function")["name"], f"x = {payload(sentinel)}; y")
    load_fails(tamper(graph=edit), "is not a plain identifier")


def test_placeholder_name_and_target_injection(tamper, sentinel):
    def edit_target(g):
        first(g, "placeholder")["target"] = f"input_ids=({payload(sentinel)})"
    load_fails(tamper(graph=edit_target), "placeholder takes an identifier target")

    def edit_name(g):
        return rename(g, first(g, "placeholder")["name"], f"input_ids=({payload(sentinel)})")
    load_fails(tamper(graph=edit_name), "is not a plain identifier")


@pytest.mark.parametrize("name", ["self", "torch", "getattr", "__import__", "def", "None", "x" * 300, "a.b", "0abc"])
def test_reserved_or_invalid_names(tamper, name):
    def edit(g):
        return rename(g, first(g, "call_function")["name"], name)
    load_fails(tamper(graph=edit), "not a plain identifier")


def test_get_attr_path_injection(tamper, sentinel):
    def edit(g):
        first(g, "get_attr")["target"] = f'model.norm.weight") or {payload(sentinel)} or getattr(self, "x'
    load_fails(tamper(graph=edit), "is not a stored tensor")

    def unknown(g):
        first(g, "get_attr")["target"] = "model.not_there"
    load_fails(tamper(graph=unknown), "is not a stored tensor")


def test_kwarg_key_injection(tamper, sentinel):
    def edit(g):
        first(g, "call_function", "torch.ops.aten.silu.default")["kwargs"] = {f"x={payload(sentinel)},y": 1}
    load_fails(tamper(graph=edit), "is not an argument of")

    def unknown_kw(g):
        first(g, "call_function", "torch.ops.aten.silu.default")["kwargs"] = {"inplace": True}
    load_fails(tamper(graph=unknown_kw), "'inplace' is not an argument")


# ---- call targets ---------------------------------------------------------------------------------
@pytest.mark.parametrize("target,match", [
    ("torch.ops.load_library", "disallowed target"),
    ("torch.ops.aten.__class__.__init__", "does not exist|disallowed"),
    ("torch.ops.aten.linear.default.__call__", "disallowed target"),
    ("torch.ops.aten.linear.__globals__", "does not exist|disallowed"),
    ("torch.ops.aten.__getattr__.default", "does not exist"),
    ("torch.ops.prims.add.default", "disallowed target"),
    ("torch.ops.mylib.evil.default", "disallowed target"),
    ("torch.ops.aten.from_file.default", "disallowed operator"),
    ("torch.ops.aten.save.default", "disallowed operator"),
    ("torch.ops.aten.linear.nonexistent", "does not exist"),
    ("builtins.exec", "disallowed target"),
    ("os.system", "disallowed target"),
    ("operator.attrgetter", "disallowed target"),
    ("operator.methodcaller", "disallowed target"),
    ("operator.call", "disallowed target"),
    ("torch.load", "disallowed target"),  # torch.<fn> only for sym_max / sym_min (MPT's slice bounds)
    ("torch.sym_max.__globals__", "disallowed target"),
    ("torch.sym_ite", "disallowed target"),
    (["torch.ops.aten.silu.default"], "target must be a string"),
])
def test_call_target_allow_list(tamper, target, match):
    def edit(g):
        first(g, "call_function", "torch.ops.aten.silu.default")["target"] = target
    load_fails(tamper(graph=edit), match)


@pytest.mark.parametrize("op", ["call_module", "call_method", "root", ""])
def test_only_the_node_kinds_the_writer_produces(tamper, op):
    def edit(g):
        first(g, "call_function", "torch.ops.aten.silu.default")["op"] = op
    load_fails(tamper(graph=edit), "is not a node this finegrain writes")


# ---- argument values ------------------------------------------------------------------------------
@pytest.mark.parametrize("value,match", [
    ({"device": f"cuda'); __import__('os').system('true'); ('"}, "is not cpu, cuda"),
    ({"dtype": "torch.evil"}, "unknown dtype"),
    ({"layout": "x"}, "unknown layout"),
    ({"node": "defined_nowhere"}, "not defined before it"),
    ({"float": "1e999"}, "must be 'inf'"),
    ({"callable": "os.system"}, "unknown argument encoding"),
    ({"node": "a", "extra": 1}, "unsupported argument encoding"),
    (2 ** 70, "outside int64"),
    ("x" * 10000, "longer than"),
    ([1, 2], "unsupported argument encoding"),
])
def test_argument_values_are_typed(tamper, value, match):
    def edit(g):
        n = first(g, "call_function", "torch.ops.aten.silu.default")
        n["args"] = {"tuple": [n["args"]["tuple"][0], value]}
    load_fails(tamper(graph=edit), match)


def test_deep_nesting_and_forward_references(tamper):
    def deep(g):
        v = 1
        for _ in range(100):
            v = {"list": [v]}
        first(g, "call_function", "torch.ops.aten.silu.default")["args"] = {"tuple": [v]}
    load_fails(tamper(graph=deep), "nested deeper")

    def forward_ref(g):
        g[0], g[-2] = g[-2], g[0]  # a node used before it is defined
    load_fails(tamper(graph=forward_ref), "not defined before it|get_attr")

    def no_output(g):
        return g[:-1]
    load_fails(tamper(graph=no_output), "output")

    def duplicate(g):
        g.insert(1, dict(g[0]))
    load_fails(tamper(graph=duplicate), "defined twice")


def test_string_arguments_stay_data(saved, sentinel):
    """A string argument is emitted by repr() and passed to the operator: never executed."""
    g = json.loads((saved / "graph.json").read_text())
    from safetensors.torch import load_file

    tensors = load_file(str(saved / "model.safetensors"))
    n = first(g, "call_function", "torch.ops.finegrain.dequantize_packed.default")
    args = n["args"]["tuple"]
    i = next(i for i, a in enumerate(args) if isinstance(a, str))
    args[i] = f"'); {payload(sentinel)}; ('" + '"""' + "\\"
    gm = graph_module(g, tensors)
    with pytest.raises(Exception):  # the operator rejects the format tag; nothing runs
        gm(torch.zeros(1, 4, dtype=torch.long))


def test_valid_graph_round_trips(saved):
    g = json.loads((saved / "graph.json").read_text())
    assert graph_to_json(graph_from_json(g)) == g


# ---- the fuzzer ----------------------------------------------------------------------------------
_HOSTILE = ["__import__('os').system('true')", "a b", "a.b", "x=1", "self", "torch", "getattr", "def", "", "0",
            "a\n", "é", "operator.attrgetter", "torch.ops.aten.linear.default", "torch.ops.load_library",
            "torch.ops.aten.__class__.__init__", "operator.getitem", "model.norm.weight", "input_ids", "linear"]
_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                       st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(_HOSTILE), st.text(max_size=20))
_json = st.recursive(_json_leaf, lambda c: st.one_of(st.lists(c, max_size=3),
                                                     st.dictionaries(st.sampled_from(
                                                         ["node", "list", "tuple", "dtype", "device", "float",
                                                          "layout", "memory_format", "name", "x"]), c, max_size=2)),
                     max_leaves=6)
_mutation = st.tuples(st.integers(0, 10 ** 6), st.sampled_from(["name", "op", "target", "args", "kwargs", "drop",
                                                                 "dup", "swap", "argitem"]), _json)


@pytest.fixture(scope="module")
def valid_graph(saved):
    from safetensors.torch import load_file

    return json.loads((saved / "graph.json").read_text()), load_file(str(saved / "model.safetensors"))


def _mutate(g, mutations):
    g = json.loads(json.dumps(g))
    for idx, field, value in mutations:
        i = idx % len(g)
        if field == "drop":
            del g[i]
        elif field == "dup":
            g.insert(i, json.loads(json.dumps(g[i])))
        elif field == "swap":
            j = (idx // len(g)) % len(g)
            g[i], g[j] = g[j], g[i]
        elif field == "argitem":
            args = g[i].get("args")
            if isinstance(args, dict) and isinstance(args.get("tuple"), list) and args["tuple"]:
                args["tuple"][(idx // len(g)) % len(args["tuple"])] = value
        else:
            g[i][field] = value
        if not g:
            break
    return g


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_mutation, min_size=1, max_size=3))
def test_fuzz_graph_loader(valid_graph, tmp_path, mutations):
    """Mutated graphs: the loader returns a module that re-serializes to exactly its input, or
    raises ArtifactError; nothing else escapes, and nothing from the file runs."""
    g, tensors = valid_graph
    bad = _mutate(g, mutations)
    try:
        gm = graph_module(bad, tensors)
    except ArtifactError:
        return
    assert graph_to_json(gm.graph) == bad
