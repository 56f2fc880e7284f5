"""Rewriting without weights (graphpeft.runtime.meta): capture and rewrite a model built on the meta device, save the
resolved adapter config, then materialize the graph from safetensors files and compare with an eager rewrite."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import graphpeft
from graphpeft.cli import commands as cli
from graphpeft.engine.errors import GraphPeftError
from graphpeft.runtime.meta import meta_model
from tests.models import inputs_for, tiny_bert_cls, tiny_llama

TOL = dict(atol=1e-6, rtol=1e-5)


def _on_meta(model):
    with torch.device("meta"):
        built = type(model)(model.config)
    return built.eval()


def _saved(model, folder, **kw):
    model.save_pretrained(folder, safe_serialization=True, **kw)
    return folder


BUILDERS = {
    "llama-tied-sharded": (lambda: tiny_llama(tie_word_embeddings=True), dict(max_shard_size="40KB")),
    "bert-seq-cls": (lambda: tiny_bert_cls(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), {}),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_materialized_graph_equals_the_eager_rewrite(name, tmp_path):
    builder, save_kw = BUILDERS[name]
    real = builder()
    weights = _saved(real, tmp_path / "model", **save_kw)
    config = graphpeft.LoraConfig(target_modules="all-linear", init_lora_weights=False, lora_alpha=16,
                                  task_type="SEQ_CLS" if "seq-cls" in name else None)
    meta = _on_meta(real)
    peft_model = graphpeft.rewrite(meta, config)
    assert all(p.is_meta for p in peft_model.parameters()), "nothing was allocated for the weights"
    graphpeft.save_config(peft_model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    sites = sorted({r.module_path for r in peft_model.records if r.kind != "module"})
    assert saved["peft_type"] == "LORA" and sorted(saved["target_modules"]) == sites

    torch.manual_seed(3)                               # the adapters' init, as in the eager rewrite below
    assert graphpeft.materialize(peft_model, weights) is peft_model
    torch.manual_seed(3)
    eager = graphpeft.rewrite(real, config)

    assert not any(t.is_meta for t in (*peft_model.parameters(), *peft_model.buffers()))
    batch = inputs_for(real, 3, 7, pad=2)
    want = eager(**batch).logits
    assert not torch.allclose(want, real(**batch).logits, atol=1e-3), "the adapters change the outputs"
    torch.testing.assert_close(peft_model(**batch).logits, want, **TOL)
    with peft_model.disable_adapter():              # the base graph got its device constants fixed too
        torch.testing.assert_close(peft_model(**batch).logits, real(**batch).logits, **TOL)
    torch.testing.assert_close(peft_model.merge_and_unload()(**batch).logits, want, **TOL)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in eager.named_parameters() if p.requires_grad}
    peft_model.train()
    peft_model(**batch).logits.square().mean().backward()
    assert all((p.grad is not None) == (n in trainable) for n, p in peft_model.named_parameters())


def test_materialize_with_a_saved_adapter_and_a_base_model_checkpoint(tmp_path):
    """Adapter weights from a folder; base weights from a LlamaModel checkpoint (no 'model.' prefix, tied head)."""
    real = tiny_llama(tie_word_embeddings=True)
    _saved(real.model, tmp_path / "base")
    assert not any(k.startswith("model.") for k in load_file(tmp_path / "base/model.safetensors"))
    config = graphpeft.LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    eager = graphpeft.rewrite(real, config)
    eager.save_pretrained(tmp_path / "adapter")
    peft_model = graphpeft.materialize(graphpeft.rewrite(_on_meta(real), config), tmp_path / "base",
                                       adapter=tmp_path / "adapter")
    batch = inputs_for(real, 2, 5)
    torch.testing.assert_close(peft_model(**batch).logits, eager(**batch).logits, **TOL)


def test_materialize_refuses_files_that_do_not_fit(tmp_path):
    real = tiny_llama()
    weights = _saved(real, tmp_path / "model")
    state = load_file(weights / "model.safetensors")
    captured = graphpeft.capture(_on_meta(real))           # captured once; each attempt rewrites a copy

    def fresh():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return graphpeft.rewrite(copy.deepcopy(captured), graphpeft.LoraConfig())

    (tmp_path / "empty").mkdir()
    with pytest.raises(GraphPeftError, match="no \\*.safetensors"):
        graphpeft.materialize(fresh(), tmp_path / "empty")
    with pytest.raises(GraphPeftError, match="does not exist"):
        graphpeft.materialize(fresh(), [tmp_path / "nope.safetensors"])
    save_file({k: v for k, v in state.items() if "layers.1." not in k}, str(tmp_path / "part.safetensors"))
    with pytest.raises(GraphPeftError, match="still on the meta device.*layers.1"):
        graphpeft.materialize(fresh(), tmp_path / "part.safetensors")
    other = _saved(tiny_llama(intermediate_size=48), tmp_path / "other")
    with pytest.raises(GraphPeftError, match="shape") as err:
        graphpeft.materialize(fresh(), other)
    assert "\n" not in str(err.value)


def test_llama_7b_shape_captures_and_rewrites_on_meta(tmp_path):
    """Llama-7B dimensions (2 of its 32 layers, to stay fast): no weight is allocated, rotary buffers are real."""
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                         num_hidden_layers=2, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).eval()
    peft_model = graphpeft.rewrite(model, graphpeft.LoraConfig(target_modules="all-linear"))
    assert len(peft_model.records) == 2 * 7
    shapes = {k.rsplit(".", 4)[-4] + "." + k.rsplit(".", 3)[-3]: s for r in peft_model.records for k, s in r.params.items()}
    assert shapes["q_proj.lora_A"] == (8, 4096) and shapes["down_proj.lora_A"] == (8, 11008)
    assert shapes["gate_proj.lora_B"] == (11008, 8)
    assert all(p.is_meta for p in peft_model.parameters())
    inv_freq = dict(peft_model.graph_module.named_buffers())["model.rotary_emb.inv_freq"]
    torch.testing.assert_close(inv_freq, LlamaRotaryEmbedding(config).inv_freq)     # what a CPU model computes
    assert inv_freq.shape == (64,) and not inv_freq.is_meta
    graphpeft.save_config(peft_model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert len(saved["target_modules"]) == 14 and saved["r"] == 8


def test_cli_rewrite_meta_writes_the_config_and_a_later_materialize_uses_it(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["rewrite", "--meta", str(tiny_llama_dir), "-o", str(out), "--targets", "q_proj", "up_proj"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "rewrite.json"]
    assert "no weights" in printed
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj",
                                       "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.q_proj"]
    # later: the same sites, rewritten on meta again from the saved config, then the weights
    config = graphpeft.LoraConfig.from_dict(saved)
    peft_model = graphpeft.materialize(graphpeft.rewrite(meta_model(str(tiny_llama_dir)), config), tiny_llama_dir)
    assert sorted(r.module_path for r in peft_model.records) == saved["target_modules"]
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]])}
    real = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    torch.testing.assert_close(peft_model(**batch).logits, real(**batch).logits, **TOL)   # B = 0 at init
