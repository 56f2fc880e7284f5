"""Quantized bases (QLoRA) against the oracle, PEFT on the same quantized model: bitsandbytes 4-bit (NF4, FP4,
double quantization) and 8-bit, torchao int8 weight-only, all on CPU.

Each case: graphpeft rewrites a quantized tiny model with random LoRA weights and saves the adapter; PEFT loads
that adapter on a fresh copy of the same quantized base; outputs agree, and again after one SGD step on each.
"""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="the 'quant' extra (bitsandbytes) is not installed")
pytest.importorskip("torchao", reason="the 'quant' extra (torchao) is not installed")

import peft  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig  # noqa: E402

import graphpeft  # noqa: E402
from graphpeft.errors import GraphPeftError  # noqa: E402
from graphpeft.quantized import load_quantized  # noqa: E402
from graphpeft.rewriter import get_attr_path  # noqa: E402
from tests.models import VOCAB, tiny_bert_cls, tiny_llama  # noqa: E402

ATOL = 1e-4
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))


def _load(folder, kind, auto=AutoModelForCausalLM, **kwargs):
    if kind in ("nf4-dq", "nf4-keep-head"):
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                    bnb_4bit_use_double_quant=kind == "nf4-dq",
                                    llm_int8_skip_modules=["classifier"])     # a classifier head to train in float
        return auto.from_pretrained(folder, quantization_config=config, device_map="cpu", **kwargs)
    if kind is None:
        return auto.from_pretrained(folder, **kwargs)
    return load_quantized(auto, folder, kind, **kwargs)


