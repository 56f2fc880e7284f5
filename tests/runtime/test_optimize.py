"""Graph optimisations (graphpeft.runtime.optimize): each keeps the outputs (to float rounding) and the gradient of
every adapter parameter, on several architectures, and leaves saving, disabling and merging as they were."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
import torch.fx as fx
from safetensors.torch import load_file
from torch import nn

import graphpeft
from graphpeft.engine.errors import GraphPeftError
from graphpeft.engine.match import STAMP
from graphpeft.runtime.inference import InferenceModel, merge_for_inference
from graphpeft.runtime.optimize import drop_identity_dropout, fold_scaling, fuse_shared_input, optimize_graph
from tests.models import EinsumModel, inputs_for, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_vit

aten = torch.ops.aten
OUT_TOL = dict(atol=1e-6, rtol=1e-5)      # float32 rounding of a different summation order
GRAD_TOL = dict(atol=1e-7, rtol=1e-5)


def _out(result):
    return result["logits"] if isinstance(result, dict) else result


MODELS = {
    "llama": tiny_llama, "gpt2": tiny_gpt2, "vit": tiny_vit, "bert": tiny_bert_cls,
    "bert-no-dropout": lambda: tiny_bert_cls(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "einsum": EinsumModel,
}
_CAPTURED: dict[str, tuple] = {}


def _model_and_graph(name):
    """(model, a fresh copy of its captured graph); each model is captured once per session (capture is slow)."""
    if name not in _CAPTURED:
        model = MODELS[name]()
        example = (EinsumModel.example(),) if name == "einsum" else None
        _CAPTURED[name] = model, graphpeft.capture(model, example)
    model, gm = _CAPTURED[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)       # torch's pytree deprecation chatter on deepcopy
        return model, copy.deepcopy(gm)


def _rewrite(name, config, optimize=True):
    gm = _model_and_graph(name)[1]
    torch.manual_seed(0)
    return graphpeft.rewrite(gm, config, optimize=optimize)


def _pair(name, config):
    """The same rewrite (same seed, same initial adapters) without and with the optimisations."""
    return _rewrite(name, config, optimize=False), _rewrite(name, config, optimize=True)


def _forward_backward(model, batch):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)                      # the same dropout masks for both (train mode)
    out = _out(model(**batch) if isinstance(batch, dict) else model(batch))
    (out.float() ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


def _count(gm, target, stamped=True):
    return sum(1 for n in gm.graph.nodes if n.target is target and (STAMP in n.meta) == stamped)


# name -> (builder, LoraConfig fields, inputs); init_lora_weights=False so that B != 0 and A gets gradients
CASES = {
    "llama-all-linear-alpha16": ("llama", dict(target_modules="all-linear", lora_alpha=16)),
    "llama-rslora-embedding": ("llama", dict(target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj",
                                                             "embed_tokens"], use_rslora=True, r=6, lora_alpha=7)),
    "gpt2-conv1d": ("gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_alpha=5)),
    "bert-seq-cls": ("bert-no-dropout", dict(task_type="SEQ_CLS", target_modules=["query", "key", "value"], lora_alpha=3)),
    "vit-conv": ("vit", dict(target_modules=["query", "value", "projection"], lora_alpha=32)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_optimized_graph_keeps_outputs_and_adapter_gradients(name):
    model_name, fields = CASES[name]
    model = _model_and_graph(model_name)[0]
    plain, fast = _pair(model_name, graphpeft.LoraConfig(init_lora_weights=False, **fields))
    assert fast.graph_module.code != plain.graph_module.code, "something was optimised"
    batch = inputs_for(model, 3, 7, pad=2)
    for mode in ("train", "eval"):
        plain.train(mode == "train")
        fast.train(mode == "train")
        out_plain, grads_plain = _forward_backward(plain, batch)
        out_fast, grads_fast = _forward_backward(fast, batch)
        torch.testing.assert_close(out_fast, out_plain, **OUT_TOL)
        assert sorted(grads_fast) == sorted(grads_plain) and grads_plain
        for param in grads_plain:
            assert grads_plain[param].abs().sum() > 0, f"{param} gets a gradient"
            torch.testing.assert_close(grads_fast[param], grads_plain[param], **GRAD_TOL)


def test_einsum_parameter_site_folds_scaling_into_the_small_factor():
    x = EinsumModel.example()
    config = graphpeft.LoraConfig(target_modules=["mix"], lora_alpha=24, init_lora_weights=False)
    plain, fast = _pair("einsum", config)
    assert _count(plain.graph_module, aten.mul.Tensor) == 1
    scale = [n for n in fast.graph_module.graph.nodes if n.target is aten.mul.Tensor and STAMP in n.meta]
    assert len(scale) == 1 and scale[0].args[0].op == "get_attr", "s multiplies a factor, not the product"
    out_plain, grads_plain = _forward_backward(plain, x)
    out_fast, grads_fast = _forward_backward(fast, x)
    torch.testing.assert_close(out_fast, out_plain, **OUT_TOL)
    for param in grads_plain:
        torch.testing.assert_close(grads_fast[param], grads_plain[param], **GRAD_TOL)


# -- each optimisation on its own ---------------------------------------------------------------------

def test_fuse_shared_input_makes_one_matmul_per_input_with_separate_parameters():
    pm = _rewrite("llama", graphpeft.LoraConfig(target_modules="all-linear", init_lora_weights=False), optimize=False)
    gm = pm.graph_module
    before = _count(gm, aten.linear.default)
    assert fuse_shared_input(gm) == 4, "q/k/v and gate/up of both layers"
    assert fuse_shared_input(gm) == 0, "a second run changes nothing"
    # 7 sites x 2 linears per layer before; q/k/v (3 A) -> 1 and gate/up (2 A) -> 1 per layer after
    assert _count(gm, aten.linear.default) == before - 2 * 3
    assert _count(gm, aten.cat.default) == 4
    names = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert sum(".lora_A." in n for n in names) == 14, "A stays one named parameter per site"
    fused = [n for n in gm.graph.nodes if n.target is aten.linear.default and STAMP in n.meta
             and n.args[1].target is aten.cat.default]
    assert {len(n.args[1].args[0]) for n in fused} == {2, 3}
    assert all(n.meta[STAMP]["rule"] == "lora" and n.meta[STAMP]["optimized"] == "fuse_shared_input" for n in fused)


@pytest.mark.parametrize("onto", ["activation", "weight"])
def test_fold_scaling_removes_activation_multiplies(onto):
    for alpha, muls_left in ((8, 0), (16, 2)):    # s == 1: the multiply goes; s == 2: it moves onto h or B
        pm = _rewrite("llama", graphpeft.LoraConfig(lora_alpha=alpha), optimize=False)
        gm = pm.graph_module
        assert _count(gm, aten.mul.Tensor) == 4
        assert fold_scaling(gm, onto=onto) == 4
        scaled = [n for n in gm.graph.nodes if n.target is aten.mul.Tensor and STAMP in n.meta]
        assert len(scaled) == 2 * muls_left
        if onto == "weight":
            assert all(n.args[0].op == "get_attr" and ".lora_B." in n.args[0].target for n in scaled)
        else:     # h = linear(x, A) scaled, then linear(h * s, B)
            assert all(n.args[0].target is aten.linear.default and ".lora_A." in n.args[0].args[1].target
                       for n in scaled)
            assert all(".lora_B." in next(iter(n.users)).args[1].target for n in scaled)


def _toy(scale_of, bias: bool = False, x_read_twice: bool = False):
    """x -> linear(x, B[, b]) -> mul(., scale) with every node stamped as a rule would stamp it
    (``x_read_twice``: x is read by another op too, as the base path beside a branch reads it)."""
    root = nn.Module()
    root.register_parameter("B", nn.Parameter(torch.randn(5, 3)))
    root.register_parameter("b", nn.Parameter(torch.randn(5)))
    root.register_buffer("t", torch.tensor(0.5))
    graph = fx.Graph()
    x = graph.placeholder("x")
    weight = graph.get_attr("B")
    args = (x, weight, graph.get_attr("b")) if bias else (x, weight)
    lin = graph.call_function(aten.linear.default, args)
    scale = scale_of(graph)
    out = graph.call_function(aten.mul.Tensor, (lin, scale))
    for node in graph.nodes:
        if node.op not in ("placeholder", "output"):
            node.meta[STAMP] = {"rule": "toy", "adapter": "default", "anchor": "x"}
    if x_read_twice:
        out = graph.call_function(aten.add.Tensor, (graph.call_function(aten.sum.dim_IntList, (x, [1], True)), out))
    graph.output(out)
    return fx.GraphModule(root, graph)


@pytest.mark.parametrize("case", ["tensor-scale", "bias", "unstamped"])
def test_fold_scaling_leaves_what_it_cannot_fold(case):
    gm = _toy((lambda g: g.get_attr("t")) if case == "tensor-scale" else (lambda g: 3.0), bias=case == "bias")
    if case == "unstamped":
        for node in gm.graph.nodes:
            node.meta.pop(STAMP, None)
    x = torch.randn(2, 3)
    want = gm(x)
    assert fold_scaling(gm) == 0
    torch.testing.assert_close(gm(x), want)


@pytest.mark.parametrize("onto", ["activation", "weight", "activation-read-twice"])
def test_fold_scaling_on_a_toy_graph_keeps_outputs_and_gradients(onto):
    """An activation another op reads too is not scaled (h * s would be kept beside h): the weight is."""
    twice = onto.endswith("read-twice")
    onto = onto.split("-")[0]
    gm = _toy(lambda g: 3.0, x_read_twice=twice)
    x = torch.randn(2, 3, requires_grad=True)
    want = gm(x)
    want.sum().backward()
    grads = (x.grad.clone(), gm.B.grad.clone())
    x.grad, gm.B.grad = None, None
    assert fold_scaling(gm, onto=onto) == 1
    got = gm(x)
    got.sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close((x.grad, gm.B.grad), grads)
    (mul,) = [n for n in gm.graph.nodes if n.target is aten.mul.Tensor]
    assert mul.args[1] == 3.0 and mul.args[0].op == ("placeholder" if onto == "activation" and not twice else "get_attr")


def _saved_bytes(model, batch) -> int:
    """Bytes of the tensors a forward saves for its backward pass, beyond the model's parameters and buffers."""
    held = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = _out(model(**batch))
    out.float().square().mean().backward()
    return sum(saved.values())


