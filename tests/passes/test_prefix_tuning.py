"""Prefix tuning against the oracles: PEFT on llama (grouped-query, SDPA and eager), gpt2, bart and bloom (3-D
ALiBi attention); beyond PEFT, transformers' own cache path on bert / roberta (which PEFT refuses), a hand-written
reference on a custom SDPA model with no past_key_values argument, and on 3-D [batch*heads, seq, head] attention
DeBERTa-v2 (PEFT refuses it) against the prefix written into its own forward and a custom model against the
mathematics written out by hand. Same weights, same outputs, both ways through the file format.

Each architecture is captured once per module; every rewrite works on a deep copy of that graph.
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import DynamicCache

import graphpeft
from graphpeft.cli import commands as cli
from graphpeft.engine.capture import CAPTURE_META
from graphpeft.engine.errors import GraphPeftError, NoMatchError
from graphpeft.passes import PrefixTuningPass
from tests.grid_models import tiny_bloom, tiny_deberta_v2
from tests.models import MLP, TinySdpaLM, inputs_for, tiny_bart, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_roberta_cls

ATOL = 1e-5
V = 3
PREFIX = "prompt_encoder.default."

BUILDERS = {
    "llama": lambda: tiny_llama(num_key_value_heads=2),                       # grouped-query: 4 heads, 2 kv heads
    "llama_eager": lambda: tiny_llama(num_key_value_heads=2, attn_implementation="eager"),
    "gpt2": tiny_gpt2,
    "bart": lambda: tiny_bart(encoder_layers=3, decoder_layers=3),             # 3 layers: PEFT's rows wrap modulo 2L
    "bert": lambda: tiny_bert_cls(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "bert_eager": lambda: tiny_bert_cls(attn_implementation="eager", hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0),
    "roberta": lambda: tiny_roberta_cls(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "bloom": tiny_bloom,                                                        # 3-D scores: baddbmm(alibi, q, k)
    # 3-D disentangled attention, at a larger init scale: at 0.02 its position terms move the logits by ~1e-5
    # and a prefix that missed the position-to-content term would pass
    "deberta_v2": lambda: tiny_deberta_v2(initializer_range=0.3),
}
TASKS = {"bart": "SEQ_2_SEQ_LM", "bert": "SEQ_CLS", "bert_eager": "SEQ_CLS", "roberta": "SEQ_CLS",
         "deberta_v2": "SEQ_CLS"}


def _batch(name: str, model) -> dict:
    batch = inputs_for(model, batch=3, seq=7, pad=2)            # row 0: the last 2 positions are padding
    batch["attention_mask"][1, :2] = 0                           # row 1: left padding
    if name == "bart":
        batch["decoder_attention_mask"] = torch.ones_like(batch["decoder_input_ids"])
        batch["decoder_attention_mask"][2, -3:] = 0
    if name.startswith("bert"):
        batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        batch["token_type_ids"][:, 4:] = 1
    return batch


_CAPTURED: dict[str, tuple] = {}


def _captured(name: str):
    """(model, captured graph, batch) of one architecture, built and captured once."""
    if name not in _CAPTURED:
        model = BUILDERS[name]()
        batch = _batch(name, model)
        _CAPTURED[name] = (model, graphpeft.capture(model, dict(batch)), batch)
    return _CAPTURED[name]


def _rewrite(name: str, **fields):
    model, gm, batch = _captured(name)
    config = graphpeft.PrefixTuningConfig(task_type=TASKS.get(name, "CAUSAL_LM"), num_virtual_tokens=V, **fields)
    return graphpeft.rewrite(copy.deepcopy(gm), config).eval()


def _peft(name: str, **fields):
    model, _, _ = _captured(name)
    torch.manual_seed(1)
    config = peft.PrefixTuningConfig(task_type=TASKS.get(name, "CAUSAL_LM"), num_virtual_tokens=V, **fields)
    return peft.get_peft_model(copy.deepcopy(model), config).eval()


def _copy_encoder(src: torch.nn.Module, dst: graphpeft.GraphPeftModel) -> None:
    """The prefix encoder's parameters of a PEFT model into a graphpeft model (PEFT's names)."""
    theirs = dict(src.prompt_encoder["default"].named_parameters())
    ours = {k[len(PREFIX):]: p for k, p in dst.graph_module.named_parameters() if k.startswith(PREFIX)}
    assert ours.keys() == theirs.keys()
    with torch.no_grad():
        for key, param in ours.items():
            param.copy_(theirs[key])


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


# -- PEFT as the oracle: llama (GQA, SDPA and eager), gpt2, bart, bloom -------------------------------------
# bloom: PEFT hands it the prefix as its past (key positions 0..V-1) and the mask with V ones in front, from
# which BLOOM builds its ALiBi bias; the padded rows check the bias positions as well as the mask

ORACLE = [(n, p) for n in ("llama", "llama_eager", "gpt2", "bart", "bloom") for p in (False, True)]


@pytest.mark.parametrize("name,projection", ORACLE)
def test_same_outputs_as_peft_on_the_same_weights(name, projection):
    model, _, batch = _captured(name)
    pm = _peft(name, prefix_projection=projection)
    gm = _rewrite(name, prefix_projection=projection)
    _copy_encoder(pm, gm)
    want, got = pm(**batch).logits, gm(**batch).logits
    assert got.shape == want.shape == model(**batch).logits.shape
    assert not torch.allclose(want, model(**batch).logits, atol=1e-3), "the prefix must change the outputs"
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    resolved = pm.peft_config["default"]
    for field in ("num_layers", "token_dim", "num_attention_heads", "encoder_hidden_size",
                  "num_transformer_submodules"):
        assert gm.records[0].info[field] == getattr(resolved, field), field


@pytest.mark.parametrize("name", ["llama", "gpt2", "bloom"])
def test_causal_lm_loss_matches_peft(name):
    _, _, batch = _captured(name)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    pm, gm = _peft(name), _rewrite(name)
    _copy_encoder(pm, gm)
    torch.testing.assert_close(gm(**batch, labels=labels).loss, pm(**batch, labels=labels).loss, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name,projection", ORACLE)
def test_peft_adapter_loads_into_graphpeft(name, projection, tmp_path):
    model, gm0, batch = _captured(name)
    pm = _peft(name, prefix_projection=projection)
    pm.save_pretrained(tmp_path)
    gm = graphpeft.from_pretrained(copy.deepcopy(gm0), tmp_path)
    assert not any(p.requires_grad for p in gm.parameters()), "loaded for inference, as PEFT does"
    torch.testing.assert_close(gm(**batch).logits, pm(**batch).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name,projection", ORACLE)
def test_graphpeft_adapter_loads_into_peft(name, projection, tmp_path):
    model, _, batch = _captured(name)
    gm = _rewrite(name, prefix_projection=projection)
    gm.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    info = gm.records[0].info
    assert list(saved) == ["prompt_embeddings"]
    assert saved["prompt_embeddings"].shape == (V, 2 * info["num_layers"] * info["token_dim"])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_layers"] == info["num_layers"]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    torch.testing.assert_close(pm(**batch).logits, gm(**batch).logits, atol=ATOL, rtol=0)


# -- beyond PEFT -----------------------------------------------------------------------------------------

def _transformers_cache_logits(name: str, table: torch.Tensor) -> torch.Tensor:
    """PEFT's SEQ_CLS prefix path (backbone with a cache of the prefix, then the head), with the cache passed
    under its transformers-5 name ``cache``: the name change is why PEFT refuses these models."""
    model, _, batch = _captured(name)
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    prefix = table.view(V, 2 * layers, heads, -1).permute(1, 2, 0, 3).unsqueeze(1).expand(-1, 3, -1, -1, -1)
    cache = DynamicCache([(prefix[2 * i], prefix[2 * i + 1]) for i in range(layers)])
    mask = torch.cat([torch.ones(3, V, dtype=torch.long), batch["attention_mask"]], 1)
    inputs = {k: v for k, v in batch.items() if k != "attention_mask"}
    if name == "roberta":
        return model.classifier(model.roberta(**inputs, attention_mask=mask, cache=cache).last_hidden_state)
    return model.classifier(model.dropout(model.bert(**inputs, attention_mask=mask, cache=cache).pooler_output))


@pytest.mark.parametrize("name", ["bert", "bert_eager", "roberta"])
def test_bert_and_roberta_match_the_transformers_cache_path(name):
    model, _, batch = _captured(name)
    with pytest.raises(ValueError, match="past key values"):
        _peft(name)(**batch)
    gm = _rewrite(name)
    table = dict(gm.graph_module.named_parameters())[PREFIX + "embedding.weight"].detach()
    got = gm(**batch).logits
    assert not torch.allclose(got, model(**batch).logits, atol=1e-4)
    torch.testing.assert_close(got, _transformers_cache_logits(name, table), atol=ATOL, rtol=0)


def _reference_sdpa_lm(model: TinySdpaLM, ids: torch.Tensor, mask: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """TinySdpaLM with a key/value prefix written out by hand: positions V.., keys cat(prefix, k), mask cat(1, mask)."""
    b, n = ids.shape
    layers, heads = len(model.blocks), model.blocks[0].heads
    prefix = table.view(V, 2 * layers, heads, -1).permute(1, 2, 0, 3)
    h = model.embed(ids) + model.pos(torch.arange(V, V + n))
    seen = torch.ones(n, V + n, dtype=torch.bool).tril(diagonal=V)
    attend = seen[None, None] & torch.cat([torch.ones(b, V, dtype=torch.bool), mask.bool()], 1)[:, None, None, :]
    for i, block in enumerate(model.blocks):
        d = h.shape[-1]
        q, k, v = block.qkv(block.norm1(h)).view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        k = torch.cat([prefix[2 * i].expand(b, -1, -1, -1), k], 2)
        v = torch.cat([prefix[2 * i + 1].expand(b, -1, -1, -1), v], 2)
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attend)
        h = h + block.proj(att.transpose(1, 2).reshape(b, n, d))
        h = h + block.fc2(torch.nn.functional.gelu(block.fc1(block.norm2(h))))
    return model.head(model.norm(h))


def test_custom_sdpa_model_without_past_key_values_matches_a_hand_written_reference():
    model = TinySdpaLM()
    gm = graphpeft.rewrite(model, graphpeft.PrefixTuningConfig(num_virtual_tokens=V),
                           example_inputs=TinySdpaLM.example()).eval()
    batch = TinySdpaLM.example(batch=3, seq=7, seed=1)
    batch["attention_mask"][0, -2:] = 0
    table = dict(gm.graph_module.named_parameters())[PREFIX + "embedding.weight"].detach()
    got = gm(**batch)
    assert got.shape == (3, 7, model.head.out_features)
    torch.testing.assert_close(got, _reference_sdpa_lm(model, batch["input_ids"], batch["attention_mask"], table),
                               atol=ATOL, rtol=0)


def test_given_position_ids_are_offset_as_peft_does():
    model, _, batch = _captured("llama")
    batch = {**batch, "position_ids": (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)}
    config = graphpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=V)
    gm = graphpeft.rewrite(copy.deepcopy(model), config, example_inputs=dict(batch)).eval()
    pm = _peft("llama")
    _copy_encoder(pm, gm)
    torch.testing.assert_close(gm(**batch).logits, pm(**batch).logits, atol=ATOL, rtol=0)


def test_inputs_embeds_as_the_sequence_input():
    model, _, batch = _captured("llama")
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
    batch = {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"]}
    config = graphpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=V)
    gm = graphpeft.rewrite(copy.deepcopy(model), config, example_inputs=dict(batch)).eval()
    pm = _peft("llama")
    _copy_encoder(pm, gm)
    torch.testing.assert_close(gm(**batch).logits, pm(**batch).logits, atol=ATOL, rtol=0)


def test_decoder_classifier_pooling_by_index_matches_the_transformers_cache_path():
    """LlamaForSequenceClassification picks the last non-pad token by index (PEFT refuses it too)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                                       pad_token_id=0, num_labels=3)).eval()
    batch = inputs_for(model, batch=3, seq=7)
    batch["input_ids"][0, -2:], batch["attention_mask"][0, -2:] = 0, 0
    gm = graphpeft.rewrite(model, graphpeft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=V)).eval()
    table = dict(gm.graph_module.named_parameters())[PREFIX + "embedding.weight"].detach()
    prefix = table.view(V, 4, 2, 8).permute(1, 2, 0, 3).unsqueeze(1).expand(-1, 3, -1, -1, -1)
    cache = DynamicCache([(prefix[0], prefix[1]), (prefix[2], prefix[3])])
    mask = torch.cat([torch.ones(3, V, dtype=torch.long), batch["attention_mask"]], 1)
    want = model(input_ids=batch["input_ids"], attention_mask=mask, cache=cache).logits
    assert not torch.allclose(want, model(**batch).logits, atol=1e-3)
    torch.testing.assert_close(gm(**batch).logits, want, atol=ATOL, rtol=0)


