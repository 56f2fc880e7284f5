"""Prefix tuning on attention sites whose keys and values are 3-D, batch and heads folded into one axis
[B*H, S, d]: BLOOM (ALiBi scores through baddbmm) against PEFT on the same weights, both ways through the
file format; DeBERTa-v2 (disentangled attention through bmm), which PEFT refuses, against the mathematics
written in through the model's own forward; a custom 3-D model against the mathematics written out by hand.
A 3-D site whose keys cannot be found, or whose fold is not batch-major, is a one-line error naming the module
and the op.

Each architecture is captured once per module; every rewrite works on a deep copy of that graph.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import graphpeft
from graphpeft.errors import GraphPeftError
from tests.grid_models import tiny_bloom, tiny_deberta_v2
from tests.models import inputs_for

ATOL = 1e-5
V = 3
PREFIX = "prompt_encoder.default."
# DeBERTa-v2 at a larger init scale: at 0.02 its position terms move the logits by ~1e-5 and a prefix that
# missed the position-to-content term would pass
BUILDERS = {"bloom": tiny_bloom, "deberta_v2": lambda: tiny_deberta_v2(initializer_range=0.3)}
TASKS = {"bloom": "CAUSAL_LM", "deberta_v2": "SEQ_CLS"}
_CAPTURED: dict[str, tuple] = {}


def _captured(name: str):
    """(model, captured graph, batch) of one architecture: row 0 padded on the right, row 1 on the left."""
    if name not in _CAPTURED:
        model = BUILDERS[name]()
        batch = inputs_for(model, batch=3, seq=7, pad=2)
        batch["attention_mask"][1, :2] = 0
        _CAPTURED[name] = (model, graphpeft.capture(model, dict(batch)), batch)
    return _CAPTURED[name]


def _rewrite(name: str, **fields):
    _, gm, _ = _captured(name)
    config = graphpeft.PrefixTuningConfig(task_type=TASKS[name], num_virtual_tokens=V, **fields)
    return graphpeft.rewrite(copy.deepcopy(gm), config).eval()


def _peft(name: str, **fields):
    model, _, _ = _captured(name)
    torch.manual_seed(1)
    config = peft.PrefixTuningConfig(task_type=TASKS[name], num_virtual_tokens=V, **fields)
    return peft.get_peft_model(copy.deepcopy(model), config).eval()


def _copy_encoder(src, dst: graphpeft.GraphPeftModel) -> None:
    theirs = dict(src.prompt_encoder["default"].named_parameters())
    ours = {k[len(PREFIX):]: p for k, p in dst.graph_module.named_parameters() if k.startswith(PREFIX)}
    assert ours.keys() == theirs.keys()
    with torch.no_grad():
        for key, param in ours.items():
            param.copy_(theirs[key])


def _table(gm: graphpeft.GraphPeftModel, tmp_path) -> torch.Tensor:
    """The [V, 2L*T] prefix table the adapter file holds (the projection's output with prefix_projection)."""
    gm.save_pretrained(tmp_path)
    return load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"]


# -- BLOOM: PEFT as the oracle ------------------------------------------------------------------------------

def test_bloom_sites_are_the_folded_ones():
    gm = _rewrite("bloom")
    sites = [r for r in gm.records if "layer" in r.info]
    assert [r.info["folded_heads"] for r in sites] == [4, 4]
    assert [r.module_path for r in sites] == ["transformer.h.0.self_attention", "transformer.h.1.self_attention"]


@pytest.mark.parametrize("projection", [False, True])
def test_bloom_same_outputs_as_peft_on_the_same_weights(projection):
    """PEFT hands BLOOM the prefix as its past (key positions 0..V-1) and the mask with V ones in front, from
    which BLOOM builds its ALiBi bias: the padded rows check the bias positions as well as the mask."""
    model, _, batch = _captured("bloom")
    pm, gm = _peft("bloom", prefix_projection=projection), _rewrite("bloom", prefix_projection=projection)
    _copy_encoder(pm, gm)
    want, got = pm(**batch).logits, gm(**batch).logits
    assert got.shape == want.shape == model(**batch).logits.shape
    assert not torch.allclose(want, model(**batch).logits, atol=1e-3), "the prefix must change the outputs"
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    resolved = pm.peft_config["default"]
    for field in ("num_layers", "token_dim", "num_attention_heads", "encoder_hidden_size",
                  "num_transformer_submodules"):
        assert gm.records[0].info[field] == getattr(resolved, field), field


def test_bloom_causal_lm_loss_matches_peft():
    _, _, batch = _captured("bloom")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    pm, gm = _peft("bloom"), _rewrite("bloom")
    _copy_encoder(pm, gm)
    torch.testing.assert_close(gm(**batch, labels=labels).loss, pm(**batch, labels=labels).loss, atol=ATOL, rtol=0)


@pytest.mark.parametrize("projection", [False, True])
def test_bloom_peft_adapter_loads_into_graphpeft(projection, tmp_path):
    _, gm0, batch = _captured("bloom")
    pm = _peft("bloom", prefix_projection=projection)
    pm.save_pretrained(tmp_path)
    gm = graphpeft.from_pretrained(copy.deepcopy(gm0), tmp_path)
    torch.testing.assert_close(gm(**batch).logits, pm(**batch).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("projection", [False, True])
def test_bloom_graphpeft_adapter_loads_into_peft(projection, tmp_path):
    model, _, batch = _captured("bloom")
    gm = _rewrite("bloom", prefix_projection=projection)
    gm.save_pretrained(tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    assert not torch.allclose(gm(**batch).logits, model(**batch).logits, atol=1e-3)
    torch.testing.assert_close(pm(**batch).logits, gm(**batch).logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_bloom_greedy_generation_equals_full_forwards_in_peft(tmp_path):
    """Generation (a KV cache whose first V positions hold the prefix) against greedy decoding by full forwards,
    no cache, of the same adapter loaded in PEFT (PEFT's own generate is not a sound oracle for prefix tuning:
    DESIGN.md). Left-padded rows check ALiBi over the prefix while decoding."""
    model, _, _ = _captured("bloom")
    gm = graphpeft.rewrite(model, graphpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=V)).eval()
    for p in gm.parameters():   # generate() needs the model, not a graph; the prefix moved far from its init
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.5)
    gm.save_pretrained(tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    ids = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[0, :3], mask[2, :1] = 0, 0
    ids = ids.masked_fill(mask == 0, 0)
    want, seq, steps = [], ids, 5
    for _ in range(steps):
        want.append(pm(input_ids=seq, attention_mask=torch.cat([mask, torch.ones_like(seq[:, ids.shape[1]:])], 1),
                       use_cache=False).logits[:, -1])
        seq = torch.cat([seq, want[-1].argmax(-1, keepdim=True)], 1)
    assert not torch.allclose(want[0], model(input_ids=ids, attention_mask=mask).logits[:, -1], atol=1e-3)
    out = gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0,
                      eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, seq)
    for got, expected in zip(out.logits, want):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


# -- DeBERTa-v2: the mathematics as the oracle ----------------------------------------------------------------

def _deberta_reference(model, batch: dict, table: torch.Tensor, filler: int = 7) -> torch.Tensor:
    """DeBERTa-v2 with a key/value prefix, written into the model's own eager forward (PEFT refuses the model:
    it takes no past key values, so there is no PEFT output to compare with).

    The semantics, those of a past of length V as PEFT gives the models it supports: in layer l the keys are
    cat(P[2l], K) and the values cat(P[2l+1], V) on the key axis, P viewed [V, 2L, H, d]; the prefix sits at
    positions 0..V-1 and the tokens at V..V+L-1 (absolute position embeddings and the relative positions of
    the content-to-position and position-to-content terms alike; position-to-content reads the prefix keys);
    every query attends to the prefix. Built as: V tokens (any id) in front with mask 1, whose outputs of
    every key and value projection forward hooks overwrite with the prefix; nothing else of those V tokens
    reaches a real one (DeBERTa mixes positions in attention only); the head pools position V, the first token.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b = ids.shape[0]
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    prefix = table.view(V, 2 * layers, heads, -1).flatten(2)           # [V, 2L, H*d]: the projection's layout

    def overwrite(rows: torch.Tensor):
        def hook(module, args, out):
            if out.shape[:2] != (b, V + ids.shape[1]):                  # rel_embeddings through a shared key_proj
                return out
            return torch.cat([rows.expand(b, -1, -1).to(out.dtype), out[:, V:]], 1)
        return hook

    handles = []
    for i, layer in enumerate(model.deberta.encoder.layer):
        attention = layer.attention.self
        handles.append(attention.key_proj.register_forward_hook(overwrite(prefix[:, 2 * i])))
        handles.append(attention.value_proj.register_forward_hook(overwrite(prefix[:, 2 * i + 1])))
    try:
        hidden = model.deberta(input_ids=torch.cat([torch.full((b, V), filler), ids], 1),
                               attention_mask=torch.cat([torch.ones(b, V, dtype=mask.dtype), mask], 1))[0]
    finally:
        for handle in handles:
            handle.remove()
    return model.classifier(model.dropout(model.pooler(hidden[:, V:])))


def test_peft_refuses_deberta_v2():
    _, _, batch = _captured("deberta_v2")
    with pytest.raises(ValueError, match="past key values"):
        _peft("deberta_v2")(**batch)


@pytest.mark.parametrize("projection", [False, True])
def test_deberta_v2_matches_the_prefix_written_into_its_own_forward(projection, tmp_path):
    model, _, batch = _captured("deberta_v2")
    gm = _rewrite("deberta_v2", prefix_projection=projection)
    got = gm(**batch).logits
    assert not torch.allclose(got, model(**batch).logits, atol=1e-4), "the prefix must change the outputs"
    table = _table(gm, tmp_path)
    want = _deberta_reference(model, batch, table)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # the reference does not depend on what the V positions in front hold: nothing of them leaks
    torch.testing.assert_close(_deberta_reference(model, batch, table, filler=42), want, atol=ATOL, rtol=0)
    # and the prefix reaches every term: a reference with other prefix keys disagrees
    other = table.clone().view(V, 2 * model.config.num_hidden_layers, -1)
    other[:, 0::2] = torch.randn_like(other[:, 0::2])
    assert not torch.allclose(_deberta_reference(model, batch, other.view(V, -1)), want, atol=1e-4)


def test_deberta_v2_adapter_reloads_and_training_moves_prefix_and_head(tmp_path):
    _, gm0, batch = _captured("deberta_v2")
    gm = _rewrite("deberta_v2")
    gm.save_pretrained(tmp_path)
    loaded = graphpeft.from_pretrained(copy.deepcopy(gm0), tmp_path)
    torch.testing.assert_close(loaded(**batch).logits, gm(**batch).logits, atol=ATOL, rtol=0)
    before = {k: p.detach().clone() for k, p in gm.named_parameters()}
    gm.train()
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=5e-2)
    labels, losses = torch.tensor([0, 1, 1]), []
    for _ in range(8):
        loss = gm(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    moved = {k for k, p in gm.named_parameters() if not torch.equal(p.detach(), before[k])}
    assert losses[-1] < losses[0], losses
    assert any(".prompt_encoder." in k for k in moved), moved
    assert all(".prompt_encoder." in k or ".classifier." in k or ".pooler." in k for k in moved), moved


# -- a 3-D site that cannot take a prefix ---------------------------------------------------------------------

class _FoldedAttention(nn.Module):
    """3-D attention on [B*H, S, d]; ``gain``: the transposed keys are scaled by a learned gain per head
    channel; ``heads_major``: heads and batch are folded H*B (from [H, B, S, d]) instead of B*H."""

    def __init__(self, gain: bool, heads_major: bool, width: int = 16, heads: int = 4):
        super().__init__()
        self.heads, self.heads_major, self.qkv = heads, heads_major, nn.Linear(width, 3 * width)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, width // heads).view(1, -1, 1)) if gain else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, s, width = h.shape
        d = width // self.heads
        qkv, order = self.qkv(h).view(b, s, 3, self.heads, d), (2, 0, 1, 3) if self.heads_major else (0, 2, 1, 3)
        q, k, v = (qkv[:, :, i].permute(*order).reshape(b * self.heads, s, d) for i in range(3))
        keys = k.transpose(1, 2) * self.gain if self.gain is not None else k.transpose(1, 2)
        out = torch.bmm(torch.bmm(q, keys).softmax(-1), v)
        out = out.view(self.heads, b, s, d).permute(1, 2, 0, 3) if self.heads_major else \
            out.view(b, self.heads, s, d).transpose(1, 2)
        return out.reshape(b, s, width)


class _FoldedLM(nn.Module):
    def __init__(self, **attention):
        super().__init__()
        self.embed, self.attn, self.head = nn.Embedding(50, 16), _FoldedAttention(**attention), nn.Linear(16, 50)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.embed(input_ids)))


@pytest.mark.parametrize("attention,says", [
    (dict(gain=True, heads_major=False), r"3-D keys .* \(it reached aten\.mul\.Tensor\)"),
    (dict(gain=False, heads_major=True),
     r"3-D keys \(aten\.reshape\.default\) that are not a reshape of \[batch, heads"),
])
def test_a_folded_site_that_cannot_take_the_prefix_is_a_one_line_error_naming_module_and_op(attention, says):
    ids = torch.randint(0, 50, (2, 6))
    config = graphpeft.PrefixTuningConfig(num_virtual_tokens=V)
    with pytest.raises(GraphPeftError, match=says) as err:
        graphpeft.rewrite(_FoldedLM(**attention), config, example_inputs=(ids,))
    message = str(err.value)
    assert "\n" not in message and "attention site attn (aten.bmm.default after aten.bmm.default)" in message, message


def _folded_reference(model: _FoldedLM, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """_FoldedLM with its prefix written out by hand on [B, H, S, d]: keys cat(P_k, k), values cat(P_v, v)."""
    attn, (b, s) = model.attn, ids.shape
    prefix = table.view(V, 2, attn.heads, -1).permute(1, 2, 0, 3)              # [2, H, V, d]
    q, k, v = attn.qkv(model.embed(ids)).view(b, s, 3, attn.heads, -1).permute(2, 0, 3, 1, 4)
    k = torch.cat([prefix[0].expand(b, -1, -1, -1), k], 2)
    v = torch.cat([prefix[1].expand(b, -1, -1, -1), v], 2)
    out = (q @ k.transpose(-1, -2)).softmax(-1) @ v
    return model.head(out.transpose(1, 2).reshape(b, s, -1))


def test_the_same_folded_site_with_batch_major_keys_takes_the_prefix(tmp_path):
    """The positive control of the errors above, against the mathematics written out by hand (a custom model:
    no PEFT to compare with): plain B*H keys on the same module take the prefix."""
    model, ids = _FoldedLM(gain=False, heads_major=False).eval(), torch.randint(0, 50, (2, 6))
    gm = graphpeft.rewrite(model, graphpeft.PrefixTuningConfig(num_virtual_tokens=V), example_inputs=(ids,)).eval()
    assert [r.info.get("folded_heads") for r in gm.records if "layer" in r.info] == [4]
    ids = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(1))
    got = gm(ids)
    assert not torch.allclose(got, model(ids), atol=1e-4)
    torch.testing.assert_close(got, _folded_reference(model, ids, _table(gm, tmp_path)), atol=ATOL, rtol=0)
