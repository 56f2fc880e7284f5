"""Prefix Tuning / P-Tuning v2: a learned key and value prefix at every attention site, with PEFT's semantics.

Maths (PEFT's PrefixEncoder and its past_key_values path). V virtual tokens, L layers, h key/value
heads of size d, token_dim T = h * d:

    P = E                                      E [V, 2L*T]                  (prefix_projection=False)
    P = W2 tanh(W1 E + b1) + b2                E [V, T], W1 [H', T], W2 [2L*T, H']   (prefix_projection=True)
    P -> view [V, 2L, h, d] -> permute -> [2L, h, V, d]
    attention site j (graph order) reads row 2j as its key prefix and row 2j+1 as its value prefix
    (num_transformer_submodules=2, encoder-decoders: rows 4j and 4j+1 modulo 2L, PEFT's cache layout)

    attention(q, k, v)   ->   attention(q, cat(P_k, k), cat(P_v, v))    on the sequence axis
    attention_mask       ->   cat(ones(B, V), attention_mask)
    positions 0..L-1     ->   V..V+L-1     (RoPE, learned or absolute positions, the causal mask)

    before:  input_ids ────────────────── (model) ─ k ─────────────────────────┬─ sdpa ─ ... ─ logits [B, L, .]
                                          (model) ─ v ─────────────────────────┘
    after:   input_ids ─ cat(fill*V, ·) ─ (model) ─ k[:, :, V:] ─ cat(P_k, ·) ─┬─ sdpa ─ ... ─ logits[:, V:]
                                          (model) ─ v[:, :, V:] ─ cat(P_v, ·) ─┘
             E ─ [linear ─ tanh ─ linear] ─ view ─ permute ─ P ─ select(row) ─ expand(B) ─ (P_k, P_v)

The engine does the graph work with no cache API and no model code: V filler positions prepended to the
sequence inputs, dropped at the outputs, first-token pooling shifted (graphpeft/engine/filler_positions.py); the
sites' heads, grouped-query repetition and 3-D [B*H, S, d] folds (BLOOM, DeBERTa-v2) read off the graph
(graphpeft/engine/attention_shapes.py); the fillers' keys and values replaced by the prefix at each site
(graphpeft/engine/kv_prepend.py); the table, its sizes and rows, one block per layer at its own width where the
sites' widths differ (Swin's stages: table [V, 2 * sum_j T_j], prefix_projection refused), in
graphpeft/engine/past_key_values.py. A model with no token input (a vision transformer) gets no fillers: each
4-D site takes the prefix in front of its keys and values and its mask V attended columns; causal SDPA
is refused there.

Decoder self-attention sites get the prefix; cross-attention and encoder sites, whose keys do not come
from the extended sequence, do not (PEFT 0.21.2 discards the cross-attention cache it builds). The V
extra positions cost compute in every layer; in exchange positions and masks come out right for any model.

Parameters live at PEFT's in-memory names (``prompt_encoder.<adapter>.embedding.weight``,
``...transform.0.weight`` ...). The file holds ``prompt_embeddings`` [V, 2L*T]: the table, or with
``prefix_projection`` the encoder's output (the table itself once loaded for inference), as PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from graphpeft.engine.attention_shapes import folded_key, four_d, refuse_causal, site_shape, three_d
from graphpeft.engine.config import AdapterConfig
from graphpeft.engine.errors import GraphPeftError, NoMatchError
from graphpeft.engine.filler_positions import (SequenceEntry, downstream, extend_entry, filler, first_computation,
                                        main_input, pooling_ops, sequence_dim, sequence_outputs)
from graphpeft.engine.kv_prepend import PrefixSite, prepend_kv
from graphpeft.engine.match import attention_sites, module_stack_entry
from graphpeft.engine.past_key_values import (PrefixDims, init_encoder, model_sizes, prefix_row, resolve_dims,
                                       table_node, table_rows)
from graphpeft.engine.registry import register_method, register_rule
from graphpeft.engine.result import Rewrite
from graphpeft.engine.rewriter import Rewriter, get_attr_path, was_rewritten
from graphpeft.engine.rule import Rule, RulePass
from graphpeft.engine.sequence import sequence_inputs

ENCODER_KIND = "prefix"
SAVED_KEY = "prompt_embeddings"
_RESOLVED = ("num_layers", "token_dim", "num_attention_heads", "encoder_hidden_size", "num_transformer_submodules")


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass
class PrefixTuningConfig(AdapterConfig):
    """PEFT's PrefixTuningConfig fields and defaults. Sizes left None are read off the model, as PEFT does
    from the model config, and from the graph where the config has no such field."""

    peft_type = "PREFIX_TUNING"

    num_virtual_tokens: Optional[int] = field(default=None, metadata={"cli": "--num-virtual-tokens",
                                                                      "help": "prefix length V (required)"})
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    modules_to_save: Optional[list[str]] = None
    init_weights: Optional[str] = None
    encoder_hidden_size: Optional[int] = field(default=None, metadata={
        "cli": "--encoder-hidden-size", "help": "hidden size of the prefix projection (default: token_dim)"})
    prefix_projection: bool = field(default=False, metadata={
        "cli": "--prefix-projection",
        "help": "produce the prefix with a two-layer MLP (P-Tuning v2 reparametrisation)"})

    def validate(self) -> None:
        if self.num_virtual_tokens is None:
            raise GraphPeftError("num_virtual_tokens is required for prefix tuning (PEFT has no default); "
                                 "pass e.g. num_virtual_tokens=20 (--num-virtual-tokens 20)")
        if not _positive(self.num_virtual_tokens):
            raise GraphPeftError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        for name in ("token_dim", "num_attention_heads", "num_layers", "encoder_hidden_size"):
            value = getattr(self, name)
            if value is not None and not _positive(value):
                raise GraphPeftError(f"{name} must be a positive integer or None (read from the model), got {value!r}")
        if self.num_transformer_submodules not in (None, 1, 2):
            raise GraphPeftError(f"num_transformer_submodules must be 1, 2 or None, "
                                 f"got {self.num_transformer_submodules!r}")
        if self.init_weights not in (None, "zero"):
            raise GraphPeftError(f"init_weights must be None (random) or 'zero', got {self.init_weights!r}")
        if self.token_dim and self.num_attention_heads and self.token_dim % self.num_attention_heads:
            raise GraphPeftError(f"token_dim={self.token_dim} is not a multiple of num_attention_heads="
                                 f"{self.num_attention_heads}")


@register_rule
class PrefixTuningRule(Rule):
    __doc__ = __doc__
    name = "prefix_tuning"
    mergeable = False

    def __init__(self, config: Any, adapter_name: str = "default"):
        super().__init__(config, adapter_name)
        self._prefix: Optional[fx.Node] = None       # the [2L, h, V, d] node ([V, width]: mixed widths)
        self._dims: Optional[PrefixDims] = None       # both made by the entry rewrite

    # -- pattern ---------------------------------------------------------------------------------
    def sites(self, gm: fx.GraphModule) -> list[Any]:
        main = main_input(gm)
        if main is None:
            return self._sites_without_tokens(gm)
        if was_rewritten(main, self.name, self.adapter_name):
            return [SequenceEntry(main)]             # applied before: nothing is fresh, nothing changes
        seq = sequence_dim(main, who=self.name)
        inputs = tuple(sequence_inputs(gm, str(main.target)))
        for node in inputs:
            if str(node.target).endswith("labels"):
                raise GraphPeftError(f"prefix_tuning: the graph was captured with {node.target} as an input; "
                                     f"capture without labels (the loss is computed from the logits)")
        found = attention_sites(gm)
        if not found:
            raise NoMatchError("prefix_tuning: the graph has no attention site (scaled_dot_product_attention or "
                               "matmul-softmax-matmul); prefix tuning puts its prefix into attention keys and values")
        reach = downstream(inputs)
        taken = [a for a in found if a.key in reach and a.value in reach]
        if not taken:
            raise NoMatchError(f"prefix_tuning: none of the {len(found)} attention sites reads the sequence of "
                               f"{main.target}; there is nothing to put a prefix in front of")
        batch = main.meta["val"].shape[0]
        shapes = [site_shape(a, seq, batch, who=self.name) for a in taken]
        dims = self._resolve(gm, main, shapes, len(taken))
        sites: list[Any] = []
        for j, (att, (heads, head_dim, _)) in enumerate(zip(taken, shapes)):
            key_row, value_row = dims.rows(j)
            path = module_stack_entry(att.node)[0] or att.node.name
            folded = folded_key(att, seq, head_dim, who=self.name) if three_d(att) else None
            sites.append(PrefixSite(att, path, j, key_row, value_row, heads // dims.layer_heads(j)[0],
                                    folded_key=folded, heads=heads if folded is not None else 0))
        ids_reach = downstream([n for n in inputs if "mask" not in str(n.target)])
        entry = SequenceEntry(main, f"prompt_encoder.{self.adapter_name}", inputs, filler(gm, main), dims,
                              pooling_ops(gm, ids_reach, seq), sequence_outputs(gm, ids_reach, seq))
        return [entry, *sites]

    def _sites_without_tokens(self, gm: fx.GraphModule) -> list[Any]:
        """A model that reads no token sequence (a vision transformer's pixel_values): every attention site
        with 4-D queries, keys and values (the layers; not e.g. a pooling head's nn.MultiheadAttention)
        gets the prefix in front of its keys and values, with no filler positions (queries, outputs and
        pooling keep their length), and its mask gets V attended columns in front."""
        found = attention_sites(gm)
        if not found:
            raise NoMatchError("prefix_tuning: the graph has no token sequence input (input_ids, decoder_input_ids "
                               "or inputs_embeds) and no attention site (scaled_dot_product_attention or "
                               "matmul-softmax-matmul); prefix tuning puts its prefix into attention keys and values")
        anchor = found[0].node
        if was_rewritten(anchor, self.name, self.adapter_name):
            return [SequenceEntry(anchor)]           # applied before: nothing is fresh, nothing changes
        usable = [att for att in found if four_d(att)]      # e.g. not a pooling head's nn.MultiheadAttention
        if not usable:
            site_shape(found[0], None, who=self.name)       # raises, naming the site
        found = usable
        for att in found:
            refuse_causal(att, who=self.name)
        shapes = [site_shape(att, None, who=self.name) for att in found]
        dims = self._resolve(gm, anchor, shapes, len(found))
        sites: list[Any] = [SequenceEntry(anchor, f"prompt_encoder.{self.adapter_name}", dims=dims)]
        for j, (att, (heads, _, _)) in enumerate(zip(found, shapes)):
            key_row, value_row = dims.rows(j)
            path = module_stack_entry(att.node)[0] or att.node.name
            sites.append(PrefixSite(att, path, j, key_row, value_row, heads // dims.layer_heads(j)[0], False))
        return sites

    def _resolve(self, gm: fx.GraphModule, main: fx.Node, shapes: list[tuple[int, int, int]],
                 n_sites: int) -> PrefixDims:
        """Config sizes, else the model config's (PEFT's rules, grouped-query heads included), else the graph's."""
        return resolve_dims(self.config, model_sizes(gm), main, shapes, n_sites, who=self.name)

    # -- rewrite ---------------------------------------------------------------------------------
    def rewrite(self, gm: fx.GraphModule, site: Any) -> Rewrite:
        if isinstance(site, SequenceEntry):
            return self._rewrite_entry(gm, site)
        return self._rewrite_attention(gm, site)

    def _rewrite_entry(self, gm: fx.GraphModule, entry: SequenceEntry) -> Rewrite:
        cfg, dims, n = self.config, entry.dims, entry.dims.num_virtual_tokens
        rw = Rewriter(gm, self.name, entry.node, entry.module_path, ENCODER_KIND, adapter=self.adapter_name)
        project = cfg.prefix_projection and not cfg.inference_mode
        params = init_encoder(dims, project, cfg.init_weights, _device(gm))
        attrs = {}
        for leaf, tensor in params.items():
            saved = SAVED_KEY if leaf == "embedding.weight" and not project else None
            attrs[leaf] = rw.add_parameter(f"{entry.module_path}.{leaf}", tensor, saved)
        rw.start_before(first_computation(gm))          # the prefix, once, at the graph entry
        self._dims, self._prefix = dims, table_node(rw, attrs, project, dims)
        extend_entry(rw, gm, entry, n)
        resolved = {k: getattr(dims, k) for k in _RESOLVED}
        if dims.widths:     # no one token_dim: the sizes are read off the graph again when the file is loaded
            resolved = {k: v for k, v in resolved.items()
                        if k not in ("token_dim", "num_attention_heads", "encoder_hidden_size")}
            resolved["layer_widths"] = [list(w) for w in dims.widths]
        return rw.record(**{"num_virtual_tokens": n, "prefix_projection": bool(project), **resolved})

    def _rewrite_attention(self, gm: fx.GraphModule, site: PrefixSite) -> Rewrite:
        if self._prefix is None:
            raise GraphPeftError("prefix_tuning: an attention site came before the sequence entry (internal order)")
        att = site.attention
        rw = Rewriter(gm, self.name, att.node, site.module_path, att.kind, adapter=self.adapter_name)
        prepend_kv(rw, site, lambda r, row: prefix_row(r, self._prefix, self._dims, row),
                   self.config.num_virtual_tokens, who=self.name)
        folded = {"folded_heads": site.heads} if site.folded_key is not None else {}
        return rw.record(layer=site.layer, key_row=site.key_row, value_row=site.value_row, repeat=site.repeat,
                         **folded)

    # -- what the engine asks after rewriting ---------------------------------------------------------
    @classmethod
    def cache_prefix(cls, gm: fx.GraphModule, records: list[Rewrite]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """{attention site j: (key prefix, value prefix)}, each [h, V, d]: what the V filler positions of a
        KV cache must hold once a prefill through the rewritten graph has filled it (PEFT's past_key_values).

        The graph replaces the fillers' keys and values at the attention sites only; the cache a model
        writes before its attention still holds the fillers' own. Generation overwrites them with these,
        so the decode steps (the base graph, reading the cache) see the prefix.
        """
        entry = next((r for r in records if r.kind == ENCODER_KIND), None)
        if entry is None:
            return {}
        rows = table_rows(prompt_embeddings(gm, entry).detach(), entry.info)
        return {int(r.info["layer"]): (rows[int(r.info["key_row"])], rows[int(r.info["value_row"])])
                for r in records if r.kind != ENCODER_KIND and "layer" in r.info}

    @classmethod
    def saved_config(cls, data: dict[str, Any], records: list[Rewrite]) -> dict[str, Any]:
        """The sizes read off the model are written out, as PEFT writes its resolved config."""
        entry = next((r for r in records if r.kind == ENCODER_KIND), None)
        if entry is None:
            return data
        return {**data, **{k: entry.info[k] for k in _RESOLVED if data.get(k) is None and k in entry.info}}


def _device(gm: fx.GraphModule) -> torch.device:
    return next((p.device for p in gm.parameters()), torch.device("cpu"))


def prompt_embeddings(gm: fx.GraphModule, record: Rewrite) -> torch.Tensor:
    """What PEFT saves as ``prompt_embeddings``: the encoder's output [V, 2L*T] for the record's parameters."""
    params = {attr[len(record.module_path) + 1:]: get_attr_path(gm, attr) for attr in record.params}
    out = params["embedding.weight"]
    if "transform.0.weight" in params:
        out = torch.tanh(nn.functional.linear(out, params["transform.0.weight"], params["transform.0.bias"]))
        out = nn.functional.linear(out, params["transform.2.weight"], params["transform.2.bias"])
    return out


class PrefixTuningPass(RulePass):
    """torch.fx pass: ``PrefixTuningPass(PrefixTuningConfig(num_virtual_tokens=20))(graph_module) -> PassResult``."""

    rule_cls = PrefixTuningRule

    @staticmethod
    def saved_state(model: Any, adapter_name: str, config: PrefixTuningConfig,
                    state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """With a trainable projection the file holds its output, as PEFT's get_prompt_embedding_to_save."""
        entry = next((r for r in model.records if r.rule == PrefixTuningRule.name and r.adapter == adapter_name
                      and r.kind == ENCODER_KIND), None)
        if entry is None or SAVED_KEY in state:
            return state
        with torch.no_grad():
            value = prompt_embeddings(model.graph_module, entry)
        return {**state, SAVED_KEY: value.detach().contiguous().cpu()}


register_method("prefix_tuning", PrefixTuningConfig, PrefixTuningPass,
                "learned key/value prefix at every attention site (PEFT prefix tuning / P-Tuning v2)")
