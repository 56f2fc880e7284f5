"""Quantized bases (QLoRA) against the oracle, PEFT on the same quantized model: bitsandbytes 4-bit (NF4, FP4,
double quantization) and 8-bit, torchao int8 weight-only, all on CPU.

Each case: graphpeft rewrites a quantized tiny model with random LoRA weights and saves the adapter; PEFT loads
that adapter on a fresh copy of the same quantized base; outputs agree, and again after one SGD step on each.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="the 'quant' extra (bitsandbytes) is not installed")
pytest.importorskip("torchao", reason="the 'quant' extra (torchao) is not installed")

import peft  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig  # noqa: E402

import graphpeft  # noqa: E402
from graphpeft.engine.errors import GraphPeftError  # noqa: E402
from graphpeft.engine.quantized import load_quantized  # noqa: E402
from graphpeft.engine.rewriter import get_attr_path  # noqa: E402
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
    if kind == "nf4-bf16-model":        # all in bfloat16 but the adapter (float32, PEFT's choice on a quantized base)
        kwargs["dtype"] = torch.bfloat16
    if kind in ("nf4-dq", "nf4-keep-head", "nf4-bf16", "nf4-bf16-model"):
        compute = torch.bfloat16 if kind.startswith("nf4-bf16") else torch.float32   # a float32 model computing in bf16
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                                    bnb_4bit_use_double_quant=kind == "nf4-dq",
                                    llm_int8_skip_modules=["classifier"])     # a classifier head to train in float
        return auto.from_pretrained(folder, quantization_config=config, device_map="cpu", **kwargs)
    if kind is None:
        return auto.from_pretrained(folder, **kwargs)
    if kind == "torchao-config":     # torchao int8 weight-only through transformers, which records the config
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return auto.from_pretrained(folder, quantization_config=TorchAoConfig(quant_type=Int8WeightOnlyConfig()),
                                    device_map="cpu", **kwargs)
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


SLOW = pytest.mark.slow      # the default run keeps one case of each library and method family (~60 s)


@pytest.mark.parametrize("kind", ["nf4", pytest.param("nf4-dq", marks=SLOW), pytest.param("fp4", marks=SLOW),
                                  "nf4-bf16", pytest.param("nf4-bf16-model", marks=SLOW), "int8", "torchao-int8"])
def test_lora_on_quantized_llama_matches_peft(kind, llama_dir, ids, tmp_path):
    torch.manual_seed(1)
    gm = graphpeft.rewrite(_load(llama_dir, kind), graphpeft.LoraConfig(**LORA))
    # the base stays quantized and frozen in the graph: one custom op per linear layer, an integer weight
    ops = {str(n.target) for n in gm.graph_module.graph.nodes if str(n.target).startswith("graphpeft.")}
    assert ops == {"graphpeft.linear_int8.default" if "int8" in kind else "graphpeft.linear_4bit.default"}
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


@SLOW
def test_graphpeft_adapter_from_float_base_loads_on_quantized_base(llama_dir, ids, tmp_path):
    torch.manual_seed(3)
    gm = graphpeft.rewrite(_load(llama_dir, None), graphpeft.LoraConfig(**LORA))
    _grads_step(gm, ids)
    gm.save_pretrained(tmp_path)
    ours = graphpeft.from_pretrained(_load(llama_dir, "nf4"), str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(_load(llama_dir, "nf4"), str(tmp_path))
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["ia3", pytest.param("adalora", marks=SLOW),
                                    pytest.param("prefix_tuning", marks=SLOW)])
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


@pytest.mark.parametrize("method", ["ia3", pytest.param("adalora", marks=SLOW)])
def test_ia3_and_adalora_on_a_bfloat16_nf4_model(method, llama_dir, ids, tmp_path):
    """A bfloat16 model on NF4: the adapter stays float32 (PEFT's dtype on quantized bases) and each adapted layer
    still hands bfloat16 on. AdaLoRA equals PEFT, logits and after a step. PEFT's own 4-bit IA3 lets float32 leak
    into the bfloat16 model and fails in attention (query bfloat16, key float32); there the oracle is PEFT's IA3
    layers with the cast back to the layer's input dtype that their code intends (a forward hook)."""
    if method == "ia3":
        config = graphpeft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                                     init_ia3_weights=False)
    else:
        config = graphpeft.AdaLoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], init_r=4,
                                         target_r=2, total_step=10, init_lora_weights=False)   # PEFT's regulariser on
    torch.manual_seed(8)
    gm = graphpeft.rewrite(_load(llama_dir, "nf4-bf16-model"), config)
    gm.save_pretrained(tmp_path)
    pm = peft.PeftModel.from_pretrained(_load(llama_dir, "nf4-bf16-model"), str(tmp_path), is_trainable=True)
    if method == "ia3":
        layers = [m for m in pm.modules() if type(m).__module__ == "peft.tuners.ia3.bnb"]
        assert layers
        for layer in layers:
            layer.register_forward_hook(lambda module, args, out: out.to(args[0].dtype))
    for name, param in pm.named_parameters():
        if ".ranknum." in name:     # PEFT 0.21.2: from_pretrained(is_trainable=True) unfreezes AdaLoRA's ranknum,
            param.requires_grad_(False)     # which get_peft_model keeps frozen (as graphpeft does)
    assert {p.dtype for p in gm.parameters() if p.requires_grad} == {torch.float32}
    ours = _logits(gm, ids)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, _logits(pm, ids), atol=ATOL, rtol=0)
    torch.testing.assert_close(_grads_step(gm, ids), _grads_step(pm, ids), atol=ATOL, rtol=0)
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


