"""MultiTask Prompt Tuning against the oracle, Hugging Face PEFT: same weights and task ids, same outputs
(an encoder-decoder's decoder prompt included), adapters load both ways, source-task inits read the same
file the same way; task_ids errors, distilbert (where PEFT fails), training and the command line."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import graphpeft
from graphpeft.cli import commands as cli
from tests.models import inputs_for, tiny_bert_cls, tiny_distilbert, tiny_llama, tiny_t5

ATOL = 1e-5
V = 3
TASKS = torch.tensor([2, 0, 1])
KEYS = ("prompt_encoder.default.embedding.weight", "prompt_encoder.default.prefix_task_cols",
        "prompt_encoder.default.prefix_task_rows")


def _bert():
    return tiny_bert_cls(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


CASES = {"llama": (tiny_llama, "CAUSAL_LM"), "bert": (_bert, "SEQ_CLS"), "t5": (tiny_t5, "SEQ_2_SEQ_LM")}


@pytest.fixture(scope="module")
def captured():
    cache = {}

    def get(name):
        if name not in cache:
            model = CASES[name][0]()
            cache[name] = (model, graphpeft.capture(model))
        return cache[name]
    return get


def _batches(model, task):
    """(PEFT's arguments, graphpeft's): PEFT's seq2seq prompt path builds the decoder input from labels."""
    batch = inputs_for(model, batch=3, seq=6, pad=2)
    if task != "SEQ_2_SEQ_LM":
        return batch, batch
    labels = batch.pop("decoder_input_ids")
    return {**batch, "labels": labels}, {**batch, "decoder_input_ids": model._shift_right(labels)}


def _weights(model):
    params = dict(model.named_parameters())
    return {k: params.get(k, params.get(f"graph_module.{k}")) for k in KEYS}


def _out(model, batch, task_ids=TASKS):
    with torch.no_grad():
        return model(**batch, task_ids=task_ids).logits


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_outputs_as_peft_both_ways_through_the_file(name, captured, tmp_path):
    model, gm = captured(name)
    task = CASES[name][1]
    theirs_in, ours_in = _batches(model, task)
    cfg = dict(task_type=task, num_virtual_tokens=V, num_tasks=3, num_ranks=2)
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.MultitaskPromptTuningConfig(**cfg)).eval()
    torch.manual_seed(0)
    ours = graphpeft.rewrite(copy.deepcopy(gm), graphpeft.MultitaskPromptTuningConfig(**cfg)).eval()
    theirs, mine = _weights(pm), _weights(ours)
    assert all(torch.equal(mine[k], theirs[k]) for k in KEYS)              # PEFT's shapes, init and order
    with torch.no_grad():                                                  # trained-looking task factors
        for k in KEYS:
            theirs[k].normal_()
            mine[k].copy_(theirs[k])
    expected = _out(pm, theirs_in)
    got = _out(ours, ours_in)
    assert got.shape == expected.shape
    if task == "SEQ_2_SEQ_LM":                                             # V decoder prompts too (2 submodules)
        assert got.shape[1] == V + ours_in["decoder_input_ids"].shape[1]
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (got - _out(ours, ours_in, torch.tensor([0, 0, 0]))).abs().max() > 1e-4   # the task ids matter

    pm.save_pretrained(tmp_path / "peft")
    loaded = graphpeft.from_pretrained(copy.deepcopy(gm), tmp_path / "peft")
    torch.testing.assert_close(_out(loaded, ours_in), expected, atol=ATOL, rtol=0)
    ours.save_pretrained(tmp_path / "ours")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(saved) == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    torch.testing.assert_close(_out(back, theirs_in), got, atol=ATOL, rtol=0)


@pytest.mark.parametrize("init, tasks", [("EXACT_SOURCE_TASK", 1), ("AVERAGE_SOURCE_TASKS", 1),
                                         ("ONLY_SOURCE_SHARED", 2)])
def test_source_task_inits_read_the_file_as_peft_does(init, tasks, captured, tmp_path):
    model, gm = captured("llama")
    source = tmp_path / "source.safetensors"
    gen = torch.Generator().manual_seed(3)
    save_file({"prompt_embeddings": torch.randn(V, 32, generator=gen),
               "prefix_task_cols": torch.randn(4, V, 2, generator=gen),
               "prefix_task_rows": torch.randn(4, 2, 32, generator=gen)}, source)
    cfg = dict(task_type="CAUSAL_LM", num_virtual_tokens=V, num_tasks=tasks, num_ranks=2, prompt_tuning_init=init,
               prompt_tuning_init_state_dict_path=str(source), prompt_tuning_init_task=2)
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.MultitaskPromptTuningConfig(**cfg))
    torch.manual_seed(0)
    ours = graphpeft.rewrite(copy.deepcopy(gm), graphpeft.MultitaskPromptTuningConfig(**cfg))
    theirs, mine = _weights(pm), _weights(ours)
    for k in KEYS:
        torch.testing.assert_close(mine[k], theirs[k], atol=0, rtol=0)
    torch.testing.assert_close(mine[KEYS[0]], load_file(source)["prompt_embeddings"], atol=0, rtol=0)

    torch.save(load_file(source), tmp_path / "source.pt")                  # a torch file, read weights-only
    again = graphpeft.rewrite(copy.deepcopy(gm), graphpeft.MultitaskPromptTuningConfig(
        **{**cfg, "prompt_tuning_init_state_dict_path": str(tmp_path / "source.pt")}))
    assert all(torch.equal(_weights(again)[k], mine[k]) for k in KEYS if k == KEYS[0] or init != "ONLY_SOURCE_SHARED")


