"""transformers' Trainer on a GraphPeftModel, with PEFT under the same Trainer as the oracle.

Each parity test starts both tools from one adapter (graphpeft writes it, PEFT reads it), trains with
the same TrainingArguments, and compares the logged losses and the saved adapters.
"""

from __future__ import annotations

import inspect

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments
from transformers.utils.generic import find_labels

import graphpeft
from graphpeft.engine.errors import GraphPeftError
from tests.models import VOCAB, tiny_bert_cls, tiny_llama

ATOL = 1e-5


def lm_rows(n: int = 8, seq: int = 8, seed: int = 0) -> list[dict]:
    """Causal-LM rows of one length; position 1 of each label row is ignored (-100), position 0 is not
    (a causal loss never predicts it: Trainer must count the shifted labels for num_items_in_batch)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (seq,), generator=gen).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * seq, "labels": [ids[0], -100] + ids[2:]})
    return rows


def cls_rows(n: int = 8, seq: int = 8, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, VOCAB, (seq,), generator=gen).tolist(), "attention_mask": [1] * seq,
             "labels": int(torch.randint(0, 2, (1,), generator=gen))} for _ in range(n)]


def args(out, **overrides) -> TrainingArguments:
    fields = dict(per_device_train_batch_size=2, per_device_eval_batch_size=4, max_steps=3, learning_rate=1e-2,
                  report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True)
    return TrainingArguments(str(out), **{**fields, **overrides})


def start_adapter(folder, builder, config, **build) -> str:
    """A LoRA adapter with non-zero B (so the adapter matters from step 0), written by graphpeft."""
    model = graphpeft.rewrite(builder(**build), config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(str(folder))
    return str(folder)


def losses(trainer: Trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def train_both(tmp_path, builder, config, rows, build=None, **overrides):
    """(graphpeft trainer, PEFT trainer), both trained from the same adapter with the same arguments."""
    build = build or {}
    adapter = start_adapter(tmp_path / "start", builder, config, **build)
    ours = graphpeft.from_pretrained(builder(**build), adapter, is_trainable=True)
    theirs = peft.PeftModel.from_pretrained(builder(**build), adapter, is_trainable=True)
    trainers = []
    for name, model in (("graphpeft", ours), ("peft", theirs)):
        trainer = Trainer(model=model, args=args(tmp_path / name, **overrides), train_dataset=rows)
        trainer.train()
        trainer.save_model(str(tmp_path / name / "final"))
        trainers.append(trainer)
    return trainers


def assert_same_adapters(folder_a, folder_b) -> None:
    a, b = load_file(f"{folder_a}/adapter_model.safetensors"), load_file(f"{folder_b}/adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=ATOL, rtol=0, msg=key)


def test_causal_lm_with_gradient_accumulation_matches_peft(tmp_path):
    """The loss is PEFT's for num_items_in_batch: summed over both micro-batches' tokens, divided once."""
    config = graphpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    ours, theirs = train_both(tmp_path, tiny_llama, config, lm_rows(), gradient_accumulation_steps=2)
    assert len(losses(ours)) == 3
    assert losses(ours) == pytest.approx(losses(theirs), abs=ATOL)
    assert_same_adapters(tmp_path / "graphpeft" / "final", tmp_path / "peft" / "final")
    start = load_file(str(tmp_path / "start" / "adapter_model.safetensors"))
    end = load_file(str(tmp_path / "graphpeft" / "final" / "adapter_model.safetensors"))
    assert any(not torch.equal(start[k], end[k]) for k in start)        # it trained


def test_gradient_checkpointing_matches_peft(tmp_path):
    config = graphpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    ours, theirs = train_both(tmp_path, tiny_llama, config, lm_rows(), gradient_checkpointing=True)
    assert ours.model.is_gradient_checkpointing
    assert losses(ours) == pytest.approx(losses(theirs), abs=ATOL)
    assert_same_adapters(tmp_path / "graphpeft" / "final", tmp_path / "peft" / "final")


def test_sequence_classification_trains_its_head_in_full_like_peft(tmp_path):
    config = graphpeft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])
    build = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ours, theirs = train_both(tmp_path, tiny_bert_cls, config, cls_rows(), build=build)
    assert losses(ours) == pytest.approx(losses(theirs), abs=ATOL)
    saved = load_file(str(tmp_path / "graphpeft" / "final" / "adapter_model.safetensors"))
    assert any(".classifier." in k for k in saved)
    assert_same_adapters(tmp_path / "graphpeft" / "final", tmp_path / "peft" / "final")


def test_evaluation_and_prediction_loops(tmp_path):
    """eval loss and compute_metrics on the logits equal PEFT's on the same adapter."""
    config = graphpeft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])
    adapter = start_adapter(tmp_path / "start", tiny_bert_cls, config)
    rows = cls_rows(n=8, seed=3)

    def accuracy(pred):
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    results = []
    for model in (graphpeft.from_pretrained(tiny_bert_cls(), adapter), peft.PeftModel.from_pretrained(tiny_bert_cls(), adapter)):
        trainer = Trainer(model=model, args=args(tmp_path / "eval"), eval_dataset=rows, compute_metrics=accuracy)
        metrics = trainer.evaluate()
        prediction = trainer.predict(rows)
        results.append((metrics, prediction))
    (ours, our_pred), (theirs, their_pred) = results
    assert ours["eval_loss"] == pytest.approx(theirs["eval_loss"], abs=ATOL)
    assert ours["eval_accuracy"] == theirs["eval_accuracy"]
    assert our_pred.predictions.shape == (8, 2)
    torch.testing.assert_close(torch.tensor(our_pred.predictions), torch.tensor(their_pred.predictions), atol=ATOL, rtol=0)
    assert list(our_pred.label_ids) == [r["labels"] for r in rows]


