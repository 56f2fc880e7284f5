"""Training: JSONL reading and checking, batching, the training loop, and `graphpeft train` end to end.

The loop must lower the loss while changing only the adapter (and, for sequence classification, the
classifier head that PEFT trains in full): every base weight stays bit-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import graphpeft
from graphpeft.cli import commands as cli
from graphpeft.runtime.train import History, evaluate, train
from graphpeft.engine.errors import GraphPeftError
from graphpeft.runtime.data import CAUSAL_LM, SEQ_CLS, Collator, make_loader, read_jsonl

POSITIVE = ["a good film", "good food and good staff", "a great and good day", "good, really good",
            "the hotel was good", "good music, great night", "what a good book", "good and kind service"]
NEGATIVE = ["a bad film", "bad food and bad staff", "an awful and bad day", "bad, really bad",
            "the hotel was bad", "bad music, awful night", "what a bad book", "bad and rude service"]
SENTENCES = ["the cat sat on the mat", "the dog sat on the log", "the cat ate the fish", "the dog ate the bone"]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def classification_rows() -> list[dict]:
    rows = [{"text": t, "label": 1} for t in POSITIVE] + [{"text": t, "label": 0} for t in NEGATIVE]
    return [rows[i] for i in torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]


@pytest.fixture(scope="module")
def tokenizer():
    from graphpeft.runtime import hub

    return hub.load_tokenizer(None)     # the embedded MiniLM tokenizer, the one the tiny model folders carry


# -- data files -------------------------------------------------------------------------------------

BAD_ROWS = {
    "not json": (['{"text": "fine", "label": 1}', '{"text": "oops", "label": 1'], 2, "not valid JSON"),
    "not an object": (['["text", "label"]'], 1, "expected a JSON object"),
    "missing text": (['{"text": "fine", "label": 1}', '{"label": 0}'], 2, "'text' is missing"),
    "empty text": (['{"text": "   "}'], 1, "non-empty string"),
    "label is a string": (['{"text": "a", "label": 0}', '{"text": "b", "label": "1"}'], 2, "must be an integer"),
    "label is a float": (['{"text": "a", "label": 0}', '{"text": "b", "label": 1.0}'], 2, "must be an integer"),
    "label is a bool": (['{"text": "a", "label": true}'], 1, "must be an integer"),
    "negative label": (['{"text": "a", "label": -1}'], 1, "must be >= 0"),
    "mixed rows": (['{"text": "a", "label": 0}', '', '{"text": "b"}'], 3, "line 1 has one"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_a_bad_row_names_the_file_and_line(case, tmp_path):
    rows, line, message = BAD_ROWS[case]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(GraphPeftError, match=message) as info:
        read_jsonl(path)
    assert f"{path}:{line}:" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("content, message", [("", "is empty"), ("\n  \n", "is empty"),
                                              ('{"text": "a", "label": 0}\n{"text": "b", "label": 2}\n',
                                               "labels must be 0..K-1"),
                                              ('{"text": "a", "label": 0}\n', "at least two labels")])
def test_a_bad_file_names_the_file(content, message, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(GraphPeftError, match=message) as info:
        read_jsonl(path)
    assert str(path) in str(info.value)


def test_the_task_follows_from_the_rows(tmp_path):
    labelled = read_jsonl(write_jsonl(tmp_path / "cls.jsonl", classification_rows()))
    assert (labelled.task, labelled.num_labels, len(labelled)) == (SEQ_CLS, 2, 16)
    plain = read_jsonl(write_jsonl(tmp_path / "lm.jsonl", [{"text": t} for t in SENTENCES]))
    assert (plain.task, plain.num_labels, len(plain)) == (CAUSAL_LM, 0, 4)
    assert plain.examples[0].text == SENTENCES[0] and plain.examples[0].label is None


def test_batches_pad_truncate_and_mask_the_padding_out_of_causal_labels(tmp_path, tokenizer):
    data = read_jsonl(write_jsonl(tmp_path / "lm.jsonl", [{"text": "hi"}, {"text": " ".join(["word"] * 50)}]))
    batch = Collator(tokenizer, data.task, max_length=10)(list(data.examples))
    assert batch["input_ids"].shape == (2, 10)                  # the long row is truncated to max_length
    pad = batch["attention_mask"] == 0
    assert pad[0].any() and not pad[1].any()
    assert (batch["labels"][pad] == -100).all()
    assert torch.equal(batch["labels"][~pad], batch["input_ids"][~pad])

    data = read_jsonl(write_jsonl(tmp_path / "cls.jsonl", classification_rows()))
    loader = make_loader(data, tokenizer, batch_size=5, shuffle=False)
    batches = list(loader)
    assert [len(b["labels"]) for b in batches] == [5, 5, 5, 1]
    assert batches[0]["labels"].tolist() == [e.label for e in data.examples[:5]]


# -- the training loop ------------------------------------------------------------------------------

def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _changed(before: dict, model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}


def _train_and_check(peft_model, data, tokenizer, batch_size: int, lr: float, epochs: int) -> tuple[History, set[str]]:
    before = _snapshot(peft_model)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    history = train(peft_model, data.examples, Collator(tokenizer, data.task), epochs=epochs, lr=lr,
                    batch_size=batch_size, lr_scheduler="constant", progress=False)
    changed = _changed(before, peft_model)
    assert changed == trainable                        # every adapter parameter moved, nothing else did
    assert all(".lora_" in n or ".modules_to_save." in n for n in changed)
    steps_per_epoch = -(-len(data) // batch_size)
    assert len(history.epoch_losses) == epochs and len(history.step_losses) == epochs * steps_per_epoch
    assert history.epoch_losses[-1] < 0.9 * history.epoch_losses[0], history.epoch_losses
    return history, changed


def test_training_a_classifier_changes_only_the_adapter_and_the_head(tmp_path, tokenizer):
    from tests.models import tiny_bert_cls

    data = read_jsonl(write_jsonl(tmp_path / "cls.jsonl", classification_rows()))
    model = tiny_bert_cls(vocab_size=30522)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = graphpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    torch.manual_seed(0)
    peft_model = graphpeft.rewrite(model, config)
    _, changed = _train_and_check(peft_model, data, tokenizer, batch_size=4, lr=2e-2, epochs=8)
    assert all(torch.equal(p.detach(), base[n]) for n, p in model.named_parameters())   # the eager model too
    assert {n.rpartition("graph_module.")[2] for n in changed if ".modules_to_save." in n} == {
        "classifier.modules_to_save.default.weight", "classifier.modules_to_save.default.bias"}
    assert evaluate(peft_model, make_loader(data, tokenizer, shuffle=False))["accuracy"] >= 0.9


def test_training_a_causal_lm_changes_only_the_adapter(tmp_path, tokenizer):
    from tests.models import tiny_llama

    data = read_jsonl(write_jsonl(tmp_path / "lm.jsonl", [{"text": t} for t in SENTENCES]))
    model = tiny_llama(vocab_size=30522)
    # a random tiny LM learns its few tokens fastest through the output head
    config = graphpeft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "lm_head"],
                                  task_type="CAUSAL_LM")
    torch.manual_seed(0)
    _train_and_check(graphpeft.rewrite(model, config), data, tokenizer, batch_size=2, lr=2e-2, epochs=4)


def test_a_gpt2_lm_head_model_trains_like_any_causal_lm(tmp_path, tokenizer):
    """GPT2LMHeadModel has no loss_type in transformers (its name is not *ForCausalLM): the loss still comes."""
    from tests.models import tiny_gpt2

    model = tiny_gpt2(vocab_size=30522)
    data = read_jsonl(write_jsonl(tmp_path / "lm.jsonl", [{"text": t} for t in SENTENCES]))
    batch = next(iter(make_loader(data, tokenizer, batch_size=4, shuffle=False)))
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    config = graphpeft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "lm_head"], task_type="CAUSAL_LM")
    torch.manual_seed(0)
    peft_model = graphpeft.rewrite(model, config)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).loss, model(**batch).loss)   # B = 0: the base model's loss
    _train_and_check(peft_model, data, tokenizer, batch_size=2, lr=2e-2, epochs=4)


def test_the_loop_refuses_a_model_without_trainable_parameters(tokenizer, tmp_path):
    from tests.models import tiny_bert_cls

    model = tiny_bert_cls(vocab_size=30522)
    for p in model.parameters():
        p.requires_grad_(False)
    data = read_jsonl(write_jsonl(tmp_path / "cls.jsonl", classification_rows()))
    with pytest.raises(GraphPeftError, match="no trainable parameters"):
        train(model, data.examples, Collator(tokenizer, data.task), epochs=1, progress=False)


# -- graphpeft train --------------------------------------------------------------------------------

def _run_train(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return code, captured.out


def test_cli_trains_a_classifier_and_saves_an_adapter_that_loads(tiny_bert_dir, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    data = write_jsonl(tmp_path / "cls.jsonl", classification_rows())
    out = tmp_path / "runs" / "cls"
    _, stdout = _run_train(capsys, "train", out, "--data", data, tiny_bert_dir, "--targets", "query,value",
                           "--r", "4", "--epochs", "8", "--lr", "2e-2", "--batch-size", "4", "--eval-data", data)
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                              "rewrite.json", "train.json"}
    assert [p.name for p in out.parent.iterdir()] == ["cls"]
    log = json.loads((out / "train.json").read_text())
    assert log["task"] == SEQ_CLS and log["num_labels"] == 2 and len(log["epoch_losses"]) == 8
    assert log["epoch_losses"][-1] < 0.9 * log["epoch_losses"][0]
    assert "epoch 8/8: mean loss" in stdout and "trainable params: " in stdout
    assert len(log["evaluations"]) == 8 and log["evaluations"][-1]["accuracy"] >= 0.9   # evaluated on the rows
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["r"] == 4

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    loaded = graphpeft.from_pretrained(base, str(out))
    data_set = read_jsonl(data)
    from graphpeft.runtime import hub

    loader = make_loader(data_set, hub.load_tokenizer(str(tiny_bert_dir)), shuffle=False)
    assert evaluate(loaded, loader)["accuracy"] >= 0.9          # the saved adapter carries what was learnt
    with loaded.disable_adapter():
        assert evaluate(loaded, loader)["accuracy"] <= 0.75

    # --adapter continues from the saved adapter: training starts where the first run ended
    again = tmp_path / "runs" / "again"
    _run_train(capsys, "train", again, "--data", data, tiny_bert_dir, "--adapter", out, "--epochs", "1",
               "--lr", "1e-3", "--batch-size", "4")
    resumed = json.loads((again / "train.json").read_text())["epoch_losses"][0]
    assert resumed < 0.5 * log["epoch_losses"][0] and resumed < 1.5 * log["epoch_losses"][-1]


def test_cli_trains_a_causal_lm(tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "lm.jsonl", [{"text": t} for t in SENTENCES])
    out = tmp_path / "lm"
    _run_train(capsys, "train", out, "--data", data, tiny_llama_dir, "--targets", "q_proj,v_proj,lm_head",
               "--epochs", "4", "--lr", "2e-2", "--batch-size", "2", "--seed", "1")
    log = json.loads((out / "train.json").read_text())
    assert log["task"] == CAUSAL_LM and log["seed"] == 1
    assert log["epoch_losses"][-1] < 0.9 * log["epoch_losses"][0]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and len(config["target_modules"]) == 5   # 2 layers x (q, v) + head
    loaded = graphpeft.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(out))
    assert all(not p.requires_grad for p in loaded.parameters())


def test_cli_trains_with_accumulation_checkpointing_and_evaluation(tiny_llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "lm.jsonl", [{"text": t} for t in SENTENCES * 2])
    held_out = write_jsonl(tmp_path / "test.jsonl", [{"text": t} for t in SENTENCES[:2]])
    out = tmp_path / "lm"
    _, stdout = _run_train(capsys, "train", out, "--data", data, tiny_llama_dir, "--targets", "q_proj,v_proj",
                           "--epochs", "2", "--batch-size", "2", "--grad-accum", "2", "--gradient-checkpointing",
                           "--eval-data", held_out, "--lr-scheduler", "cosine", "--warmup-ratio", "0.25")
    log = json.loads((out / "train.json").read_text())
    assert len(log["step_losses"]) == 2 * 2          # 8 rows / batch 2 = 4 batches = 2 optimizer steps per epoch
    assert len(log["evaluations"]) == 2 and all(e["loss"] > 0 and "accuracy" not in e for e in log["evaluations"])
    assert (log["grad_accum"], log["gradient_checkpointing"], log["lr_scheduler"]) == (2, True, "cosine")
    assert "eval after epoch 2: loss " in stdout
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                              "rewrite.json", "train.json"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or "checkpoint" in p.name] == []


def test_cli_checkpoints_hold_the_adapter_and_resume_ends_where_the_full_run_ends(tiny_llama_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "lm.jsonl", [{"text": t} for t in SENTENCES])
    common = ["--data", data, tiny_llama_dir, "--targets", "q_proj,v_proj", "--epochs", "2", "--batch-size", "2",
              "--lr", "1e-2", "--save-steps", "2"]
    _run_train(capsys, "train", tmp_path / "full", *common)
    checkpoints = tmp_path / "full-checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    names = {p.name for p in (checkpoints / "checkpoint-2").iterdir()}
    assert "adapter_model.safetensors" in names and not names & {"model.safetensors", "pytorch_model.bin"}

    _run_train(capsys, "train", tmp_path / "resumed", *common, "--checkpoint-dir", tmp_path / "again",
               "--resume", checkpoints / "checkpoint-2")
    full = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=0, msg=key)
    log = json.loads((tmp_path / "resumed" / "train.json").read_text())
    assert log["resumed_from"] == str(checkpoints / "checkpoint-2") and len(log["step_losses"]) == 2


def test_cli_refuses_to_resume_from_another_adapters_checkpoint(tiny_llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "lm.jsonl", [{"text": t} for t in SENTENCES])
    common = ["--data", data, tiny_llama_dir, "--targets", "q_proj,v_proj", "--epochs", "1", "--batch-size", "2"]
    _run_train(capsys, "train", tmp_path / "r4", *common, "--r", "4", "--save-steps", "1")
    code = cli.main([str(a) for a in ["train", tmp_path / "r8", *common, "--r", "8",
                                      "--resume", tmp_path / "r4-checkpoints" / "checkpoint-1"]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("graphpeft: error: ") and "\n" not in err and "shape" in err
    assert not (tmp_path / "r8").exists()
    code = cli.main([str(a) for a in ["train", tmp_path / "r8", *common, "--resume", tmp_path / "nowhere"]])
    assert code == 2 and "not a folder" in capsys.readouterr().err


def test_cli_train_json_is_the_only_thing_on_stdout(tiny_llama_dir, tmp_path, capsys):
    """Trainer prints its logs unless told not to: with --json, stdout is one JSON object and nothing else."""
    data = write_jsonl(tmp_path / "lm.jsonl", [{"text": t} for t in SENTENCES])
    code = cli.main([str(a) for a in ["train", tmp_path / "out", "--data", data, tiny_llama_dir, "--targets", "q_proj",
                                      "--epochs", "1", "--batch-size", "2", "--json"]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert len(result["train"]["step_losses"]) == 2 and result["files"]