def test_grouped_query_heads_read_off_the_graph_without_a_model_config():
    """With no Hugging Face config, the key/value heads come from the repeat_kv in front of the site."""
    model, gm0, batch = _captured("llama")
    bare = copy.deepcopy(gm0)
    bare.meta[CAPTURE_META] = copy.copy(bare.meta[CAPTURE_META])
    bare.meta[CAPTURE_META].hf_config = None
    gm = graphpeft.rewrite(bare, graphpeft.PrefixTuningConfig(num_virtual_tokens=V)).eval()
    info = gm.records[0].info
    assert (info["num_attention_heads"], info["token_dim"], info["num_layers"]) == (2, 16, 2)
    pm = _peft("llama")
    _copy_encoder(pm, gm)
    torch.testing.assert_close(gm(**batch).logits, pm(**batch).logits, atol=ATOL, rtol=0)


# -- 3-D attention sites: batch and heads folded, [B*H, S, d] ------------------------------------------

def _table(gm: graphpeft.GraphPeftModel, tmp_path) -> torch.Tensor:
    """The [V, 2L*T] prefix table the adapter file holds (the projection's output with prefix_projection)."""
    gm.save_pretrained(tmp_path)
    return load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"]


def test_bloom_sites_are_the_folded_ones():
    gm = _rewrite("bloom")
    sites = [r for r in gm.records if "layer" in r.info]
    assert [r.info["folded_heads"] for r in sites] == [4, 4]
    assert [r.module_path for r in sites] == ["transformer.h.0.self_attention", "transformer.h.1.self_attention"]


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


