"""TRL's trainers on a GraphPeftModel, with the same trainers on a PEFT model as the oracle.

SFTTrainer computes the loss with its fused LM head: ``model.base_model(...)`` for the last hidden
states and ``model.get_output_embeddings()`` for the head (graphpeft.runtime.backbone gives both).
DPOTrainer's reference for a PEFT model is a frozen copy of its adapter (the base model when the adapter
is new); for any other model it loads the reference from ``model.config._name_or_path`` or takes
``ref_model=``: both are tested, the reference given as a frozen GraphPeftModel.
"""

from __future__ import annotations

import peft
import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

import graphpeft
from tests.runtime.test_trainer import start_adapter
from tests.models import sentences, tiny_llama, tiny_tokenizer

ATOL = 1e-5
LORA = graphpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])


def trl_args(cls, out, **overrides):
    # bf16=False: TRL turns bf16 autocast on by default, whose rounding differs with the order of ops
    fields = dict(per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2, report_to=[], use_cpu=True, bf16=False,
                  logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True)
    return cls(str(out), **{**fields, **overrides})


def logged(trainer, key="loss") -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


def test_sft_trainer_matches_peft_and_its_output_loads_into_peft(tmp_path):
    adapter = start_adapter(tmp_path / "start", tiny_llama, LORA)
    data = Dataset.from_dict({"text": sentences(12, seed=1)})
    runs = {}
    for name, model in (("graphpeft", graphpeft.from_pretrained(tiny_llama(), adapter, is_trainable=True)),
                        ("peft", peft.PeftModel.from_pretrained(tiny_llama(), adapter, is_trainable=True))):
        trainer = SFTTrainer(model=model, args=trl_args(SFTConfig, tmp_path / name), train_dataset=data,
                             processing_class=tiny_tokenizer())
        trainer.train()
        trainer.save_model(str(tmp_path / name / "final"))
        runs[name] = trainer
    assert len(logged(runs["graphpeft"])) == 3
    assert logged(runs["graphpeft"]) == pytest.approx(logged(runs["peft"]), abs=ATOL)
    assert logged(runs["graphpeft"], "mean_token_accuracy") == pytest.approx(logged(runs["peft"], "mean_token_accuracy"))
    ours = load_file(str(tmp_path / "graphpeft" / "final" / "adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "peft" / "final" / "adapter_model.safetensors"))
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=ATOL, rtol=0, msg=key)
    # what SFTTrainer saved from graphpeft loads into PEFT with the trained model's outputs
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "graphpeft" / "final")).eval()
    trained = runs["graphpeft"].model.eval()
    ids = torch.tensor([[5, 9, 14, 7, 22, 3]])
    torch.testing.assert_close(trained(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=ATOL, rtol=0)


def test_sft_trainer_with_gradient_checkpointing_and_prompt_tuning(tmp_path):
    """Virtual tokens lengthen the hidden states; the fused head is fed the real positions only (bf16 autocast on)."""
    config = graphpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    model = graphpeft.rewrite(tiny_llama(), config)
    data = Dataset.from_dict({"text": sentences(8, seed=2)})
    trainer = SFTTrainer(model=model, args=trl_args(SFTConfig, tmp_path, gradient_checkpointing=True, max_steps=2,
                                                    bf16=True),     # TRL's default: the graph under bf16 autocast
                         train_dataset=data, processing_class=tiny_tokenizer())
    prompt = next(p for p in model.parameters() if p.requires_grad)
    before = prompt.detach().clone()
    trainer.train()
    assert all(torch.isfinite(torch.tensor(logged(trainer))))
    assert not torch.equal(before, prompt)


def preference_data() -> Dataset:
    s = sentences(24, seed=3)
    return Dataset.from_dict({"prompt": s[:8], "chosen": s[8:16], "rejected": s[16:]})


def test_dpo_trainer_with_the_starting_adapter_as_reference_matches_peft(tmp_path):
    """For a PEFT model with a trained adapter, TRL's reference is a frozen copy of it (its "ref" adapter);
    graphpeft is given that reference as a model: the same adapter loaded frozen, itself a GraphPeftModel."""
    adapter = start_adapter(tmp_path / "start", tiny_llama, LORA)
    reference = graphpeft.from_pretrained(tiny_llama(), adapter)
    ours = DPOTrainer(model=graphpeft.from_pretrained(tiny_llama(), adapter, is_trainable=True), ref_model=reference,
                      args=trl_args(DPOConfig, tmp_path / "g", max_steps=2), train_dataset=preference_data(),
                      processing_class=tiny_tokenizer())
    theirs = DPOTrainer(model=peft.PeftModel.from_pretrained(tiny_llama(), adapter, is_trainable=True),
                        args=trl_args(DPOConfig, tmp_path / "p", max_steps=2), train_dataset=preference_data(),
                        processing_class=tiny_tokenizer())
    ours.train()
    theirs.train()
    for key in ("loss", "rewards/chosen", "rewards/margins", "logps/chosen"):
        assert logged(ours, key) == pytest.approx(logged(theirs, key), abs=ATOL), key


def test_dpo_trainer_loads_the_reference_from_the_models_folder(tmp_path):
    """Without ref_model, TRL loads the reference from model.config._name_or_path (a local folder here)."""
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    model = graphpeft.rewrite(base, LORA)
    trainer = DPOTrainer(model=model, args=trl_args(DPOConfig, tmp_path / "out", max_steps=1),
                         train_dataset=preference_data(), processing_class=tiny_tokenizer())
    assert type(trainer.ref_model).__name__ == "LlamaForCausalLM"
    trainer.train()
    assert logged(trainer)[0] == pytest.approx(0.6931, abs=1e-3)     # log 2: policy equals reference at step 0
