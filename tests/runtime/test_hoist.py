"""hoist_parameter_ops: stamped parameter-only computations run once per parameter change, not per call."""

from __future__ import annotations

import copy

import torch
import torch.fx as fx

import graphpeft
from graphpeft.engine.rewriter import get_attr_path
from graphpeft.runtime.hoist import HOISTED, hoist_parameter_ops
from graphpeft.runtime.optimize import optimize_graph
from tests.models import tiny_llama

aten = torch.ops.aten


def _rewritten_llama():
    """LoRA all-linear, optimised as generation's inference graphs are (fused cat(A..), s folded onto B)."""
    model = graphpeft.rewrite(tiny_llama(), graphpeft.LoraConfig(target_modules="all-linear", lora_alpha=16),
                              optimize=False).eval()
    optimize_graph(model.graph_module, inference=True)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    return model


def _ops(gm: fx.GraphModule, *targets) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in targets)


def test_hoisted_graph_computes_the_same_and_follows_parameter_updates():
    model = _rewritten_llama()
    gm = model.graph_module
    hoisted = copy.deepcopy(gm)
    # a GraphModule copy has its own parameter objects: bind them back to the model's, as generation does
    for name, p in gm.named_parameters():
        module, _, attr = name.rpartition(".")
        setattr(hoisted.get_submodule(module) if module else hoisted, attr, p)
    cats = _ops(hoisted, aten.cat.default)
    count = hoist_parameter_ops(hoisted)
    assert count > 0
    assert _ops(hoisted, aten.cat.default) < cats           # the fused cat(A_q, A_k, A_v) left the graph
    assert sum(1 for n in hoisted.graph.nodes if n.op == "get_attr" and str(n.target).startswith(HOISTED)) == count
    ids = torch.randint(3, 50, (2, 6))
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    with torch.no_grad():
        want = gm(**inputs)
        got = hoisted(**inputs)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    with torch.no_grad():                                  # an optimizer-like in-place update of an adapter
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.5)
        want2 = gm(**inputs)
        got2 = hoisted(**inputs)
    torch.testing.assert_close(got2, want2, atol=1e-6, rtol=0)
    assert not torch.allclose(_logits(want), _logits(want2), atol=1e-4)


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def test_base_weights_and_random_ops_are_never_hoisted():
    graph = fx.Graph()
    x = graph.placeholder("x")
    w = graph.get_attr("w")
    a = graph.get_attr("a")
    base_t = graph.call_function(aten.t.default, (w,))                   # the base model's own: not stamped
    scaled = graph.call_function(aten.mul.Tensor, (a, 2.0))
    scaled.meta["graphpeft"] = {"rule": "test"}
    noise = graph.call_function(aten.dropout.default, (a, 0.5, True))     # random: recomputed on every call
    noise.meta["graphpeft"] = {"rule": "test"}
    y = graph.call_function(aten.mm.default, (x, base_t))
    z = graph.call_function(aten.mm.default, (x, scaled))
    graph.output((y, z, noise))
    root = torch.nn.Module()
    root.w = torch.nn.Parameter(torch.randn(3, 4))
    root.a = torch.nn.Parameter(torch.randn(4, 2))
    gm = fx.GraphModule(root, graph)
    assert hoist_parameter_ops(gm) == 1                                   # only mul(a, 2)
    assert _ops(gm, aten.t.default) == 1 and _ops(gm, aten.dropout.default) == 1 and _ops(gm, aten.mul.Tensor) == 0
    x_in = torch.randn(5, 4)
    with torch.no_grad():
        _, z1, _ = gm(x_in)
        torch.testing.assert_close(z1, x_in @ (root.a * 2.0))
        root.a.copy_(torch.ones(4, 2))
        _, z2, _ = gm(x_in)
    torch.testing.assert_close(z2, x_in @ torch.full((4, 2), 2.0))


def test_flattened_reads_are_the_same_objects_and_outputs():
    from graphpeft.runtime.hoist import FLAT, flatten_attribute_reads

    model = _rewritten_llama()
    gm = copy.deepcopy(model.graph_module)
    nested = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr" and "." in str(n.target)}
    ids = torch.randint(3, 50, (2, 6))
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    with torch.no_grad():
        want = gm(**inputs)
        assert flatten_attribute_reads(gm) == len(nested) > 0
        got = gm(**inputs)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    for target in nested:
        flat = getattr(gm, FLAT + target.replace(".", "__"))
        assert flat is get_attr_path(gm, target)               # an alias of the object, not a copy
    assert all("." not in str(n.target) for n in gm.graph.nodes if n.op == "get_attr")
