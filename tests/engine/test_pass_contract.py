"""The pass contract (torch.fx PassBase, PassResult with records, idempotence, errors, stamps, size)
and training the rewritten module in PyTorch (eager and torch.compile)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase
from torch.fx.passes.infra.pass_base import PassResult as FxPassResult

import graphpeft
from graphpeft.engine.errors import GraphPeftError
from graphpeft.engine.match import STAMP
from graphpeft.engine.rewriter import get_attr_path
from graphpeft.passes import LoraConfig, LoraPass
from tests.models import MLP, EinsumModel, inputs_for, tiny_llama


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def _logits(out):
    return out["logits"] if isinstance(out, dict) else out[0]


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def exported(llama):
    """A graph the user exported themselves: torch.export(...).module(), dynamic batch/sequence."""
    x = inputs_for(llama, 2, 8)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", min=2, max=64)
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    ep = torch.export.export(llama, (), {**x, "use_cache": False}, strict=False,
                             dynamic_shapes={**shapes, "use_cache": None})
    return ep.module()


def _fresh(gm: fx.GraphModule) -> fx.GraphModule:
    return copy.deepcopy(gm)


def _nodes(gm: fx.GraphModule) -> int:
    return len(gm.graph.nodes)


# -- PassBase / PassResult ----------------------------------------------------------------------------

def test_lora_pass_on_user_exported_module(llama, exported):
    gm = _fresh(exported)
    config = LoraConfig(target_modules=["q_proj", "v_proj"])
    p = LoraPass(config)
    assert isinstance(p, PassBase)
    result = p(gm)
    assert isinstance(result, graphpeft.PassResult) and isinstance(result, FxPassResult)
    out_gm, modified = result                      # unpacks like torch.fx's PassResult
    assert out_gm is result.graph_module and modified is True and len(result) == 2
    assert isinstance(result.records, tuple) and len(result.records) == 4
    assert all(isinstance(r, graphpeft.Rewrite) for r in result.records)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.records[0].module_path = "elsewhere"
    assert {r.module_path for r in result.records} == {
        f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "v_proj")}
    x = inputs_for(llama, 3, 5, seed=1)
    with torch.no_grad():
        base = llama(**x).logits
        _close(_logits(out_gm(**x, use_cache=False)), base)          # B = 0: same outputs
        for rec in result.records:                                   # B != 0: the adapter is live
            b = next(k for k in rec.params if ".lora_B." in k)
            get_attr_path(out_gm, b).normal_()
        assert not torch.allclose(_logits(out_gm(**x, use_cache=False)), base)


def test_lora_pass_on_symbolic_traced_module():
    """fx.symbolic_trace keeps nn.Linear as a leaf call_module; the einsum on a bare parameter is an op."""
    model = EinsumModel()
    gm = fx.symbolic_trace(model)
    assert any(n.op == "call_module" for n in gm.graph.nodes)
    result = LoraPass(LoraConfig(target_modules=["mix"], r=4, lora_alpha=8))(gm)
    assert result.modified and [(r.kind, r.module_path) for r in result.records] == [("einsum", "mix")]
    x = EinsumModel.example(batch=3, seq=7, seed=2)
    with torch.no_grad():
        _close(gm(x), model(x))
        a, b = get_attr_path(gm, "mix.lora_A.default.weight"), get_attr_path(gm, "mix.lora_B.default.weight")
        b.normal_()
        w = model.mix.weight + (8 / 4) * b @ a
        expected = model.head(torch.relu(torch.einsum("bsi,oi->bso", x, w)))
        _close(gm(x), expected)


def test_lora_pass_on_default_symbolic_trace_with_leaf_modules():
    """fx.symbolic_trace keeps nn.Linear as call_module nodes: they are sites too, and merge leaves the original."""
    model = MLP().eval()
    x = torch.randn(3, 16)
    gm = fx.symbolic_trace(copy.deepcopy(model))
    assert [n.op for n in gm.graph.nodes if n.target == "fc1"] == ["call_module"]
    result = LoraPass(LoraConfig(target_modules=["fc1", "fc2"], init_lora_weights=False))(gm)
    assert [(r.module_path, r.kind) for r in result.records] == [("fc1", "linear"), ("fc2", "linear")]
    assert not torch.allclose(gm(x), model(x), atol=1e-4)
    peft_model = graphpeft.rewrite(fx.symbolic_trace(traced := copy.deepcopy(model)),
                                   LoraConfig(target_modules=["fc1"], init_lora_weights=False))
    before = traced.fc1.weight.detach().clone()
    _close(peft_model.merge_and_unload()(x), peft_model(x))
    assert torch.equal(traced.fc1.weight, before), "merging must not write into the traced model's modules"


def test_second_application_changes_nothing(exported):
    gm = _fresh(exported)
    config = LoraConfig(target_modules="all-linear")
    first = LoraPass(config)(gm)
    n_nodes, code = _nodes(gm), gm.code
    n_params = len(list(gm.parameters()))
    for p in (LoraPass(config), LoraPass(LoraConfig(target_modules="all-linear"))):
        again = p(first.graph_module)
        assert again.modified is False and again.records == ()
        assert _nodes(again.graph_module) == n_nodes and again.graph_module.code == code
        assert len(list(again.graph_module.parameters())) == n_params


def test_no_match_error_repeats_targets_and_lists_nearest_paths(exported):
    gm = _fresh(exported)
    n_nodes = _nodes(gm)
    with pytest.raises(graphpeft.NoMatchError) as err:
        LoraPass(LoraConfig(target_modules=["qproj", "vproj"]))(gm)
    msg = str(err.value)
    assert "\n" not in msg
    assert "['qproj', 'vproj']" in msg
    assert "model.layers.0.self_attn.q_proj" in msg or "model.layers.1.self_attn.q_proj" in msg
    assert _nodes(gm) == n_nodes                    # nothing was inserted
    with pytest.raises(graphpeft.NoMatchError, match=r"\['nowhere\.weight'\]"):
        LoraPass(LoraConfig(target_parameters=["nowhere.weight"]))(gm)


@pytest.mark.parametrize("kw", [dict(r=0), dict(r=-2), dict(rank_pattern={"q_proj": 0})])
def test_invalid_rank_raises(kw):
    with pytest.raises(GraphPeftError):
        LoraConfig(target_modules=["q_proj"], **kw)


# -- what a pass leaves in the graph ---------------------------------------------------------------------

@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_inserted_nodes_are_stamped_and_params_exist(exported, dropout):
    gm = _fresh(exported)
    original = {n.name for n in gm.graph.nodes}
    result = LoraPass(LoraConfig(target_modules=["q_proj", "down_proj", "embed_tokens"], lora_dropout=dropout))(gm)
    gm = result.graph_module
    inserted = {name for rec in result.records for name in rec.inserted}
    stamped = {n.name for n in gm.graph.nodes if STAMP in n.meta}
    assert stamped == inserted == {n.name for n in gm.graph.nodes} - original
    for node in gm.graph.nodes:
        if node.name in inserted:
            assert node.meta[STAMP]["rule"] == "lora" and node.meta[STAMP]["adapter"] == "default"
    params = dict(gm.named_parameters())
    assert {r.kind for r in result.records} == {"linear", "embedding"}
    for rec in result.records:
        assert rec.params
        for name, shape in rec.params.items():
            assert name in params and tuple(params[name].shape) == tuple(shape)
    gm.graph.lint()


def test_inserted_lora_dropout_follows_train_and_eval(llama):
    """A model rewritten in eval mode with lora_dropout: .train() turns the inserted dropout on, .eval() off."""
    peft_model = graphpeft.rewrite(llama, LoraConfig(target_modules=["q_proj"], lora_dropout=0.5))
    assert not peft_model.training
    x = inputs_for(llama, 2, 6, seed=4)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_B." in name:
                p.normal_()
        assert torch.equal(peft_model(**x).logits, peft_model(**x).logits)   # llama has no other dropout
        peft_model.train()
        assert not torch.equal(peft_model(**x).logits, peft_model(**x).logits)
        peft_model.eval()
        assert torch.equal(peft_model(**x).logits, peft_model(**x).logits)


def test_nodes_added_per_site_are_constant_and_linear_in_depth(exported):
    def added(gm):
        before = _nodes(gm)
        result = LoraPass(LoraConfig(target_modules="all-linear"))(gm)
        assert _nodes(result.graph_module) - before == sum(len(r.inserted) for r in result.records)
        per_site = {len(r.inserted) for r in result.records}
        assert len(per_site) == 1, per_site        # every linear site gets the same small branch
        return _nodes(result.graph_module) - before, len(result.records)

    added_2, sites_2 = added(_fresh(exported))
    deep = tiny_llama(num_hidden_layers=4)
    added_4, sites_4 = added(graphpeft.capture(deep))
    assert sites_4 == 2 * sites_2 and added_4 == 2 * added_2


# -- training ---------------------------------------------------------------------------------------------

def _trainable_names(model):
    return {n.removeprefix("graph_module.") for n, p in model.named_parameters() if p.requires_grad}


def _train(model, batch, steps, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_adapter_trains_and_base_stays_bit_identical():
    model = tiny_llama()
    peft_model = graphpeft.rewrite(model, LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=4))
    names = _trainable_names(peft_model)
    assert names == {k for rec in peft_model.records for k in rec.params} and len(names) == 12
    base = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    eager_base = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapters = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    peft_model.train()
    batch = inputs_for(model, 4, 8, seed=5)
    losses = _train(peft_model, batch, steps=6)
    assert losses[-1] < losses[0] - 1e-3, losses
    after = dict(peft_model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base.items())
    assert all(torch.equal(p, eager_base[n]) for n, p in model.named_parameters())
    assert all(not torch.equal(after[n], v) for n, v in adapters.items())


def test_adapter_trains_under_torch_compile():
    model = tiny_llama(num_hidden_layers=1)
    peft_model = graphpeft.rewrite(model, LoraConfig(target_modules=["q_proj", "v_proj"]))
    reference = copy.deepcopy(peft_model)
    base = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    peft_model.train()
    reference.train()
    batch = inputs_for(model, 2, 8, seed=6)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(peft_model)
    losses = _train(compiled, batch, steps=2)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]   # really compiled, in one piece
    expected = _train(reference, batch, steps=2)     # the same two steps in eager mode
    assert losses == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert losses[1] < losses[0]
    after = dict(peft_model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base.items())
    assert all(not torch.equal(after[n], v) for n, v in adapters.items())
