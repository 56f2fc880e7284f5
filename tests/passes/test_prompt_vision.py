"""Prompt-learning methods on a vision transformer (ViTForImageClassification, pixel_values, no token ids).

Prefix tuning puts its learned keys and values in front of every attention site's keys and values; the oracle
is the base ViT run with a transformers attention function that concatenates the same prefix (PEFT's layout:
row 2j keys, 2j+1 values of layer j) before calling the model's own attention. Prompt tuning, P-tuning and
multitask prompt tuning insert their virtual tokens right after the class token (Visual Prompt Tuning, Jia et
al. 2022); the oracle is the ViT's own modules run by hand on cat(CLS, prompts, patches). PEFT refuses all of
these models."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import graphpeft
from graphpeft.passes.prefix_tuning import prompt_embeddings
from tests.prompt_methods import PROMPT_METHODS, prompt_config, prompts, task_inputs
from tests.models import inputs_for, tiny_vit

V = 3
ATOL = 1e-5
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_PREFIX: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}     # id(attention module) -> (keys, values) [h, V, d]


def _prefix_attention(module, query, key, value, attention_mask, **kwargs):
    """The model's own SDPA attention with a prefix in front of the keys and values."""
    pk, pv = _PREFIX[id(module)]
    batch = key.shape[0]
    key = torch.cat([pk.expand(batch, -1, -1, -1), key], 2)
    value = torch.cat([pv.expand(batch, -1, -1, -1), value], 2)
    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


AttentionInterface.register("graphpeft_prefix_oracle", _prefix_attention)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def vit(request):
    model = tiny_vit(attn_implementation=request.param, **NO_DROPOUT)
    return model, graphpeft.capture(model)


def _oracle_with_prefix(model, pixels, table):
    """logits of the base model whose layer j attends to prefix rows 2j (keys), 2j+1 (values) of ``table``."""
    layers = model.vit.layers
    heads = model.config.num_attention_heads
    prefix = table.view(V, 2 * len(layers), heads, -1).permute(1, 2, 0, 3)
    oracle = copy.deepcopy(model)
    oracle.config._attn_implementation = "graphpeft_prefix_oracle"
    for j, layer in enumerate(oracle.vit.layers):
        _PREFIX[id(layer.attention)] = (prefix[2 * j].unsqueeze(0), prefix[2 * j + 1].unsqueeze(0))
    with torch.no_grad():
        return oracle(pixel_values=pixels).logits


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_at_every_attention_site_equals_the_model_attending_to_the_prefix(vit, projection):
    model, gm = vit
    torch.manual_seed(0)
    ours = graphpeft.rewrite(copy.deepcopy(gm), graphpeft.PrefixTuningConfig(
        num_virtual_tokens=V, prefix_projection=projection)).eval()
    assert len([r for r in ours.records if r.kind != "prefix"]) == len(model.vit.layers)
    pixels = inputs_for(model, batch=3)["pixel_values"]
    with torch.no_grad():
        got = ours(pixel_values=pixels).logits
        base = model(pixel_values=pixels).logits
        entry = next(r for r in ours.records if r.kind == "prefix")
        table = prompt_embeddings(ours.graph_module, entry)
    assert got.shape == base.shape
    torch.testing.assert_close(got, _oracle_with_prefix(model, pixels, table), atol=ATOL, rtol=0)
    assert (got - base).abs().max() > 1e-4                     # the prefix matters


def _step_save_reload(ours, gm, pixels, labels, extra, tmp_path):
    """One SGD step moves exactly the trainable parameters; save -> from_pretrained gives equal logits."""
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    loss = torch.nn.functional.cross_entropy(ours(pixel_values=pixels, **extra).logits, labels)
    assert torch.isfinite(loss)
    loss.backward()
    torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=1.0).step()
    assert {n for n, p in ours.named_parameters() if not torch.equal(p, before[n])} == trainable
    ours.eval().save_pretrained(tmp_path / "adapter")
    loaded = graphpeft.from_pretrained(copy.deepcopy(gm), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels, **extra).logits,
                                   ours(pixel_values=pixels, **extra).logits, atol=ATOL, rtol=0)


def test_prefix_trains_saves_and_reloads(vit, tmp_path):
    model, gm = vit
    torch.manual_seed(0)
    ours = graphpeft.rewrite(copy.deepcopy(gm), graphpeft.PrefixTuningConfig(num_virtual_tokens=V))
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        "graph_module.prompt_encoder.default.embedding.weight"}
    _step_save_reload(ours, gm, inputs_for(model, batch=2)["pixel_values"], torch.tensor([0, 2]), {}, tmp_path)


# -- Visual Prompt Tuning: virtual tokens after the class token ------------------------------------------

METHODS = PROMPT_METHODS
TASKS = torch.tensor([1, 0, 1])


def _config(method, **kw):
    return prompt_config(method, V, **kw)


def _extra(method):
    return task_inputs(method, TASKS)


def _prompts(ours, method, batch):
    return prompts(ours, method, batch, V, TASKS)


def _vpt_oracle(model, pixels, prompts):
    """ViT by hand: embeddings -> cat(CLS, prompts, patches) -> layers -> layernorm -> classifier(token 0)."""
    with torch.no_grad():
        h = model.vit.embeddings(pixels)
        h = torch.cat([h[:, :1], prompts, h[:, 1:]], 1)
        for layer in model.vit.layers:
            h = layer(h)
        return model.classifier(model.vit.layernorm(h)[:, 0])


@pytest.mark.parametrize("method", METHODS)
def test_virtual_tokens_after_the_class_token_equal_the_hand_written_forward(method, vit):
    model, gm = vit
    torch.manual_seed(0)
    ours = graphpeft.rewrite(copy.deepcopy(gm), _config(method)).eval()
    pixels = inputs_for(model, batch=3)["pixel_values"]
    with torch.no_grad():
        got = ours(pixel_values=pixels, **_extra(method)).logits
        expected = _vpt_oracle(model, pixels, _prompts(ours, method, 3))
        base = model(pixel_values=pixels).logits
        with ours.disable_adapter():
            off = ours(pixel_values=pixels).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(off, base, atol=ATOL, rtol=0)
    assert (got - base).abs().max() > 1e-4                     # the prompts matter
    other = inputs_for(model, batch=5, seed=1)["pixel_values"]       # another batch size than captured
    extra = {"task_ids": torch.tensor([0, 1, 1, 0, 1])} if method == "multitask_prompt_tuning" else {}
    with torch.no_grad():
        assert ours(pixel_values=other, **extra).logits.shape == (5, 3)


@pytest.mark.parametrize("method", METHODS)
def test_virtual_tokens_train_save_and_reload(method, vit, tmp_path):
    model, gm = vit
    torch.manual_seed(0)
    ours = graphpeft.rewrite(copy.deepcopy(gm), _config(method))
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".prompt_encoder." in n for n in trainable)
    _step_save_reload(ours, gm, inputs_for(model, batch=3)["pixel_values"], torch.tensor([0, 2, 1]), _extra(method),
                      tmp_path)


def test_vocabulary_inits_on_an_image_model_are_a_one_line_error(vit):
    _, gm = vit
    with pytest.raises(graphpeft.GraphPeftError, match="needs a token vocabulary") as err:
        graphpeft.rewrite(copy.deepcopy(gm), graphpeft.PromptTuningConfig(num_virtual_tokens=V,
                                                                           prompt_tuning_init="SAMPLE_VOCAB"))
    assert "\n" not in str(err.value)
