"""merge_and_unload() into the model's own transformers class (graphpeft/runtime/hf_merge.py).

The merged model is an instance of the source class, computes the adapted outputs, survives
save_pretrained -> from_pretrained, and leaves the user's model and the GraphPeftModel unchanged.
"""

from __future__ import annotations

import pytest
import torch

import graphpeft
from graphpeft.engine.errors import GraphPeftError
from tests.models import inputs_for, perturb_adapters, tiny_bart, tiny_gpt2, tiny_llama

ATOL = 1e-5

CASES = {
    "llama-lora-all-linear": (tiny_llama, lambda: graphpeft.LoraConfig(target_modules="all-linear")),
    "gpt2-lora-tied-wte": (tiny_gpt2, lambda: graphpeft.LoraConfig(target_modules=["c_attn", "wte"])),
    "llama-ia3": (tiny_llama, lambda: graphpeft.IA3Config()),
    "llama-adalora": (tiny_llama, lambda: graphpeft.AdaLoraConfig(init_r=4, target_r=2, total_step=10)),
    "bart-lora": (tiny_bart, lambda: graphpeft.LoraConfig(target_modules=["q_proj", "v_proj", "fc1"])),
}


def _perturbed(model, config):
    return perturb_adapters(graphpeft.rewrite(model, config).eval(), 3, 0.3)


@pytest.mark.parametrize("name", sorted(CASES))
def test_merged_model_is_the_source_class_with_the_adapted_outputs(name, tmp_path):
    builder, config = CASES[name]
    model = builder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = _perturbed(model, config())
    batch = inputs_for(model, batch=2, seq=6, pad=2)
    want = peft_model(**batch).logits
    assert not torch.allclose(want, model(**batch).logits, atol=1e-3), "the adapter changes the outputs"

    merged = peft_model.merge_and_unload()
    assert type(merged) is type(model)
    assert not any("lora" in n or "ia3" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(**batch).logits, want, atol=ATOL, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the user's model is unchanged"
    torch.testing.assert_close(peft_model(**batch).logits, want, atol=0, rtol=0)

    merged.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again(**batch).logits, want, atol=ATOL, rtol=0)


def test_tied_embedding_merge_unties_the_head():
    model = tiny_gpt2()
    merged = _perturbed(model, graphpeft.LoraConfig(target_modules=["wte"])).merge_and_unload()
    assert merged.config.tie_word_embeddings is False
    assert not torch.equal(merged.transformer.wte.weight, merged.lm_head.weight)
    assert torch.equal(merged.lm_head.weight, model.lm_head.weight), "the head keeps the base embedding"


def test_merged_model_follows_the_graph_module_to_its_dtype():
    model = tiny_llama()
    peft_model = _perturbed(model, graphpeft.LoraConfig()).to(torch.float64)
    merged = peft_model.merge_and_unload()
    assert {p.dtype for p in merged.parameters()} == {torch.float64}


def test_prompt_methods_refuse_to_merge():
    peft_model = graphpeft.rewrite(tiny_llama(), graphpeft.PromptTuningConfig(num_virtual_tokens=3))
    with pytest.raises(GraphPeftError, match="cannot be merged"):
        peft_model.merge_and_unload()
