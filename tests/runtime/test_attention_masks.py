"""The shared attention mask (graphpeft.runtime.attention_masks): converted once for every layer, left out for a
plain causal batch (is_causal, as transformers' sdpa path does), restored to its boolean form for ONNX export."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import graphpeft
from graphpeft.runtime.attention_masks import (additive_mask_unless_causal, boolean_attention_masks,
                                               share_attention_masks)
from tests.models import inputs_for, tiny_gpt2, tiny_llama

aten = torch.ops.aten
_CAPTURED: dict[str, tuple] = {}


def _rewrite(name, optimize):
    if name not in _CAPTURED:
        model = {"llama": tiny_llama, "gpt2": tiny_gpt2}[name]()
        _CAPTURED[name] = model, graphpeft.capture(model)
    model, gm = _CAPTURED[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)       # torch's pytree deprecation chatter on deepcopy
        gm = copy.deepcopy(gm)
    torch.manual_seed(0)
    return model, graphpeft.rewrite(gm, graphpeft.LoraConfig(target_modules="all-linear", init_lora_weights=False),
                                    optimize=optimize)


def _sdpa(gm):
    return [n for n in gm.graph.nodes if n.target is aten.scaled_dot_product_attention.default]


def _mask_of(node):
    return node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)


def _causal_of(node):
    return node.kwargs.get("is_causal", node.args[5] if len(node.args) > 5 else False)


# -- the run-time choice ---------------------------------------------------------------------------------

def _causal(batch, rows, cols=None):
    return torch.ones(rows, cols or rows, dtype=torch.bool).tril().expand(batch, 1, rows, cols or rows)


def test_a_plain_causal_mask_becomes_none():
    assert additive_mask_unless_causal(_causal(3, 5), torch.float32) is None
    assert additive_mask_unless_causal(_causal(3, 5).clone(), torch.float16) is None


@pytest.mark.parametrize("case", ["padded", "window", "not-square", "bidirectional", "single-token"])
def test_any_other_mask_gets_the_additive_form_sdpa_would_make(case):
    mask = _causal(2, 6).clone()
    if case == "padded":
        mask[1, :, :, :2] = False
    elif case == "window":
        mask &= torch.ones(6, 6, dtype=torch.bool).triu(-2)
    elif case == "not-square":                    # a prefix or a cache: keys longer than queries
        mask = torch.ones(2, 1, 6, 9, dtype=torch.bool).tril(3)
    elif case == "bidirectional":
        mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    else:
        mask = torch.ones(2, 1, 1, 1, dtype=torch.bool)
    got = additive_mask_unless_causal(mask, torch.float32)
    assert got is not None and got.dtype == torch.float32
    q, k, v = (torch.randn(2, 2, mask.shape[-2] if i == 0 else mask.shape[-1], 4) for i in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    assert torch.equal(sdpa(q, k, v, attn_mask=got), sdpa(q, k, v, attn_mask=mask))
    assert torch.equal(got, torch.zeros(mask.shape).masked_fill(~mask, float("-inf")))


def test_fake_tensors_take_the_mask_path_without_a_data_dependent_branch():
    with FakeTensorMode() as mode:
        mask = mode.from_tensor(_causal(2, 5).clone())
        got = additive_mask_unless_causal(mask, torch.float32)
    assert got is not None and tuple(got.shape) == (2, 1, 5, 5)


# -- in a rewritten graph ---------------------------------------------------------------------------------

@pytest.mark.parametrize("pad", [0, 2], ids=["causal", "padded"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_one_shared_mask_feeds_every_layer_with_the_same_outputs_and_gradients(name, pad):
    """Converted once (padded), or left out for is_causal (unpadded), the layers attend exactly as before:
    the same logits and adapter gradients, bit for bit (sdpa's causal kernel and its -inf mask agree on CPU)."""
    model, pm = _rewrite(name, optimize=False)
    gm = pm.graph_module
    sdpa = _sdpa(gm)
    masks = {_mask_of(n) for n in sdpa}
    assert len(sdpa) > 1 and len(masks) == 1 and next(iter(masks)).meta["val"].dtype == torch.bool
    batch = inputs_for(model, 2, 6, pad=pad)

    def run():
        pm.zero_grad()
        torch.manual_seed(1)                  # the same dropout masks (gpt2's) in both runs
        out = pm.train()(**batch).logits
        out.square().mean().backward()
        return out.detach(), {k: p.grad.clone() for k, p in pm.named_parameters() if p.requires_grad}

    want, want_grads = run()
    assert share_attention_masks(gm) == 1 and share_attention_masks(gm) == 0
    shared = {_mask_of(n) for n in sdpa}
    assert len(shared) == 1 and next(iter(shared)).target is additive_mask_unless_causal
    assert {_causal_of(n).args[0] for n in sdpa} == shared
    saved_masks = []

    def pack(t):
        if t.dim() == 4 and t.shape[-1] == t.shape[-2] == 6 and t.shape[1] == 1:
            saved_masks.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        got, grads = run()
    assert torch.equal(got, want) and all(torch.equal(grads[k], want_grads[k]) for k in want_grads)
    kept = len({m.data_ptr() for m in saved_masks})        # gpt2's attention dropout adds the mask: keeps none
    assert kept <= 1 if pad else kept == 0, "at most one float mask kept for backward; none for a causal batch"


def test_a_windowed_model_keeps_its_mask():
    """Mistral's sliding window on an unpadded batch is not plain causality: the mask stays, and the adapted
    model (B = 0) gives the base model's own logits."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=3,
                                             max_position_embeddings=64)).eval()
    model.config._attn_implementation = "sdpa"
    pm = graphpeft.rewrite(model, graphpeft.LoraConfig(target_modules=["q_proj", "v_proj"]))
    batch = inputs_for(model, 2, 7)
    with torch.no_grad():
        torch.testing.assert_close(pm(**batch).logits, model(**batch).logits, atol=1e-6, rtol=1e-5)
        (mask,) = {_mask_of(n) for n in _sdpa(pm.graph_module)}
        assert mask.target is additive_mask_unless_causal


def test_export_sees_the_boolean_masks_and_the_model_keeps_its_shared_one():
    """ONNX export traces the boolean form and is_causal=False (its exporter makes the finite mask ONNX Runtime
    trains with); the model's own graph is back as it was after the block."""
    model, pm = _rewrite("llama", optimize=True)
    gm = pm.graph_module

    def masks():
        return {(_mask_of(n).target, _causal_of(n)) for n in _sdpa(gm)}

    batch = inputs_for(model, 2, 6)
    with torch.no_grad():
        want = pm(**batch).logits
        (shared,) = masks()
        assert shared[0] is additive_mask_unless_causal
        with boolean_attention_masks(gm):
            assert masks() == {(aten.expand.default, False)}
            assert torch.equal(pm(**batch).logits, want)
        assert masks() == {shared} and torch.equal(pm(**batch).logits, want)