def test_forward_shows_the_captured_models_signature():
    model = graphpeft.rewrite(tiny_llama(), graphpeft.LoraConfig(r=2))
    base = tiny_llama()
    assert list(inspect.signature(model.forward).parameters) == list(inspect.signature(base.forward).parameters)
    assert find_labels(type(model)) == ["labels"]          # what Trainer reads for label_names
    assert isinstance(model, graphpeft.GraphPeftModel)
    assert type(model).__name__ == "GraphPeftLlamaForCausalLM"


def test_unused_columns_are_dropped_and_the_rest_kept(tmp_path):
    """A column the model does not take (text) is removed; the ones it takes reach the graph."""
    from datasets import Dataset

    rows = lm_rows(n=4)
    data = Dataset.from_list([{**r, "text": "ignored"} for r in rows])
    model = graphpeft.rewrite(tiny_llama(), graphpeft.LoraConfig(r=2))
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=data)
    trainer.train()
    assert trainer.state.log_history[0]["loss"] > 0


def test_save_writes_only_the_adapter_and_resume_ends_where_the_full_run_ends(tmp_path):
    config = graphpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    rows = lm_rows()
    full = graphpeft.rewrite(tiny_llama(), config)
    trainer = Trainer(model=full, args=args(tmp_path / "full", max_steps=4, save_strategy="steps", save_steps=2),
                      train_dataset=rows)
    trainer.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin"}            # never the full weights
    base_keys = [k for k in load_file(str(checkpoint / "adapter_model.safetensors")) if "lora" not in k]
    assert base_keys == []
    assert peft.PeftModel.from_pretrained(tiny_llama(), str(checkpoint)) is not None   # PEFT reads a checkpoint

    resumed = graphpeft.rewrite(tiny_llama(), config)
    again = Trainer(model=resumed, args=args(tmp_path / "full", max_steps=4, save_strategy="steps", save_steps=2),
                    train_dataset=rows)
    again.train(resume_from_checkpoint=str(checkpoint))
    finished = dict(full.named_parameters())
    for name, param in resumed.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, finished[name], atol=1e-6, rtol=0, msg=name)
    assert losses(again)[-1] == pytest.approx(losses(trainer)[-1], abs=1e-6)


def test_resuming_from_a_checkpoint_of_another_adapter_is_refused(tmp_path):
    rows = lm_rows(n=4)
    small = graphpeft.rewrite(tiny_llama(), graphpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    Trainer(model=small, args=args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2), train_dataset=rows).train()
    other = graphpeft.rewrite(tiny_llama(), graphpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    trainer = Trainer(model=other, args=args(tmp_path, max_steps=4), train_dataset=rows)
    with pytest.raises(GraphPeftError) as err:
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    message = str(err.value)
    assert "\n" not in message and "shape" in message and "lora_A" in message


def test_missing_input_column_names_it_and_the_expected_inputs(tmp_path):
    rows = [{"attention_mask": r["attention_mask"], "labels": r["labels"]} for r in lm_rows(n=2)]
    model = graphpeft.rewrite(tiny_llama(), graphpeft.LoraConfig(r=2))
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=rows)
    with pytest.raises(GraphPeftError) as err:
        trainer.train()
    message = str(err.value)
    assert "'input_ids'" in message and "attention_mask" in message and "\n" not in message


def test_checkpointing_keeps_less_for_backward_and_gives_the_same_gradients():
    """Bytes saved for the backward pass (outside the recomputed layers) shrink; gradients do not change."""
    torch.manual_seed(0)
    model = graphpeft.rewrite(tiny_llama(num_hidden_layers=4), graphpeft.LoraConfig(r=4, target_modules="all-linear"))
    model.train()
    batch = {k: torch.tensor([r[k] for r in lm_rows(n=2, seq=16)]) for k in ("input_ids", "attention_mask", "labels")}

    def run():
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**batch).loss
        model.zero_grad()
        loss.backward()
        return sum(saved), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain_bytes, plain_grads = run()
    model.gradient_checkpointing_enable()
    ckpt_bytes, ckpt_grads = run()
    from graphpeft.runtime.checkpointing import count_checkpointed

    assert count_checkpointed(model._running_module()) == 4
    assert ckpt_bytes < plain_bytes / 2
    for name in plain_grads:
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    model.gradient_checkpointing_disable()
    assert model._running_module() is model.graph_module


def test_gradient_checkpointing_options():
    model = graphpeft.rewrite(tiny_llama(num_hidden_layers=4), graphpeft.LoraConfig(r=2)).train()
    from graphpeft.runtime.checkpointing import count_checkpointed

    model.activation_checkpointing_enable(every_n_layers=2)
    assert count_checkpointed(model._running_module()) == 2
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = {k: torch.tensor([r[k] for r in lm_rows(n=2)]) for k in ("input_ids", "attention_mask", "labels")}

    def grads():
        model.zero_grad()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.gradient_checkpointing_disable()
    plain = grads()
    model.gradient_checkpointing_enable({"use_reentrant": True})        # frozen inputs are made to need grad
    reentrant = grads()
    for name in plain:
        torch.testing.assert_close(reentrant[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(GraphPeftError):
        model.activation_checkpointing_enable(every_n_layers=0)
    model.eval()
    assert model._running_module() is model.graph_module            # no checkpointing outside training