@pytest.mark.parametrize("pad", [0, 2])
def test_a_training_graph_saves_no_more_for_backward_than_peft(pad):
    """The oracle: PEFT's modules, which save h (not s * B), read each A on its own (no cat(A_q, A_k, A_v) to
    keep) and, for a batch without padding, attend with is_causal and no mask (transformers' sdpa path)."""
    model = _model_and_graph("llama")[0]
    fields = dict(target_modules="all-linear", lora_alpha=16, init_lora_weights=False)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**fields)).train()
    ours = _rewrite("llama", graphpeft.LoraConfig(**fields)).train()
    plain = _rewrite("llama", graphpeft.LoraConfig(**fields), optimize=False).train()
    batch = inputs_for(model, 3, 7, pad=pad)
    assert _saved_bytes(ours, batch) <= _saved_bytes(theirs, batch)
    assert _saved_bytes(ours, batch) < _saved_bytes(plain, batch), "the per-layer float masks are gone"


def test_identity_dropout_is_dropped_and_real_dropout_kept():
    # model dropout 0 (BERT keeps dropout nodes with p = 0) and LoRA dropout 0.1 on the adapters
    model = _model_and_graph("bert-no-dropout")[0]
    pm = _rewrite("bert-no-dropout", graphpeft.LoraConfig(lora_dropout=0.1), optimize=False).train()
    gm = pm.graph_module
    p_zero = [n for n in gm.graph.nodes if n.target is aten.dropout.default and n.args[1] == 0]
    lora_dropout = [n for n in gm.graph.nodes if n.target is aten.dropout.default and STAMP in n.meta]
    assert p_zero and len(lora_dropout) == 4
    batch = inputs_for(model, 2, 6)
    torch.manual_seed(1)
    want = pm(**batch).logits
    assert drop_identity_dropout(gm) == len(p_zero)
    assert fuse_shared_input(gm) == 0, "each adapter keeps its own dropout mask, as in PEFT"
    torch.manual_seed(1)
    torch.testing.assert_close(pm(**batch).logits, want)
    assert [n for n in gm.graph.nodes if n.target is aten.dropout.default] == lora_dropout
    pm.eval()                                  # p > 0 dropout still follows train/eval
    assert all(n.args[2] is False for n in lora_dropout)
    assert drop_identity_dropout(gm, inference=True) == 4
    assert not [n for n in gm.graph.nodes if n.target is aten.dropout.default]


