"""Prefix tuning on Swin (SwinForImageClassification): windowed attention, shifted windows, stages of different
widths. PEFT refuses Swin, so the oracle is the mathematics run by the model itself: the base Swin with a
transformers attention function that, at every window attention, puts the layer's prefix in front of the keys
and values of every window (the attention batch is batch * windows: the prefix is broadcast over it) and pads the
additive relative-position bias and shifted-window mask with zero columns for the prefix (no relative position,
never masked), then calls the model's own SDPA attention.

The prefix table is [V, sum over layers of 2 * width]: a row holds layer 0's key and value prefix at its width,
then layer 1's, ... (PEFT's [V, 2L*T] layout when every layer has the same width).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import graphpeft
from graphpeft.passes.prefix_tuning import prompt_embeddings
from tests.grid_models import tiny_swin
from tests.models import inputs_for

V = 3
ATOL = 1e-5
_PREFIX: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}     # id(attention module) -> (keys, values) [h, V, d]
_SEEN: list[tuple] = []                                         # (windows*batch, mask shape) per call


def _prefix_attention(module, query, key, value, attention_mask, **kwargs):
    """Swin's window attention with the prefix in front of every window's keys and values, the bias/mask padded."""
    pk, pv = _PREFIX[id(module)]
    windows = key.shape[0]                                      # batch * number of windows
    key = torch.cat([pk.expand(windows, -1, -1, -1), key], 2)
    value = torch.cat([pv.expand(windows, -1, -1, -1), value], 2)
    _SEEN.append((windows, tuple(attention_mask.shape)))
    mask = torch.nn.functional.pad(attention_mask, (V, 0), value=0.0)
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


AttentionInterface.register("graphpeft_swin_prefix_oracle", _prefix_attention)

# stage 0: 8x8 patches in four 4x4 windows, its second block shifted (masked); stage 1: 4x4 patches, one window.
CONFIGS = {
    "head_sizes_differ": dict(depths=[2, 2], num_heads=[2, 2]),          # head size 8, then 16 (the grid's kind)
    "head_counts_differ": dict(depths=[2, 2], num_heads=[2, 4]),         # head size 8 everywhere (Swin-T's kind)
}


@pytest.fixture(scope="module", params=[(c, a) for c in CONFIGS for a in ("sdpa", "eager")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def swin(request):
    name, attn = request.param
    model = tiny_swin(attn_implementation=attn, **CONFIGS[name])
    return model, graphpeft.capture(model)


def _attentions(model):
    return [block.attention for stage in model.swin.encoder.layers for block in stage.blocks]


def _oracle_with_prefix(model, pixels, table):
    """logits of the base Swin whose attention j attends to its key and value prefix, read off ``table`` in the
    documented layout: columns [o_j, o_j + T_j) keys and [o_j + T_j, o_j + 2 T_j) values, o_j = sum_{i<j} 2 T_i."""
    oracle = copy.deepcopy(model)
    oracle.config._attn_implementation = "graphpeft_swin_prefix_oracle"
    start = 0
    for att in _attentions(oracle):
        heads, head_dim = att.num_attention_heads, att.head_dim
        width = heads * head_dim
        keys, values = (table[:, s:s + width].view(V, heads, head_dim).permute(1, 0, 2).unsqueeze(0)
                        for s in (start, start + width))
        _PREFIX[id(att)] = (keys, values)
        start += 2 * width
    assert start == table.shape[1]                              # the table holds exactly every layer's prefix
    _SEEN.clear()
    with torch.no_grad():
        return oracle(pixel_values=pixels).logits


def test_prefix_in_every_window_equals_the_model_attending_to_the_prefix(swin):
    model, gm = swin
    torch.manual_seed(0)
    ours = graphpeft.rewrite(copy.deepcopy(gm), graphpeft.PrefixTuningConfig(num_virtual_tokens=V)).eval()
    assert len([r for r in ours.records if r.kind != "prefix"]) == len(_attentions(model))
    pixels = inputs_for(model, batch=3)["pixel_values"]
    with torch.no_grad():
        got = ours(pixel_values=pixels).logits
        base = model(pixel_values=pixels).logits
        table = prompt_embeddings(ours.graph_module, next(r for r in ours.records if r.kind == "prefix"))
    expected = _oracle_with_prefix(model, pixels, table)
    assert [w for w, _ in _SEEN] == [12, 12, 3, 3]              # 4 windows x 3 images, then 1 window x 3
    assert _SEEN[1][1][0] == 12                                 # the shifted block's per-window mask reached it
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (got - base).abs().max() > 1e-4                      # the prefix matters


def _table_width(model) -> int:
    return sum(2 * att.num_attention_heads * att.head_dim for att in _attentions(model))


def test_prefix_trains_saves_reloads_and_another_batch_size_runs(swin, tmp_path):
    model, gm = swin
    torch.manual_seed(0)
    ours = graphpeft.rewrite(copy.deepcopy(gm), graphpeft.PrefixTuningConfig(num_virtual_tokens=V))
    params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert list(params) == ["graph_module.prompt_encoder.default.embedding.weight"]
    assert next(iter(params.values())).shape == (V, _table_width(model))
    pixels, labels = inputs_for(model, batch=2)["pixel_values"], torch.tensor([0, 2])
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    loss = torch.nn.functional.cross_entropy(ours(pixel_values=pixels).logits, labels)
    loss.backward()
    torch.optim.SGD(list(params.values()), lr=1.0).step()
    assert {n for n, p in ours.named_parameters() if not torch.equal(p, before[n])} == set(params)
    ours.eval().save_pretrained(tmp_path / "adapter")
    loaded = graphpeft.from_pretrained(copy.deepcopy(gm), tmp_path / "adapter").eval()
    other = inputs_for(model, batch=5, seed=1)["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, ours(pixel_values=pixels).logits,
                                   atol=ATOL, rtol=0)
        assert loaded(pixel_values=other).logits.shape == (5, 3)


@pytest.mark.parametrize("field, value", [("prefix_projection", True), ("token_dim", 16), ("num_layers", 2)])
def test_one_prefix_size_on_mixed_widths_is_a_one_line_error(swin, field, value):
    _, gm = swin
    with pytest.raises(graphpeft.GraphPeftError, match="different widths") as err:
        graphpeft.rewrite(copy.deepcopy(gm), graphpeft.PrefixTuningConfig(num_virtual_tokens=V, **{field: value}))
    assert "\n" not in str(err.value)