@pytest.mark.parametrize("kind", ["nf4", pytest.param("nf4-dq", marks=SLOW), "int8", "torchao-config"])
def test_lora_merge_on_quantized_base_matches_peft(kind, llama_dir, ids, tmp_path):
    """PEFT's merge into a quantized layer: dequantize, W + s B A, re-quantize. The merged model is the model's own
    class with quantized layers holding the very bytes PEFT's merge gives, and the same outputs; the merged graph
    (merge_for_inference) computes the same. (torchao: loaded through transformers' TorchAoConfig, without which
    PEFT cannot re-quantize and refuses; graphpeft knows the config, Int8WeightOnlyConfig, either way.)"""
    torch.manual_seed(6)
    gm = graphpeft.rewrite(_load(llama_dir, kind), graphpeft.LoraConfig(**LORA))
    gm.save_pretrained(tmp_path)
    pm = peft.PeftModel.from_pretrained(_load(llama_dir, kind), str(tmp_path))
    with pytest.warns(UserWarning, match="rounding errors") if "torchao" not in kind else contextlib.nullcontext():
        theirs = pm.merge_and_unload()
    ours = gm.merge_and_unload()
    assert type(ours) is type(theirs)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        mine, peft_weight = get_attr_path(ours, name), get_attr_path(theirs, name)
        assert type(mine) is type(peft_weight) and not _packed(mine).is_floating_point()
        assert torch.equal(_packed(mine), _packed(peft_weight)), name
    assert _packed(get_attr_path(ours, "model.layers.0.self_attn.q_proj.weight")) is not \
        _packed(get_attr_path(gm.__dict__["_source_model"], "model.layers.0.self_attn.q_proj.weight"))
    merged_logits = _logits(ours, ids)
    torch.testing.assert_close(merged_logits, _logits(theirs, ids), atol=ATOL, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(graphpeft.merge_for_inference(gm)(input_ids=ids).logits, merged_logits,
                                   atol=ATOL, rtol=0)
    assert not torch.allclose(_logits(gm, ids), merged_logits, atol=ATOL), "the adapter had no effect to merge"


def _packed(weight):
    return getattr(weight, "qdata", weight.data)


@pytest.mark.parametrize("method", ["ia3", pytest.param("adalora", marks=SLOW)])
def test_ia3_and_adalora_merge_on_nf4_requantize_the_merged_weight(method, llama_dir, ids, tmp_path):
    """PEFT refuses these merges on bitsandbytes layers (no merge for IA3/AdaLoRA there); graphpeft does what it does
    for LoRA. The oracle is the mathematics: the merged layer holds quantize_4bit(dequantize_4bit(W) * l) for (IA)^3,
    and the saved merged model reloads through transformers with equal outputs."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    if method == "ia3":
        config = graphpeft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"],
                                     init_ia3_weights=False)
    else:
        config = graphpeft.AdaLoraConfig(target_modules=["q_proj", "down_proj"], init_r=4, target_r=2, total_step=10,
                                         init_lora_weights=False)
    torch.manual_seed(7)
    base = _load(llama_dir, "nf4")
    gm = graphpeft.rewrite(base, config)
    merged = gm.merge_and_unload()
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        old = get_attr_path(base, f"{name}.weight")
        w = dequantize_4bit(old.data, old.quant_state).float()
        if method == "ia3":
            vector = next(p for k, p in gm.named_parameters() if name in k and "ia3_l" in k).detach()
            w = w * vector.reshape(1, -1) if "down_proj" in name else w * vector.reshape(-1, 1)
        else:
            info = next(r for r in gm.records if r.module_path == name).info
            a, b, e, ranknum = (get_attr_path(gm.graph_module, info[f"{n}_attr"]).detach()
                                for n in ("lora_A", "lora_B", "lora_E", "ranknum"))
            w = w + (b @ (a * e)) * info["scaling"] / (ranknum + 1e-5)
        packed, _ = quantize_4bit(w, blocksize=old.blocksize, quant_type=old.quant_type)
        assert torch.equal(get_attr_path(merged, f"{name}.weight").data, packed), name
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), device_map="cpu")
    torch.testing.assert_close(_logits(reloaded, ids), _logits(merged, ids), atol=ATOL, rtol=0)


def test_dora_on_quantized_base_is_declined(llama_dir):
    with pytest.raises(GraphPeftError, match="use_dora needs the float base weight"):
        graphpeft.rewrite(_load(llama_dir, "nf4"), graphpeft.LoraConfig(**{**LORA, "use_dora": True}))


def test_missing_library_names_the_extra(monkeypatch, llama_dir):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(GraphPeftError, match=re.escape("graphpeft[quant]")):
        load_quantized(AutoModelForCausalLM, llama_dir, "nf4")


# -- the command line: --quantize -------------------------------------------------------------------

def _cli(capsys, *argv):
    from graphpeft.cli import commands as cli

    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _cli_inputs():
    return {"input_ids": torch.randint(5, 200, (2, 7), generator=torch.Generator().manual_seed(1))}


def test_cli_rewrite_quantize_nf4_writes_an_adapter_peft_loads_on_the_same_base(tiny_llama_dir, tmp_path, capsys):
    from graphpeft.engine.quantized import quantize_model

    out = tmp_path / "out"
    code, stdout, err = _cli(capsys, "rewrite", tiny_llama_dir, "-o", out, "--targets", "q_proj", "v_proj",
                             "--quantize", "nf4")
    assert code == 0, err
    report = __import__("json").loads((out / "rewrite.json").read_text())
    assert report["counts"]["rewritten_sites"] == 4
    # the same base as the command line's: loaded in float, quantized in place; the adapter given non-zero B
    from safetensors.torch import load_file, save_file

    weights = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(2)) if "lora_B" in k else v
               for k, v in load_file(out / "adapter_model.safetensors").items()}
    save_file(weights, out / "adapter_model.safetensors", metadata={"format": "pt"})
    base = lambda: quantize_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), "nf4")  # noqa: E731
    inputs = _cli_inputs()
    ours, theirs = graphpeft.from_pretrained(base(), str(out)), peft.PeftModel.from_pretrained(base(), str(out))
    plain = base().train()
    with torch.no_grad():
        got, want = ours.train()(**inputs).logits, theirs.train()(**inputs).logits
        assert (got - plain(**inputs).logits).abs().max() > 1e-3       # the adapter changes the outputs
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("quantize", ["nf4", pytest.param("int8", marks=SLOW), pytest.param("torchao-int8", marks=SLOW)])
def test_cli_train_quantize(quantize, tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(__import__("json").dumps({"text": f"the cat sat on mat number {i}"}) + "\n"
                            for i in range(8)))
    out = tmp_path / "out"
    code, stdout, err = _cli(capsys, "train", out, tiny_llama_dir, "--data", data, "--epochs", "1", "--batch-size", "4",
                             "--targets", "q_proj", "v_proj", "--quantize", quantize)
    assert code == 0, err
    from safetensors.torch import load_file

    b = [v for k, v in load_file(out / "adapter_model.safetensors").items() if "lora_B" in k]
    assert len(b) == 4 and all(v.abs().max() > 0 for v in b)          # B starts at zero: the steps trained it


def test_cli_quantize_without_the_library_is_one_line(monkeypatch, tiny_llama_dir, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    code, stdout, err = _cli(capsys, "rewrite", tiny_llama_dir, "-o", tmp_path / "out", "--quantize", "torchao-int8")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "graphpeft[quant]" in err and "torchao" in err
    assert not (tmp_path / "out").exists()


@SLOW
def test_generate_on_nf4_base_gives_peft_tokens(llama_dir, tmp_path):
    """generate() captures its own cached graphs: the quantized layers are swapped there too."""
    torch.manual_seed(6)
    gm = graphpeft.rewrite(_load(llama_dir, "nf4"), graphpeft.LoraConfig(**LORA))
    gm.save_pretrained(tmp_path)
    pm = peft.PeftModel.from_pretrained(_load(llama_dir, "nf4"), str(tmp_path))
    prompt = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(7))
    gm.train(), pm.train()        # see _logits: bitsandbytes' eval repack fails on the tiny layers
    ours = gm.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
    theirs = pm.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("kind", ["nf4", "int8", "torchao-int8"])
def test_plain_module_traced_without_example_inputs(kind):
    """torch.fx's symbolic trace (no example inputs) swaps the quantized layers as torch.export does."""
    import copy

    from graphpeft.engine.quantized import quantize_model
    from tests.models import MLP

    base = quantize_model(MLP(dim=64, hidden=64, out=64), kind)
    torch.manual_seed(8)
    gm = graphpeft.rewrite(copy.deepcopy(base), graphpeft.LoraConfig(r=4, target_modules=["fc1", "fc2"],
                                                                      init_lora_weights=False))
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["fc1", "fc2"]))
    theirs = dict(pm.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if ".lora_" in name:
                theirs["base_model.model." + name.removeprefix("graph_module.")].copy_(p)
                copied += 1
    assert copied == 4
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(9))
    gm.train(), pm.train()
    torch.testing.assert_close(gm(x), pm(x), atol=ATOL, rtol=0)
    assert (gm(x) - base(x)).abs().max() > 1e-3
