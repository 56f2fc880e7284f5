"""lean_calls: inference graphs call torch's own bindings instead of the dispatcher's OpOverload objects, and drop
their capture-time metadata asserts; the outputs are the same values, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx

import graphpeft
from graphpeft.runtime.lean_calls import _BINDINGS, lean_calls
from tests.models import VOCAB, tiny_llama

aten = torch.ops.aten
_G = torch.Generator().manual_seed(0)


def _t(*shape):
    return torch.randn(*shape, generator=_G)


# every mapped op, with arguments as a captured graph passes them: the binding must give the ATen op's result
SAMPLES = {
    aten.add.Tensor: ((_t(2, 3), _t(2, 3)), {"alpha": 2}),
    aten.sub.Tensor: ((_t(2, 3), 1.5), {}),
    aten.mul.Tensor: ((_t(2, 3), _t(3)), {}),
    aten.div.Tensor: ((_t(2, 3), 4.0), {}),
    aten.neg.default: ((_t(2, 3),), {}),
    aten.pow.Tensor_Scalar: ((_t(2, 3), 2),),
    aten.rsqrt.default: ((_t(2, 3).abs() + 0.1,), {}),
    aten.cos.default: ((_t(4),), {}),
    aten.sin.default: ((_t(4),), {}),
    aten.mean.dim: ((_t(2, 3, 4), [-1]), {"keepdim": True}),
    aten.linear.default: ((_t(2, 5, 3), _t(4, 3), _t(4)), {}),
    aten.matmul.default: ((_t(2, 5, 3), _t(3, 4)), {}),
    aten.bmm.default: ((_t(2, 5, 3), _t(2, 3, 4)), {}),
    aten.silu.default: ((_t(2, 3),), {}),
    aten.gelu.default: ((_t(2, 3),), {"approximate": "tanh"}),
    aten.tanh.default: ((_t(2, 3),), {}),
    aten.softmax.int: ((_t(2, 3), -1), {}),
    aten.cat.default: (([_t(2, 3), _t(1, 3)], 0), {}),
    aten.unsqueeze.default: ((_t(2, 3), 1), {}),
    aten.transpose.int: ((_t(2, 3, 4), 1, 2), {}),
    aten.reshape.default: ((_t(2, 3, 4), [6, 4]), {}),
    aten.view.default: ((_t(2, 3, 4), [2, 12]), {}),
    aten.expand.default: ((_t(1, 3), [4, 3]), {}),
    aten.contiguous.default: ((_t(3, 2).t(),), {}),
    aten.to.dtype: ((_t(2, 3), torch.float64), {"copy": True}),
    aten.to.device: ((_t(2, 3), torch.device("cpu"), torch.float16), {}),
    aten.embedding.default: ((_t(10, 4), torch.tensor([[1, 7], [0, 9]])), {}),
    aten.scaled_dot_product_attention.default: ((_t(1, 2, 5, 4), _t(1, 2, 5, 4), _t(1, 2, 5, 4)),
                                                {"is_causal": True, "scale": 0.3}),
}


def test_every_binding_is_sampled():
    assert set(SAMPLES) == set(_BINDINGS)


@pytest.mark.parametrize("op", list(SAMPLES), ids=lambda op: str(op))
def test_each_binding_computes_what_its_aten_op_does(op):
    args, *rest = SAMPLES[op]
    kwargs = rest[0] if rest else {}
    expected = op(*args, **kwargs)
    graph = fx.Graph()
    inputs = [graph.placeholder(f"a{i}") for i in range(len(args))]
    graph.output(graph.call_function(op, tuple(inputs), kwargs))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    assert lean_calls(gm)["direct"] == 1
    target = next(n.target for n in gm.graph.nodes if n.op == "call_function")
    assert target is _BINDINGS[op][0]
    assert torch.equal(gm(*args), expected)


def test_a_keyword_the_binding_does_not_take_keeps_the_aten_op():
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(aten.transpose.int, (x,), {"dim0": 0, "dim1": 1}))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    assert lean_calls(gm)["direct"] == 0
    assert next(n.target for n in gm.graph.nodes if n.op == "call_function") is aten.transpose.int


def test_a_captured_llama_graph_runs_the_same_with_lean_calls():
    model = graphpeft.rewrite(tiny_llama(), graphpeft.LoraConfig(target_modules="all-linear")).eval()
    gm = model.graph_module
    lean = copy.deepcopy(gm)
    counts = lean_calls(lean)
    remaining = {str(n.target) for n in lean.graph.nodes if n.op == "call_function"}
    assert counts["direct"] > 50 and "aten.linear.default" not in remaining
    assert "aten._assert_tensor_metadata.default" not in remaining
    ids = torch.randint(0, VOCAB, (2, 7), generator=_G)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    with torch.no_grad():
        assert torch.equal(lean(**inputs)["logits"], gm(**inputs)["logits"])


def _concat_graph(empty: torch.Tensor, *, mutate: bool = False, output_copy: bool = False) -> fx.GraphModule:
    """past -> cat([detach_(lift_fresh_copy(empty)), past]) -> cat([., new]), as a captured cache layer has it."""
    root = torch.nn.Module()
    root.empty = empty
    graph = fx.Graph()
    past, new = graph.placeholder("past"), graph.placeholder("new")
    past.meta["val"] = torch.empty(1, 2, 5, 4)
    const = graph.get_attr("empty")
    wrapped = graph.call_function(aten.detach_.default, (graph.call_function(aten.lift_fresh_copy.default, (const,)),))
    copied = graph.call_function(aten.cat.default, ([wrapped, past], -2))
    copied.meta["val"] = torch.empty(1, 2, 5, 4, dtype=torch.promote_types(empty.dtype, torch.float32))
    if mutate:
        graph.call_function(aten.mul_.Tensor, (copied, 2.0))
    grown = graph.call_function(aten.cat.default, ([copied, new], -2))
    graph.output((grown, copied) if output_copy else grown)
    return fx.GraphModule(root, graph)


def test_a_concatenation_with_an_empty_constant_is_dropped_and_the_result_is_the_same():
    past, new = _t(1, 2, 5, 4), _t(1, 2, 1, 4)
    gm = _concat_graph(torch.tensor([]))
    expected = gm(past, new)
    assert lean_calls(gm)["empty_concats_dropped"] == 1
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ops == [torch.cat] and not [n for n in gm.graph.nodes if n.op == "get_attr"]
    assert torch.equal(gm(past, new), expected)


@pytest.mark.parametrize("case", ["mutated", "an output", "other dtype", "not empty"])
def test_a_concatenation_whose_copy_matters_is_kept(case):
    gm = _concat_graph(torch.tensor([], dtype=torch.float64) if case == "other dtype" else
                       torch.zeros(1, 2, 1, 4) if case == "not empty" else torch.tensor([]),
                       mutate=case == "mutated", output_copy=case == "an output")
    assert lean_calls(gm)["empty_concats_dropped"] == 0
    assert sum(n.target in (aten.cat.default, torch.cat) for n in gm.graph.nodes) == 2


def test_a_decode_step_does_not_copy_the_cache_before_appending_to_it():
    """transformers' cache layers start from tensor([]): captured, each step copied every layer's keys and
    values once more before the append; the step graph generation builds has none of those copies."""
    from graphpeft.runtime.generation import _graphs

    base = tiny_llama()
    layers = base.config.num_hidden_layers
    model = graphpeft.rewrite(base, graphpeft.LoraConfig(target_modules="all-linear")).eval()
    ids = torch.randint(3, VOCAB, (1, 6), generator=_G)
    with torch.no_grad():
        tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                do_sample=False, pad_token_id=0)
    step = _graphs(model).step
    cats = [n for n in step.graph.nodes if n.target in (aten.cat.default, torch.cat)]
    assert cats and not any(isinstance(p, fx.Node) and p.op != "placeholder" and p.target in
                            (aten.detach_.default, aten.lift_fresh_copy.default) for n in cats for p in n.args[0])
    past = [n for n in cats if any(isinstance(p, fx.Node) and p.op == "placeholder" for p in n.args[0])]
    assert len(past) == 2 * layers       # one append per layer's keys and per layer's values, nothing else
    with torch.no_grad():   # greedy by full forwards, no cache: the same tokens
        full = ids
        for _ in range(4):
            full = torch.cat([full, model(input_ids=full).logits[:, -1:].argmax(-1)], -1)
    assert torch.equal(tokens, full)


def _one_op_graph(op, args, kwargs, x_meta):
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = x_meta
    graph.output(graph.call_function(op, (x, *args), kwargs))
    return fx.GraphModule(torch.nn.Module(), graph)


@pytest.mark.parametrize("args,kwargs", [((3, 0, 2), {}), ((-1, 1, 9223372036854775807), {}), ((1, -2, None), {}),
                                         ((0,), {"start": 1, "end": 2}), ((-2, 0, 5, 2), {}), ((2, 3, 1), {})])
def test_a_slice_with_constant_bounds_is_basic_indexing_the_same_view(args, kwargs):
    x = _t(2, 3, 4, 5)
    gm = _one_op_graph(aten.slice.Tensor, args, kwargs, x)
    expected = aten.slice.Tensor(x, *args, **kwargs)
    assert lean_calls(gm)["direct"] == 1
    got = gm(x)
    assert torch.equal(got, expected) and got.stride() == expected.stride() and got.data_ptr() == expected.data_ptr()


def test_a_slice_with_a_bound_computed_in_the_graph_keeps_the_aten_op():
    graph = fx.Graph()
    x, n = graph.placeholder("x"), graph.placeholder("n")
    x.meta["val"] = _t(2, 3)
    graph.output(graph.call_function(aten.slice.Tensor, (x, 1, 0, n)))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    assert lean_calls(gm)["direct"] == 0


@pytest.mark.parametrize("dtype,kwargs,dropped", [(torch.float32, {}, True), (torch.float64, {}, False),
                                                  (torch.float32, {"copy": True}, False)])
def test_a_cast_to_the_dtype_a_tensor_has_is_dropped(dtype, kwargs, dropped):
    x = _t(2, 3)
    gm = _one_op_graph(aten.to.dtype, (dtype,), kwargs, x)
    expected = aten.to.dtype(x, dtype, **kwargs)
    assert lean_calls(gm)["casts_dropped"] == int(dropped)
    got = gm(x)
    assert torch.equal(got, expected) and (got is x) == dropped
