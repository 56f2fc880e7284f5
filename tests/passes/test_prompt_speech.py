"""Prompt tuning, P-tuning and multitask prompt tuning on Whisper, whose encoder reads input_features (no
token ids): the virtual tokens go before the decoder's token embeddings. PEFT refuses these models, so the
oracle is the base Whisper itself, called with ``decoder_inputs_embeds = cat(prompts, embed_tokens(ids))``
and the labels padded with -100 in front (Whisper's own loss, no shift)."""

from __future__ import annotations

import copy

import pytest
import torch

import graphpeft
from graphpeft.engine.rewriter import get_attr_path
from tests.models import inputs_for, tiny_whisper

V = 3
ATOL = 1e-5


def _config(method):
    if method == "prompt_tuning":
        return graphpeft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=V)
    if method == "p_tuning":
        return graphpeft.PromptEncoderConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=V)
    return graphpeft.MultitaskPromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=V, num_tasks=2,
                                                 num_ranks=2)


METHODS = ["prompt_tuning", "p_tuning", "multitask_prompt_tuning"]
TASKS = torch.tensor([1, 0])


@pytest.fixture(scope="module")
def whisper():
    model = tiny_whisper(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    return model, graphpeft.capture(model)


def _extra(method):
    return {"task_ids": TASKS} if method == "multitask_prompt_tuning" else {}


def _prompts(ours, method):
    """The [B, V, H] prompts the rewritten model puts before the decoder tokens, from its own parameters."""
    gm = ours.graph_module
    if method == "prompt_tuning":
        return get_attr_path(gm, "prompt_encoder.default.embedding.weight")[:V].expand(2, -1, -1)
    if method == "p_tuning":
        return get_attr_path(gm, "prompt_encoder.default")()[:V].expand(2, -1, -1)
    table = get_attr_path(gm, "prompt_encoder.default.embedding.weight")
    cols = get_attr_path(gm, "prompt_encoder.default.prefix_task_cols")
    rows = get_attr_path(gm, "prompt_encoder.default.prefix_task_rows")
    return (table * (cols[TASKS] @ rows[TASKS]))[:, :V]     # PEFT's formula; the first V of 2V rows


@pytest.mark.parametrize("method", METHODS)
def test_decoder_prompt_equals_the_base_model_with_prompts_before_the_decoder_embeddings(method, whisper):
    model, gm = whisper
    torch.manual_seed(0)
    ours = graphpeft.rewrite(copy.deepcopy(gm), _config(method)).eval()
    batch = inputs_for(model, batch=2, seq=5)
    labels = torch.randint(3, 100, (2, 5))
    labels[0, -2:] = -100
    with torch.no_grad():
        got = ours(**batch, labels=labels, **_extra(method))
        embeds = torch.cat([_prompts(ours, method), model.model.decoder.embed_tokens(batch["decoder_input_ids"])], 1)
        padded = torch.cat([torch.full((2, V), -100), labels], 1)
        expected = model(input_features=batch["input_features"], decoder_inputs_embeds=embeds, labels=padded)
    assert got.logits.shape == (2, V + 5, 100)
    torch.testing.assert_close(got.logits, expected.logits, atol=ATOL, rtol=0)
    assert torch.isfinite(got.loss)
    torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)
    with torch.no_grad(), ours.disable_adapter():          # the prompt matters
        base = ours(**batch).logits
    assert (got.logits[:, V:] - base).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["prompt_tuning"])
def test_labels_only_shift_into_decoder_inputs_behind_the_prompt(method, whisper):
    """labels without decoder_input_ids: Whisper's shift right (start token first), then the prompt in front."""
    model, gm = whisper
    torch.manual_seed(0)
    ours = graphpeft.rewrite(copy.deepcopy(gm), _config(method)).eval()
    features = inputs_for(model, batch=2, seq=5)["input_features"]
    labels = torch.randint(3, 100, (2, 6))
    with torch.no_grad():
        got = ours(input_features=features, labels=labels)
        shifted = torch.cat([torch.full((2, 1), model.config.decoder_start_token_id), labels[:, :-1]], 1)
        embeds = torch.cat([_prompts(ours, method), model.model.decoder.embed_tokens(shifted)], 1)
        expected = model(input_features=features, decoder_inputs_embeds=embeds,
                         labels=torch.cat([torch.full((2, V), -100), labels], 1))
    torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_one_step_moves_only_the_prompt_and_the_adapter_reloads_equal(method, whisper, tmp_path):
    model, gm = whisper
    torch.manual_seed(0)
    ours = graphpeft.rewrite(copy.deepcopy(gm), _config(method))
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".prompt_encoder." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    batch = inputs_for(model, batch=2, seq=5)
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    loss = ours(**batch, labels=batch["decoder_input_ids"], **_extra(method)).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    moved = {n for n, p in ours.named_parameters() if not torch.equal(p, before[n])}
    assert moved == trainable

    ours.eval()
    ours.save_pretrained(tmp_path / "adapter")
    loaded = graphpeft.from_pretrained(copy.deepcopy(gm), tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = ours(**batch, **_extra(method)).logits
        got = loaded(**batch, **_extra(method)).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_a_captured_decoder_attention_mask_gets_ones_for_the_prompt():
    model = tiny_whisper(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    batch = inputs_for(model, batch=2, seq=5)
    batch["decoder_attention_mask"] = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    gm = graphpeft.capture(model, example_inputs=batch)
    torch.manual_seed(0)
    ours = graphpeft.rewrite(gm, _config("prompt_tuning")).eval()
    with torch.no_grad():
        got = ours(**batch).logits
        embeds = torch.cat([_prompts(ours, "prompt_tuning"), model.model.decoder.embed_tokens(batch["decoder_input_ids"])], 1)
        mask = torch.cat([torch.ones(2, V, dtype=torch.long), batch["decoder_attention_mask"]], 1)
        expected = model(input_features=batch["input_features"], decoder_inputs_embeds=embeds,
                         decoder_attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