@pytest.mark.parametrize("inference", [False, True])
def test_optimize_graph_runs_once_and_reports_counts(inference):
    pm = _rewrite("llama", graphpeft.LoraConfig(target_modules="all-linear", lora_alpha=16), optimize=False)
    fused = {"fuse_shared_input": 4} if inference else {}      # a training graph keeps each A on its own
    assert optimize_graph(pm.graph_module, inference=inference) == {
        "drop_identity_dropout": 0, "fold_scaling": 14, **fused, "share_attention_masks": 1}
    assert set(optimize_graph(pm.graph_module, inference=inference).values()) == {0}


# -- what uses the records and the base graph still works ------------------------------------------------

def test_optimized_model_saves_disables_and_merges_like_the_plain_one(tmp_path):
    model = _model_and_graph("llama")[0]
    plain, fast = _pair("llama", graphpeft.LoraConfig(target_modules="all-linear", lora_alpha=16, init_lora_weights=False))
    plain.save_pretrained(tmp_path / "plain")
    fast.save_pretrained(tmp_path / "fast")
    a, b = load_file(tmp_path / "plain/adapter_model.safetensors"), load_file(tmp_path / "fast/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    batch = inputs_for(model, 2, 6)
    with fast.disable_adapter():
        torch.testing.assert_close(fast(**batch).logits, model(**batch).logits)
    torch.testing.assert_close(fast.merge_and_unload()(**batch).logits, plain(**batch).logits, **OUT_TOL)
    again = graphpeft.from_pretrained(_model_and_graph("llama")[1], tmp_path / "fast")
    torch.testing.assert_close(again(**batch).logits, plain(**batch).logits, **OUT_TOL)


def test_optimized_model_follows_peft_outputs_and_gradients():
    """The oracle: PEFT's lora.Linear modules, same weights; all-linear, scalings folded onto the activations."""
    model = _model_and_graph("llama")[0]
    fields = dict(target_modules="all-linear", lora_alpha=16, init_lora_weights=False)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**fields))
    ours = _rewrite("llama", graphpeft.LoraConfig(**fields))
    assert _count(ours.graph_module, aten.mul.Tensor) == 14 and _count(ours.graph_module, aten.cat.default) == 0
    mine = {k.replace("graph_module.", ""): p for k, p in ours.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for k, p in theirs.named_parameters():
            if p.requires_grad:
                mine[k.replace("base_model.model.", "")].copy_(p)
    batch = inputs_for(model, 3, 7, pad=2)
    out_theirs, grads_theirs = _forward_backward(theirs, batch)
    out_ours, grads_ours = _forward_backward(ours, batch)
    torch.testing.assert_close(out_ours, out_theirs, **OUT_TOL)
    grads_theirs = {k.replace("base_model.model.", ""): g for k, g in grads_theirs.items()}
    grads_ours = {k.replace("graph_module.", ""): g for k, g in grads_ours.items()}
    assert sorted(grads_ours) == sorted(grads_theirs)
    for k in grads_theirs:
        torch.testing.assert_close(grads_ours[k], grads_theirs[k], **GRAD_TOL)


def test_merge_for_inference_has_no_adapter_nodes_and_the_adapted_outputs():
    model = _model_and_graph("bert")[0]                      # dropout 0.1: eval-mode dropout nodes to drop
    pm = _rewrite("bert", graphpeft.LoraConfig(task_type="SEQ_CLS", lora_dropout=0.1, init_lora_weights=False))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    batch = inputs_for(model, 2, 6, pad=1)
    want = pm.eval()(**batch).logits
    merged = merge_for_inference(pm)
    assert isinstance(merged, InferenceModel) and not merged.training
    gm = merged.graph_module
    assert not any(STAMP in n.meta for n in gm.graph.nodes)
    assert not any(n.target is aten.dropout.default for n in gm.graph.nodes)
    assert not any("lora_" in k for k, _ in merged.named_parameters())
    torch.testing.assert_close(merged(**batch).logits, want, **OUT_TOL)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items()), "the base weights are unchanged"
    with pytest.raises(GraphPeftError, match="cannot train"):
        merged.train()
    merged.eval()