def test_deberta_v2_adapter_reloads(tmp_path):
    _, gm0, batch = _captured("deberta_v2")
    gm = _rewrite("deberta_v2")
    gm.save_pretrained(tmp_path)
    loaded = graphpeft.from_pretrained(copy.deepcopy(gm0), tmp_path)
    torch.testing.assert_close(loaded(**batch).logits, gm(**batch).logits, atol=ATOL, rtol=0)


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


# -- training --------------------------------------------------------------------------------------------

def _train(gm, batch, labels, steps=12, lr=5e-2):
    before = {k: p.detach().clone() for k, p in gm.named_parameters()}
    gm.train()
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = gm(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    moved = {k for k, p in gm.named_parameters() if not torch.equal(p.detach(), before[k])}
    return losses, moved


@pytest.mark.parametrize("projection", [False, True])
def test_training_moves_only_the_prefix_and_the_loss_falls(projection):
    _, _, batch = _captured("llama")
    torch.manual_seed(0)            # the prefix's random init: the same whichever tests ran before
    gm = _rewrite("llama", prefix_projection=projection)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    losses, moved = _train(gm, batch, labels)
    assert losses[-1] < losses[0] - 0.1, losses
    expected = {"graph_module." + PREFIX + leaf for leaf in
                (["embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight",
                  "transform.2.bias"] if projection else ["embedding.weight"])}
    assert moved == expected


@pytest.mark.parametrize("name", ["bert", "deberta_v2"])
def test_sequence_classification_beyond_peft_trains_prefix_and_head_only(name):
    _, _, batch = _captured(name)
    torch.manual_seed(0)
    gm = _rewrite(name)
    losses, moved = _train(gm, batch, torch.tensor([0, 1, 1]))
    assert losses[-1] < losses[0] - 0.1, losses
    assert moved and all(".prompt_encoder." in k or ".classifier." in k for k in moved), moved
    assert any(".prompt_encoder." in k for k in moved)


# -- engine contract -------------------------------------------------------------------------------------

def test_not_mergeable_disable_gives_the_base_model_and_a_second_application_changes_nothing():
    model, _, batch = _captured("gpt2")
    gm = _rewrite("gpt2")
    with pytest.raises(GraphPeftError, match="cannot be merged"):
        gm.merge_and_unload()
    with gm.disable_adapter():
        torch.testing.assert_close(gm(**batch).logits, model(**batch).logits, atol=ATOL, rtol=0)
    config = graphpeft.PrefixTuningConfig(num_virtual_tokens=V)
    result = PrefixTuningPass(config)(gm.graph_module)
    assert not result.modified and not result.records


def test_trainable_load_of_a_projected_adapter_is_refused(tmp_path):
    _, gm0, _ = _captured("gpt2")
    _rewrite("gpt2", prefix_projection=True).save_pretrained(tmp_path)
    with pytest.raises(GraphPeftError, match="prompt_embeddings"):
        graphpeft.from_pretrained(copy.deepcopy(gm0), tmp_path, is_trainable=True)


# -- bad input -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0, -2, None, True, 1.5])
def test_bad_num_virtual_tokens_is_a_one_line_error(value):
    with pytest.raises(GraphPeftError, match="num_virtual_tokens") as err:
        graphpeft.PrefixTuningConfig(num_virtual_tokens=value)
    assert "\n" not in str(err.value)


class _NoAttention(torch.nn.Module):
    """Token ids in, logits out, and no attention in between."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(100, 16), torch.nn.Linear(16, 100)

    def forward(self, input_ids):
        return self.head(self.embed(input_ids))


def test_model_without_attention_is_a_one_line_error():
    ids = torch.randint(0, 100, (2, 5))
    with pytest.raises(NoMatchError, match="no attention site") as err:
        graphpeft.rewrite(_NoAttention(), graphpeft.PrefixTuningConfig(num_virtual_tokens=V), example_inputs=(ids,))
    assert "\n" not in str(err.value)
    with pytest.raises(GraphPeftError, match="no token sequence input"):
        graphpeft.rewrite(MLP(), graphpeft.PrefixTuningConfig(num_virtual_tokens=V),
                          example_inputs=(torch.randn(2, 5, 16),))


def test_sizes_that_do_not_fit_the_graph_are_refused():
    _, gm0, _ = _captured("gpt2")
    with pytest.raises(GraphPeftError, match="does not fit the attention sites"):
        graphpeft.rewrite(copy.deepcopy(gm0), graphpeft.PrefixTuningConfig(num_virtual_tokens=V, token_dim=24))
    with pytest.raises(GraphPeftError, match="num_layers=1"):
        graphpeft.rewrite(copy.deepcopy(gm0), graphpeft.PrefixTuningConfig(num_virtual_tokens=V, num_layers=1))


def test_cli_rewrite(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["rewrite", str(tiny_llama_dir), "--method", "prefix_tuning", "--num-virtual-tokens", "4",
                     "--prefix-projection", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING"
    assert (config["num_virtual_tokens"], config["prefix_projection"], config["num_layers"]) == (4, True, 2)
    assert load_file(out / "adapter_model.safetensors")["prompt_embeddings"].shape == (4, 2 * 2 * 32)
    capsys.readouterr()
    for bad in (["--num-virtual-tokens", "0"], []):
        code = cli.main(["rewrite", str(tiny_llama_dir), "--method", "prefix_tuning", *bad,
                         "-o", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "num_virtual_tokens" in err, err
        assert not (tmp_path / "bad").exists()