def test_task_ids_missing_or_out_of_range_is_a_one_line_error(captured):
    model, gm = captured("bert")
    ours = graphpeft.rewrite(copy.deepcopy(gm), graphpeft.MultitaskPromptTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=V, num_tasks=3)).eval()
    batch = inputs_for(model, batch=3, seq=5)
    for task_ids, match in [(None, "needs task_ids"), (torch.tensor([0, 3, 1]), "task id 3 is out of range"),
                            (torch.tensor([0, -1, 1]), "task id -1 is out of range"),
                            (torch.tensor([0.0, 1.0, 1.0]), "integer tensor")]:
        with pytest.raises(graphpeft.GraphPeftError, match=match) as err:
            ours(**batch, **({} if task_ids is None else {"task_ids": task_ids}))
        assert "\n" not in str(err.value)
    with ours.disable_adapter():                                           # the base model takes no task ids
        base = ours(**batch, task_ids=TASKS).logits
    torch.testing.assert_close(base, model(**batch).logits, atol=ATOL, rtol=0)
    bad = dict(task_type="CAUSAL_LM", num_virtual_tokens=V, prompt_tuning_init="EXACT_SOURCE_TASK")
    with pytest.raises(graphpeft.GraphPeftError, match="needs prompt_tuning_init_state_dict_path"):
        graphpeft.MultitaskPromptTuningConfig(**bad)
    with pytest.raises(graphpeft.GraphPeftError, match="does not exist"):
        graphpeft.rewrite(copy.deepcopy(gm), graphpeft.MultitaskPromptTuningConfig(
            **bad, prompt_tuning_init_state_dict_path="/nonexistent/adapter_model.safetensors"))


def test_distilbert_where_peft_fails():
    model = tiny_distilbert(dropout=0.0, attention_dropout=0.0)
    cfg = dict(task_type="SEQ_CLS", num_virtual_tokens=V, num_tasks=2)
    with pytest.raises(ValueError, match="token_dim"):
        peft.get_peft_model(copy.deepcopy(model), peft.MultitaskPromptTuningConfig(**cfg))
    ours = graphpeft.rewrite(copy.deepcopy(model), graphpeft.MultitaskPromptTuningConfig(**cfg)).eval()
    table, cols, rows = _weights(ours).values()
    batch = inputs_for(model, batch=2, seq=5, pad=1)
    task_ids = torch.tensor([1, 0])
    with torch.no_grad():          # PEFT's formula, by hand
        prompts = table * (cols[task_ids] @ rows[task_ids])
        embeds = torch.cat([prompts, model.distilbert.embeddings.word_embeddings(batch["input_ids"])], 1)
        mask = torch.cat([torch.ones(2, V, dtype=torch.long), batch["attention_mask"]], 1)
        expected = model(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(_out(ours, batch, task_ids), expected, atol=ATOL, rtol=0)


def test_training_moves_only_the_prompt_factors_and_the_loss_falls(captured):
    from graphpeft.runtime.train import train

    model, gm = captured("llama")
    torch.manual_seed(0)
    ours = graphpeft.rewrite(copy.deepcopy(gm), graphpeft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=V, num_tasks=2, num_ranks=2))
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {f"graph_module.{k}" for k in KEYS}
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24, 25, 26, 27]] * 2)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "task_ids": torch.tensor([0, 1] * 2)}
    history = train(ours, [batch] * 4, epochs=2, lr=0.3, progress=False)     # task_ids pass through train()
    assert history.step_losses[-1] < history.step_losses[0] - 0.05
    moved = {n for n, p in ours.named_parameters() if not torch.equal(p, before[n])}
    assert moved == trainable


def test_cli_rewrite(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "adapter"
    code = cli.main(["rewrite", str(tiny_llama_dir), "-o", str(out), "--method", "multitask_prompt_tuning",
                     "--num-virtual-tokens", "3", "--num-tasks", "4", "--num-ranks", "2"])
    assert code == 0, capsys.readouterr().err
    saved = load_file(out / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        "prompt_embeddings": (3, 32), "prefix_task_cols": (4, 3, 2), "prefix_task_rows": (4, 2, 32)}
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "MULTITASK_PROMPT_TUNING"
    code = cli.main(["rewrite", str(tiny_llama_dir), "-o", str(tmp_path / "bad"), "--method",
                     "multitask_prompt_tuning", "--num-virtual-tokens", "3", "--init", "EXACT_SOURCE_TASK"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--init-from" in err


def test_cli_trains_with_task_ids_from_the_rows(tiny_llama_dir, tmp_path, capsys):
    """`graphpeft train` batches an integer row field under its name; task_ids feeds the graph's input."""
    rows = [{"text": f"task {i % 3} says hello number {i}", "task_ids": i % 3} for i in range(12)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "trained"
    code = cli.main(["train", str(out), "--data", str(data), str(tiny_llama_dir), "--method",
                     "multitask_prompt_tuning", "--num-virtual-tokens", "3", "--num-tasks", "3",
                     "--epochs", "2", "--lr", "0.05", "--batch-size", "4"])
    assert code == 0, capsys.readouterr().err
    log = json.loads((out / "train.json").read_text())
    assert len(log["step_losses"]) == 6 and log["epoch_losses"][-1] < log["epoch_losses"][0]
    # rows without the field: one line naming it, nothing written
    data.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    code = cli.main(["train", str(tmp_path / "none"), "--data", str(data), str(tiny_llama_dir), "--method",
                     "multitask_prompt_tuning", "--num-virtual-tokens", "3", "--num-tasks", "3"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and '"task_ids"' in err and not (tmp_path / "none").exists()
