"""P-Tuning against the oracle, Hugging Face PEFT: the same prompt encoder (MLP and LSTM) gives the same
outputs, adapters load both ways through the file format (which holds the encoder's output), and
graphpeft also runs where PEFT cannot (distilbert, a custom SDPA model); training, CLI, bad input."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import graphpeft
from graphpeft.cli import commands as cli
from tests.models import TinySdpaLM, inputs_for, tiny_bert_cls, tiny_distilbert, tiny_gpt2, tiny_llama, tiny_t5

ATOL = 1e-5
V = 3
ENCODER = "graph_module.prompt_encoder.default."


def _bert():
    return tiny_bert_cls(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


# name -> (builder, PEFT task type, encoder fields)
CASES = {
    "llama": (tiny_llama, "CAUSAL_LM", dict(encoder_reparameterization_type="MLP")),
    "gpt2": (tiny_gpt2, "CAUSAL_LM", dict(encoder_reparameterization_type="LSTM", encoder_hidden_size=16)),
    "bert": (_bert, "SEQ_CLS", dict(encoder_reparameterization_type="MLP", encoder_hidden_size=24)),
    "t5": (tiny_t5, "SEQ_2_SEQ_LM", dict(encoder_reparameterization_type="LSTM", encoder_num_layers=1)),
}


def _out(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_encoder_same_outputs_as_peft_and_files_load_both_ways(name, tmp_path):
    builder, task, fields = CASES[name]
    model = builder()
    gm = graphpeft.capture(model)
    batch = inputs_for(model, batch=3, seq=7, pad=2)
    cfg = dict(task_type=task, num_virtual_tokens=V, **fields)
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.PromptEncoderConfig(**cfg)).eval()
    torch.manual_seed(0)
    ours = graphpeft.rewrite(copy.deepcopy(gm), graphpeft.PromptEncoderConfig(**cfg)).eval()
    theirs = {k: v for k, v in pm.named_parameters() if k.startswith("prompt_encoder.")}
    mine = {k[len("graph_module."):]: v for k, v in ours.named_parameters() if k.startswith(ENCODER)}
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)          # PEFT's layout and init order
    assert {n for n, p in ours.named_parameters() if p.requires_grad} >= {f"graph_module.{k}" for k in theirs}

    with torch.no_grad():                                                # a trained-looking encoder
        for k, v in theirs.items():
            v.add_(0.1 * torch.randn_like(v))
            mine[k].copy_(v)
    expected = _out(pm, batch)
    got = _out(ours, batch)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)

    pm.save_pretrained(tmp_path / "peft")                                # PEFT -> graphpeft (inference)
    loaded = graphpeft.from_pretrained(copy.deepcopy(gm), tmp_path / "peft")
    assert not any(".mlp_head." in n for n, _ in loaded.named_parameters())   # no encoder, as in PEFT
    torch.testing.assert_close(_out(loaded, batch), expected, atol=ATOL, rtol=0)

    ours.save_pretrained(tmp_path / "ours")                              # graphpeft -> PEFT
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(saved) == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    total = V * (2 if task == "SEQ_2_SEQ_LM" else 1)
    assert saved["prompt_embeddings"].shape == (total, 32)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["encoder_hidden_size"] == fields.get("encoder_hidden_size", 32)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    torch.testing.assert_close(_out(back, batch), got, atol=ATOL, rtol=0)


def test_lstm_dropout_follows_train_and_eval_and_training_moves_only_the_encoder():
    model = TinySdpaLM()
    cfg = graphpeft.PromptEncoderConfig(num_virtual_tokens=V, encoder_reparameterization_type="LSTM",
                                        encoder_num_layers=2, encoder_dropout=0.5, encoder_hidden_size=16)
    torch.manual_seed(0)
    ours = graphpeft.rewrite(model, cfg, example_inputs=TinySdpaLM.example())
    ids = torch.randint(3, 100, (4, 6), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(**batch), ours(**batch))
    ours.train()
    with torch.no_grad():
        assert not torch.equal(ours(**batch), ours(**batch))

    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(ENCODER) for n in trainable)
    assert any(".lstm_head." in n for n in trainable) and any(".mlp_head." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    targets = torch.roll(ids, -1, 1)
    losses = []
    for _ in range(8):
        logits = ours(**batch)[:, V:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 100), targets.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    moved = {n for n, p in ours.named_parameters() if not torch.equal(p, before[n])}
    assert moved == trainable


def test_distilbert_where_peft_fails():
    model = tiny_distilbert(dropout=0.0, attention_dropout=0.0)
    with pytest.raises(ValueError, match="token_dim"):
        peft.get_peft_model(copy.deepcopy(model), peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=V))
    ours = graphpeft.rewrite(copy.deepcopy(model), graphpeft.PromptEncoderConfig(task_type="SEQ_CLS",
                                                                                 num_virtual_tokens=V)).eval()
    encoder = ours.graph_module.get_submodule("prompt_encoder.default")
    batch = inputs_for(model, batch=2, seq=5, pad=1)
    with torch.no_grad():          # PEFT's formula, by hand
        prompt = encoder.mlp_head(encoder.embedding.weight[None])
        embeds = torch.cat([prompt.expand(2, -1, -1), model.distilbert.embeddings.word_embeddings(batch["input_ids"])], 1)
        mask = torch.cat([torch.ones(2, V, dtype=torch.long), batch["attention_mask"]], 1)
        expected = model(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(_out(ours, batch), expected, atol=ATOL, rtol=0)


def test_bad_config_is_a_one_line_error():
    for fields, match in [(dict(num_virtual_tokens=-1), "num_virtual_tokens must be a positive integer"),
                          (dict(num_virtual_tokens=2, encoder_reparameterization_type="GRU"), "MLP or LSTM"),
                          (dict(num_virtual_tokens=2, encoder_hidden_size=0), "encoder_hidden_size")]:
        with pytest.raises(graphpeft.GraphPeftError, match=match) as err:
            graphpeft.PromptEncoderConfig(**fields)
        assert "\n" not in str(err.value)


def test_cli_rewrite(tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "adapter"
    code = cli.main(["rewrite", str(tiny_bert_dir), "-o", str(out), "--method", "p_tuning", "--num-virtual-tokens",
                     "4", "--encoder", "LSTM", "--encoder-hidden-size", "16"])
    assert code == 0, capsys.readouterr().err
    saved = load_file(out / "adapter_model.safetensors")
    assert saved["prompt_embeddings"].shape == (4, 32) and "base_model.classifier.weight" in saved
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["encoder_reparameterization_type"], config["encoder_hidden_size"]) == \
        ("P_TUNING", "LSTM", 16)
    code = cli.main(["rewrite", str(tiny_bert_dir), "-o", str(tmp_path / "bad"), "--method", "p_tuning",
                     "--num-virtual-tokens", "4", "--encoder", "GRU"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "MLP or LSTM" in err
