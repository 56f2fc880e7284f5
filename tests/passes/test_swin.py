"""Prefix tuning and Visual Prompt Tuning on Swin (SwinForImageClassification): windowed attention, shifted
windows, stages of different widths. PEFT refuses Swin, so the oracle is the mathematics run by the model itself: the base Swin with a
transformers attention function that, at every window attention, puts the layer's prefix in front of the keys
and values of every window (the attention batch is batch * windows: the prefix is broadcast over it) and pads the
additive relative-position bias and shifted-window mask with zero columns for the prefix (no relative position,
never masked), then calls the model's own SDPA attention.

The prefix table is [V, sum over layers of 2 * width]: a row holds layer 0's key and value prefix at its width,
then layer 1's, ... (PEFT's [V, 2L*T] layout when every layer has the same width).

Prompt tuning, P-tuning and multitask prompt tuning follow VPT's PromptedSwinTransformer ("prepend", shallow):
the prompts stay outside the window partition, every window attends over [prompts, window] (zero bias and mask
rows and columns for the prompts), the prompts' outputs are averaged over the image's windows and go through
the block's MLP, patch merging tiles each prompt 4x on channels before its norm and reduction, and the head
pools the patches only. The oracle is that forward written out by hand over the model's own modules (itself
checked against the model with no prompts). PEFT refuses Swin.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import graphpeft
from graphpeft.passes.prefix_tuning import prompt_embeddings
from tests.prompt_methods import PROMPT_METHODS, prompt_config, prompts, task_inputs
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
    # 3x3 windows: both stages padded to a multiple of 3 (8x8 -> 9x9, 4x4 -> 6x6), both with a shifted block
    "padded_windows": dict(depths=[2, 2], num_heads=[2, 4], window_size=3),
}


@pytest.fixture(scope="module", params=[(c, a) for c in CONFIGS for a in ("sdpa", "eager")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def swin(request):
    name, attn = request.param
    model = tiny_swin(attn_implementation=attn, **CONFIGS[name])
    return model, graphpeft.capture(model)


def _attentions(model):
    return [block.attention for stage in model.swin.encoder.layers for block in stage.blocks]


def _windows(model, stage: int) -> int:
    """Windows per image at ``stage``: the patch grid padded to a multiple of the window (clamped to the grid)."""
    side = model.config.image_size // model.config.patch_size // 2 ** stage
    window = min(model.config.window_size, side)
    return (-(-side // window)) ** 2


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
    windows = [3 * _windows(model, stage) for stage, blocks in enumerate(model.config.depths) for _ in range(blocks)]
    assert [w for w, _ in _SEEN] == windows                     # batch x windows rows, every block
    assert _SEEN[1][1][0] == windows[1]                         # the shifted block's per-window mask reached it
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (got - base).abs().max() > 1e-4                      # the prefix matters


def _table_width(model) -> int:
    return sum(2 * att.num_attention_heads * att.head_dim for att in _attentions(model))


def test_prefix_trains_saves_reloads_and_another_batch_size_runs(swin, tmp_path):
    model, gm = swin
    if model.config._attn_implementation == "eager":
        pytest.skip("training and reloading do not depend on the attention kernel: run on the SDPA captures")
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


# -- Visual Prompt Tuning on Swin: prompts beside the windows --------------------------------------------------

VPT_METHODS = PROMPT_METHODS
TASKS = torch.tensor([1, 0, 1])


def vpt_config(method, **kw):
    return prompt_config(method, V, **kw)


def vpt_extra(method):
    return task_inputs(method, TASKS)


def vpt_prompts(ours, method, batch):
    return prompts(ours, method, batch, V, TASKS)


def vpt_step_save_reload(ours, gm, pixels, labels, extra, tmp_path):
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

def _window_attention(blk, tokens, mask, n):
    """Swin's window attention written out over [prompts, window] tokens: bias and mask padded with zero rows and
    columns for the n prompts (VPT's PromptedWindowAttention)."""
    att = blk.attention
    rows, length, channels = tokens.shape
    heads, head_dim = att.num_attention_heads, att.head_dim

    def split(x):
        return x.view(rows, length, heads, head_dim).transpose(1, 2)

    q, k, v = split(att.q_proj(tokens)), split(att.k_proj(tokens)), split(att.v_proj(tokens))
    bias = att.relative_position_bias()                                   # [1, heads, S, S]
    if mask is not None:                                                  # [nW, S, S], windows batch-major
        bias = bias + mask.repeat(rows // mask.shape[0], 1, 1).unsqueeze(1)
    bias = torch.nn.functional.pad(bias, (n, 0, n, 0))
    probs = torch.softmax(q @ k.transpose(2, 3) * att.scaling + bias, -1)
    return att.o_proj((probs @ v).transpose(1, 2).reshape(rows, length, channels))


def _prompted_block(blk, h, p, dims):
    """VPT's PromptedSwinTransformerBlock on HF's SwinLayer, image b's prompts in image b's windows."""
    from transformers.models.swin.modeling_swin import window_partition, window_reverse
    height, width = dims
    blk.set_shift_and_window_size(dims)
    batch, _, channels = h.shape
    n, ws = p.shape[1], blk.window_size
    x, _ = blk.maybe_pad(blk.layernorm_before(h).view(batch, height, width, channels), height, width)
    _, hp, wp, _ = x.shape
    windows = window_partition(blk.cyclic_shift(x), ws).view(-1, ws * ws, channels)
    nw = windows.shape[0] // batch
    tokens = torch.cat([blk.layernorm_before(p).repeat_interleave(nw, 0), windows], 1)
    out = _window_attention(blk, tokens, blk.get_attn_mask(hp, wp, h.dtype, h.device), n)
    attended = out[:, :n].reshape(batch, nw, n, channels).mean(1)
    x = blk.cyclic_shift(window_reverse(out[:, n:].reshape(-1, ws, ws, channels), ws, hp, wp), reverse=True)
    h = h + x[:, :height, :width].reshape(batch, height * width, channels)
    p = p + attended
    return h + blk.mlp(blk.layernorm_after(h)), p + blk.mlp(blk.layernorm_after(p))


def _vpt_swin_oracle(model, pixels, prompts):
    """Swin by hand with the prompt stream: blocks, patch merging with each prompt tiled 4x on channels, then
    the base head over the patches."""
    swin = model.swin
    with torch.no_grad():
        h, dims = swin.embeddings(pixels)
        p = prompts
        for stage in swin.encoder.layers:
            for blk in stage.blocks:
                h, p = _prompted_block(blk, h, p, dims)
            if stage.downsample is not None:
                merge = stage.downsample
                h, p = merge(h, dims), merge.reduction(merge.norm(torch.cat([p] * 4, -1)))
                dims = ((dims[0] + 1) // 2, (dims[1] + 1) // 2)
        pooled = swin.pooler(swin.layernorm(h).transpose(1, 2)).flatten(1)
        return model.classifier(pooled)


def test_the_hand_written_oracle_without_prompts_is_the_model(swin):
    model, _ = swin
    pixels = inputs_for(model, batch=3)["pixel_values"]
    swin_ = model.swin
    with torch.no_grad():
        h, dims = swin_.embeddings(pixels)
        for stage in swin_.encoder.layers:
            for blk in stage.blocks:
                h, _ = _prompted_block(blk, h, h.new_zeros(h.shape[0], 0, h.shape[2]), dims)
            if stage.downsample is not None:
                h, dims = stage.downsample(h, dims), ((dims[0] + 1) // 2, (dims[1] + 1) // 2)
        got = model.classifier(swin_.pooler(swin_.layernorm(h).transpose(1, 2)).flatten(1))
        torch.testing.assert_close(got, model(pixel_values=pixels).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", VPT_METHODS)
def test_prompts_beside_the_windows_equal_the_hand_written_prompted_swin(method, swin):
    model, gm = swin
    torch.manual_seed(0)
    ours = graphpeft.rewrite(copy.deepcopy(gm), vpt_config(method)).eval()
    pixels = inputs_for(model, batch=3)["pixel_values"]
    with torch.no_grad():
        got = ours(pixel_values=pixels, **vpt_extra(method)).logits
        expected = _vpt_swin_oracle(model, pixels, vpt_prompts(ours, method, 3))
        base = model(pixel_values=pixels).logits
        with ours.disable_adapter():
            off = ours(pixel_values=pixels).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(off, base, atol=ATOL, rtol=0)
    assert (got - base).abs().max() > 1e-4                      # the prompts matter
    other = inputs_for(model, batch=5, seed=1)["pixel_values"]   # another batch size than captured
    extra = {"task_ids": torch.tensor([0, 1, 1, 0, 1])} if method == "multitask_prompt_tuning" else {}
    with torch.no_grad():
        assert ours(pixel_values=other, **extra).logits.shape == (5, 3)


def test_each_image_attends_to_its_own_prompts():
    """Batched prompts (multitask: one task per image): an image's logits do not depend on the other images."""
    model = tiny_swin(**CONFIGS["head_sizes_differ"])
    gm = graphpeft.capture(model)
    torch.manual_seed(0)
    ours = graphpeft.rewrite(copy.deepcopy(gm), vpt_config("multitask_prompt_tuning")).eval()
    pixels = inputs_for(model, batch=3)["pixel_values"]
    with torch.no_grad():
        together = ours(pixel_values=pixels, task_ids=torch.tensor([1, 0, 1])).logits
        alone = torch.cat([ours(pixel_values=pixels[i:i + 1], task_ids=torch.tensor([t])).logits
                           for i, t in enumerate([1, 0, 1])])
    torch.testing.assert_close(together, alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", VPT_METHODS)
def test_prompts_train_save_and_reload(method, swin, tmp_path):
    model, gm = swin
    if model.config._attn_implementation == "eager":
        pytest.skip("training and reloading do not depend on the attention kernel: run on the SDPA captures")
    torch.manual_seed(0)
    ours = graphpeft.rewrite(copy.deepcopy(gm), vpt_config(method))
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".prompt_encoder." in n for n in trainable)
    vpt_step_save_reload(ours, gm, inputs_for(model, batch=3)["pixel_values"], torch.tensor([0, 2, 1]),
                         vpt_extra(method), tmp_path)