def _grads_step(model, ids, **extra):
    """Loss, then one SGD step on the trainable parameters; returns the loss."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(input_ids=ids, labels=extra.get("labels", ids)).loss
    loss.backward()
    with torch.no_grad():
        for p in params:
            p.sub_(0.5 * p.grad)
            p.grad = None
    return loss.detach()


def _logits(model, ids):
    # training mode (the tiny models have no dropout): bitsandbytes 0.50.2 repacks 4-bit weights for CPU inference in
    # eval mode and fails on layers narrower than its block size (64), as the tiny models' are
    model.train()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["nf4", "nf4-dq", "fp4", "int8", "torchao-int8"])
def test_lora_on_quantized_llama_matches_peft(kind, llama_dir, ids, tmp_path):
    torch.manual_seed(1)
    gm = graphpeft.rewrite(_load(llama_dir, kind), graphpeft.LoraConfig(**LORA))
    # the base stays quantized and frozen in the graph: one custom op per linear layer, an integer weight
    ops = {str(n.target) for n in gm.graph_module.graph.nodes if str(n.target).startswith("graphpeft.")}
    assert ops == {"graphpeft.linear_4bit.default" if kind in ("nf4", "nf4-dq", "fp4") else "graphpeft.linear_int8.default"}
    weight = get_attr_path(gm.graph_module, "model.layers.0.self_attn.q_proj.weight")
    assert not weight.is_floating_point() and not weight.requires_grad
    gm.save_pretrained(tmp_path)
    pm = peft.PeftModel.from_pretrained(_load(llama_dir, kind), str(tmp_path), is_trainable=True)
    # training mode: bitsandbytes 8-bit's eval path quantizes the activations, graphpeft's does not (README)
    gm.train(), pm.train()
    with torch.no_grad():
        torch.testing.assert_close(gm(input_ids=ids).logits, pm(input_ids=ids).logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(_grads_step(gm, ids), _grads_step(pm, ids), atol=ATOL, rtol=0)
    gm.train(), pm.train()
    with torch.no_grad():
        torch.testing.assert_close(gm(input_ids=ids).logits, pm(input_ids=ids).logits, atol=ATOL, rtol=0)


def test_peft_adapter_from_quantized_base_loads_on_both_bases(llama_dir, ids, tmp_path):
    """PEFT trains on NF4; graphpeft loads its adapter on NF4 and on the float base, equal to PEFT on each."""
    torch.manual_seed(2)
    pm = peft.get_peft_model(_load(llama_dir, "nf4"), peft.LoraConfig(**LORA))
    _grads_step(pm, ids)
    pm.save_pretrained(tmp_path)
    for kind in ("nf4", None):
        ours = graphpeft.from_pretrained(_load(llama_dir, kind), str(tmp_path))
        theirs = peft.PeftModel.from_pretrained(_load(llama_dir, kind), str(tmp_path))
        torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=ATOL, rtol=0)


def test_graphpeft_adapter_from_float_base_loads_on_quantized_base(llama_dir, ids, tmp_path):
    torch.manual_seed(3)
    gm = graphpeft.rewrite(_load(llama_dir, None), graphpeft.LoraConfig(**LORA))
    _grads_step(gm, ids)
    gm.save_pretrained(tmp_path)
    ours = graphpeft.from_pretrained(_load(llama_dir, "nf4"), str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(_load(llama_dir, "nf4"), str(tmp_path))
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["ia3", "adalora", "prefix_tuning"])
def test_other_methods_on_nf4_match_peft(method, llama_dir, ids, tmp_path):
    if method == "ia3":
        fields = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                      init_ia3_weights=False)
        config = graphpeft.IA3Config(**fields)
    elif method == "adalora":
        fields = dict(target_modules=["q_proj", "v_proj"], init_r=4, target_r=2, total_step=10, init_lora_weights=False)
        config = graphpeft.AdaLoraConfig(**fields)
    else:       # a prompt-learning method: the quantized linears are only run, not adapted
        config = graphpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    torch.manual_seed(4)
    gm = graphpeft.rewrite(_load(llama_dir, "nf4"), config)
    gm.save_pretrained(tmp_path)
    pm = peft.PeftModel.from_pretrained(_load(llama_dir, "nf4"), str(tmp_path))
    torch.testing.assert_close(_logits(gm, ids), _logits(pm, ids), atol=ATOL, rtol=0)


def test_encoder_classifier_on_nf4_matches_peft(tmp_path, ids):
    folder = tmp_path / "bert"
    tiny_bert_cls(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).save_pretrained(folder)
    fields = dict(task_type="SEQ_CLS", target_modules=["query", "value"], r=4, init_lora_weights=False)
    torch.manual_seed(5)
    base = _load(str(folder), "nf4-keep-head", AutoModelForSequenceClassification)
    gm = graphpeft.rewrite(base, graphpeft.LoraConfig(**fields))
    labels = torch.tensor([0, 1])
    gm.save_pretrained(tmp_path / "adapter")
    pm = peft.PeftModel.from_pretrained(_load(str(folder), "nf4-keep-head", AutoModelForSequenceClassification),
                                        str(tmp_path / "adapter"), is_trainable=True)
    torch.testing.assert_close(_logits(gm, ids), _logits(pm, ids), atol=ATOL, rtol=0)
    torch.testing.assert_close(_grads_step(gm, ids, labels=labels), _grads_step(pm, ids, labels=labels),
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(gm, ids), _logits(pm, ids), atol=ATOL, rtol=0)


def test_merge_into_quantized_base_is_refused(llama_dir):
    gm = graphpeft.rewrite(_load(llama_dir, "nf4"), graphpeft.LoraConfig(**LORA))
    with pytest.raises(GraphPeftError, match="stored quantized .* load the base model unquantized"):
        gm.merge_and_unload()
    with pytest.raises(GraphPeftError, match="stored quantized"):
        graphpeft.merge_for_inference(gm)


def test_dora_on_quantized_base_is_declined(llama_dir):
    with pytest.raises(GraphPeftError, match="use_dora needs the float base weight"):
        graphpeft.rewrite(_load(llama_dir, "nf4"), graphpeft.LoraConfig(**{**LORA, "use_dora": True}))


def test_missing_library_names_the_extra(monkeypatch, llama_dir):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(GraphPeftError, match=re.escape("graphpeft[quant]")):
        load_quantized(AutoModelForCausalLM, llama_dir, "nf4")
