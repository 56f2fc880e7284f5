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

How the graph gets there without a cache API or any knowledge of the model: V filler positions are
prepended to the sequence inputs where they enter the graph (ids get a non-pad filler id, masks 1,
token types 0, given position ids 0 and +V), so every position, causal mask and padding mask the
model computes covers V+L positions with the real tokens at V..V+L-1, as with PEFT's past length V.
At each attention site the keys and values of the V filler positions are then replaced by the
prefix, so nothing of the fillers reaches a real token; graph outputs on the sequence axis drop
them, and a first-token pooling (select index 0 on the sequence axis, BERT's pooler) reads index V.

    before:  input_ids ────────────────── (model) ─ k ─────────────────────────┬─ sdpa ─ ... ─ logits [B, L, .]
                                          (model) ─ v ─────────────────────────┘
    after:   input_ids ─ cat(fill*V, ·) ─ (model) ─ k[:, :, V:] ─ cat(P_k, ·) ─┬─ sdpa ─ ... ─ logits[:, V:]
                                          (model) ─ v[:, :, V:] ─ cat(P_v, ·) ─┘
             E ─ [linear ─ tanh ─ linear] ─ view ─ permute ─ P ─ select(row) ─ expand(B) ─ (P_k, P_v)

Attention on 3-D keys and values with batch and heads folded into one axis, [B*H, S, d] (BLOOM scores with
baddbmm(alibi, q, k^T), DeBERTa-v2 with bmm plus its relative-position terms), takes the prefix the same way
with H read off the graph (the first axis over the input's batch size). The keys are replaced where they are
still [B*H, S, d], before any transpose, cast or scalar scaling, so every reader of them sees the prefix
(DeBERTa's position-to-content term as well as the scores); values at the site. ALiBi and relative positions
are computed by the model from the extended sequence, so they cover the prefix as positions 0..V-1, which is
what BLOOM builds from PEFT's extended mask with the prefix as its past.

    before:  k3 [B*H, S, d] ─ transpose ─ baddbmm(alibi, q, ·) ─ ... ─ softmax ─ bmm(·, v3)
    after:   k3 ─ view [B, H, S, d] ─ cat(P_k, ·[:, :, V:]) ─ view [B*H, S, d] ─ transpose ─ baddbmm ─ ...
             v3 ─ view [B, H, S, d] ─ cat(P_v, ·[:, :, V:]) ─ view [B*H, S, d] ──────────────────── bmm

Sites of different widths (Swin's stages double the width: more heads, or larger ones) get one prefix each at
their own width. The table is then [V, 2 * sum_j T_j], a row holding layer 0's key prefix (T_0 columns), its
value prefix, then layer 1's ... in layer order: PEFT's [V, 2L*T] layout when all T_j are equal, so it is PEFT's
layout generalised, not a new one. Sizes are read off the graph (no one token_dim; a given token_dim,
num_attention_heads or num_layers other than the site count is refused), and prefix_projection, whose PEFT form
embeds the V tokens at one token_dim, is refused on mixed widths. On Swin's window attention the attention batch
is batch * windows: the prefix is expanded over it, so every window's queries attend to the same prefix, and the
additive relative-position bias and shifted-window mask get V zero columns in front (no position, never masked):

    before:  k [B*nW, h_j, 16, d_j] ───────────────┬─ sdpa(q, ·, v, bias + mask)
    after:   k ─ cat(P_k expanded to B*nW, ·) ─────┴─ sdpa(q, ·, cat(P_v, v), pad(bias + mask, V zeros in front))
             E [V, 2 sum T] ─ slice(cols of row 2j) ─ view [V, h_j, d_j] ─ permute ─ P_k

Where keys arrive with their heads already repeated (grouped-query attention through repeat_kv) the
prefix, which has the key/value heads, is repeated the same way. Decoder self-attention sites get the
prefix; cross-attention and encoder sites, whose keys do not come from the extended sequence, do
not (PEFT 0.21.2 discards the cross-attention cache it builds). The V extra positions cost compute
in every layer; in exchange positions and masks come out right for any model with no model code.

Parameters live at PEFT's in-memory names (``prompt_encoder.<adapter>.embedding.weight``,
``...transform.0.weight`` ...). The file holds ``prompt_embeddings`` [V, 2L*T]: the table, or with
``prefix_projection`` the encoder's output (the table itself once loaded for inference), as PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import sympy
import torch
import torch.fx as fx
from torch import nn

from graphpeft.engine.capture import capture_info
from graphpeft.engine.config import AdapterConfig
from graphpeft.engine.errors import GraphPeftError, NoMatchError
from graphpeft.engine.match import AttentionSite, attention_sites, module_stack_entry
from graphpeft.engine.registry import register_method, register_rule
from graphpeft.engine.result import Rewrite
from graphpeft.engine.rewriter import Rewriter, get_attr_path, was_rewritten
from graphpeft.engine.rule import Rule, RulePass
from graphpeft.engine.sequence import placeholder, sequence_inputs

aten = torch.ops.aten
_INT_MAX = 9223372036854775807
ENCODER_KIND = "prefix"
SAVED_KEY = "prompt_embeddings"
_MAIN_INPUTS = ("decoder_input_ids", "decoder_inputs_embeds", "input_ids", "inputs_embeds")
_RESOLVED = ("num_layers", "token_dim", "num_attention_heads", "encoder_hidden_size", "num_transformer_submodules")
# ops between a projection and an attention site that repeat_kv (expand + reshape) is made of
_HEAD_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
               aten.unsqueeze.default, aten.slice.Tensor, aten.transpose.int, aten.clone.default,
               aten.contiguous.default, aten.alias.default}
# ops between folded [B*H, S, d] keys and a 3-D score op that change no key's position
_COPIES = {aten.clone.default, aten.contiguous.default, aten.alias.default}
_FOLDS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_KEY_LAYOUT = {aten.transpose.int, aten.clone.default, aten.contiguous.default, aten.alias.default, aten.to.dtype,
               aten._to_copy.default, aten.to.dtype_layout}


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


# -- sites ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PrefixDims:
    """The resolved sizes: what PEFT writes to adapter_config.json after reading the model."""

    num_virtual_tokens: int
    num_layers: int
    token_dim: int
    num_attention_heads: int
    encoder_hidden_size: int
    num_transformer_submodules: int
    widths: tuple[tuple[int, int], ...] = ()        # mixed widths: (key/value heads, head size) of each layer

    @property
    def head_dim(self) -> int:
        return self.token_dim // self.num_attention_heads

    @property
    def table_width(self) -> int:
        """Columns of the [V, .] table: every layer's key and value prefix, 2 * sum of the layers' widths."""
        if self.widths:
            return 2 * sum(h * d for h, d in self.widths)
        return 2 * self.num_layers * self.token_dim

    def layer_heads(self, layer: int) -> tuple[int, int]:
        """(key/value heads, head size) of the prefix of attention site ``layer``."""
        return self.widths[layer] if self.widths else (self.num_attention_heads, self.head_dim)

    def columns(self, row: int) -> tuple[int, int]:
        """Mixed widths: the [start, end) columns of prefix row ``row`` (2j keys, 2j+1 values of layer j) in
        the table row, which holds layer 0's keys and values, then layer 1's, ... each at its own width."""
        layer, width = row // 2, self.widths[row // 2][0] * self.widths[row // 2][1]
        start = 2 * sum(h * d for h, d in self.widths[:layer]) + (row % 2) * width
        return start, start + width

    def rows(self, layer: int) -> tuple[int, int]:
        """(key row, value row) of attention site ``layer`` in the [2L, ...] prefix: PEFT's cache layout."""
        row = (2 * self.num_transformer_submodules * layer) % (2 * self.num_layers)
        return row, row + 1


@dataclass(frozen=True)
class SequenceEntry:
    """Where the sequence enters the graph: the main input, the inputs on its axis, what reads positions."""

    node: fx.Node                                   # the main input (input_ids, or decoder_input_ids)
    module_path: str = ""
    inputs: tuple[fx.Node, ...] = ()
    filler: Any = 0
    dims: Optional[PrefixDims] = None
    pooling: tuple[fx.Node, ...] = ()               # select / slice ops on the sequence axis
    outputs: tuple[fx.Node, ...] = ()               # graph outputs laid out on the sequence axis


@dataclass(frozen=True)
class PrefixSite:
    """One attention site that reads the extended sequence: its prefix rows and head repetition."""

    attention: AttentionSite
    module_path: str
    layer: int
    key_row: int
    value_row: int
    repeat: int                                     # heads at the site / key-value heads of the prefix
    fillers: bool = True                            # keys and values carry V filler positions to replace
    folded_key: Optional[fx.Node] = None            # 3-D sites: the [B*H, S, d] keys every key reader reads
    heads: int = 0                                  # 3-D sites: the H folded into their first axis

    @property
    def node(self) -> fx.Node:
        return self.attention.node


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
        main = _main_input(gm)
        if main is None:
            return self._sites_without_tokens(gm)
        if was_rewritten(main, self.name, self.adapter_name):
            return [SequenceEntry(main)]             # applied before: nothing is fresh, nothing changes
        seq = _sequence_dim(main)
        inputs = tuple(sequence_inputs(gm, str(main.target)))
        for node in inputs:
            if str(node.target).endswith("labels"):
                raise GraphPeftError(f"prefix_tuning: the graph was captured with {node.target} as an input; "
                                     f"capture without labels (the loss is computed from the logits)")
        found = attention_sites(gm)
        if not found:
            raise NoMatchError("prefix_tuning: the graph has no attention site (scaled_dot_product_attention or "
                               "matmul-softmax-matmul); prefix tuning puts its prefix into attention keys and values")
        reach = _downstream(inputs)
        taken = [a for a in found if a.key in reach and a.value in reach]
        if not taken:
            raise NoMatchError(f"prefix_tuning: none of the {len(found)} attention sites reads the sequence of "
                               f"{main.target}; there is nothing to put a prefix in front of")
        batch = main.meta["val"].shape[0]
        shapes = [_site_shape(a, seq, batch) for a in taken]
        dims = self._resolve(gm, main, shapes, len(taken))
        sites: list[Any] = []
        for j, (att, (heads, head_dim, _)) in enumerate(zip(taken, shapes)):
            key_row, value_row = dims.rows(j)
            path = module_stack_entry(att.node)[0] or att.node.name
            folded = _folded_key(att, seq, head_dim) if _three_d(att) else None
            sites.append(PrefixSite(att, path, j, key_row, value_row, heads // dims.layer_heads(j)[0],
                                    folded_key=folded, heads=heads if folded is not None else 0))
        ids_reach = _downstream([n for n in inputs if "mask" not in str(n.target)])
        entry = SequenceEntry(main, f"prompt_encoder.{self.adapter_name}", inputs, _filler(gm, main), dims,
                              _pooling_ops(gm, ids_reach, seq), _sequence_outputs(gm, ids_reach, seq))
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
        usable = [att for att in found if _four_d(att)]     # e.g. not a pooling head's nn.MultiheadAttention
        if not usable:
            _site_shape(found[0], None)                     # raises, naming the site
        found = usable
        for att in found:
            _refuse_causal(att)
        shapes = [_site_shape(att, None) for att in found]
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
        cfg, model = self.config, _model_sizes(gm)
        if len({(s[2], s[1]) for s in shapes}) > 1:      # widths differ by layer (Swin's stages)
            return _mixed_dims(cfg, shapes)
        heads, token_dim = _head_sizes(cfg, model, shapes)
        nts = cfg.num_transformer_submodules
        if nts is None:     # PEFT: 2 for SEQ_2_SEQ_LM; with no task type, 2 when the decoder carries the prefix
            decoder = cfg.task_type is None and str(main.target).startswith("decoder_")
            nts = 2 if cfg.task_type == "SEQ_2_SEQ_LM" or decoder else 1
        layers = cfg.num_layers
        if layers is None:
            usable = model["num_layers"] and (nts == 2 or model["num_layers"] >= n_sites)
            layers = model["num_layers"] if usable else n_sites
        if nts == 1 and layers < n_sites:
            raise GraphPeftError(f"prefix_tuning: num_layers={layers} but the graph has {n_sites} attention sites "
                                 f"that read the sequence; set num_layers={n_sites} or leave it unset")
        return PrefixDims(cfg.num_virtual_tokens, layers, token_dim, heads, cfg.encoder_hidden_size or token_dim, nts)

    # -- rewrite ---------------------------------------------------------------------------------
    def rewrite(self, gm: fx.GraphModule, site: Any) -> Rewrite:
        if isinstance(site, SequenceEntry):
            return self._rewrite_entry(gm, site)
        return self._rewrite_attention(gm, site)

    def _rewrite_entry(self, gm: fx.GraphModule, entry: SequenceEntry) -> Rewrite:
        cfg, dims, n = self.config, entry.dims, entry.dims.num_virtual_tokens
        rw = Rewriter(gm, self.name, entry.node, entry.module_path, ENCODER_KIND, adapter=self.adapter_name)
        project = cfg.prefix_projection and not cfg.inference_mode
        params = _init_encoder(dims, project, cfg.init_weights, _device(gm))
        attrs = {}
        for leaf, tensor in params.items():
            saved = SAVED_KEY if leaf == "embedding.weight" and not project else None
            attrs[leaf] = rw.add_parameter(f"{entry.module_path}.{leaf}", tensor, saved)
        # the prefix, once, at the graph entry
        rw.start_before(_first_computation(gm))
        prefix = rw.get_param(attrs["embedding.weight"])
        if project:
            prefix = rw.call(aten.linear.default, prefix, rw.get_param(attrs["transform.0.weight"]),
                             rw.get_param(attrs["transform.0.bias"]))
            prefix = rw.call(aten.tanh.default, prefix)
            prefix = rw.call(aten.linear.default, prefix, rw.get_param(attrs["transform.2.weight"]),
                             rw.get_param(attrs["transform.2.bias"]))
        self._dims = dims
        if not dims.widths:
            prefix = rw.call(aten.view.default, prefix, [n, 2 * dims.num_layers, dims.num_attention_heads,
                                                         dims.head_dim])
            prefix = rw.call(aten.permute.default, prefix, [1, 2, 0, 3])
        self._prefix = prefix
        # V filler positions in front of every input on the sequence axis
        for node in entry.inputs:
            name = str(node.target)
            fill = 1 if "mask" in name else (entry.filler if node is entry.node else 0)
            _prepend(rw, node, n, fill, offset=n if name.endswith("position_ids") else 0)
        # first-token pooling reads the first real position; sequence outputs drop the fillers
        for op in entry.pooling:
            rw.start_before(op.next)
            moved = rw.call(op.target, *_shifted_args(op, n))
            rw.replace_uses(op, moved)
        output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
        rw.start_before(output)
        for node in entry.outputs:      # contiguous, as the model's own outputs are (losses .view them)
            kept = rw.call(aten.slice.Tensor, node, 1, n, _INT_MAX)
            rw.replace_input(output, node, rw.call(aten.clone.default, kept, memory_format=torch.contiguous_format))
        resolved = {k: getattr(dims, k) for k in _RESOLVED}
        if dims.widths:     # no one token_dim: the sizes are read off the graph again when the file is loaded
            resolved = {k: v for k, v in resolved.items()
                        if k not in ("token_dim", "num_attention_heads", "encoder_hidden_size")}
            resolved["layer_widths"] = [list(w) for w in dims.widths]
        return rw.record(**{"num_virtual_tokens": n, "prefix_projection": bool(project), **resolved})

    def _rewrite_attention(self, gm: fx.GraphModule, site: PrefixSite) -> Rewrite:
        if self._prefix is None:
            raise GraphPeftError("prefix_tuning: an attention site came before the sequence entry (internal order)")
        att, n = site.attention, self.config.num_virtual_tokens
        rw = Rewriter(gm, self.name, att.node, site.module_path, att.kind, adapter=self.adapter_name)
        if site.folded_key is not None:
            return self._rewrite_folded(rw, site, n)
        key_user = att.scores if att.kind == "eager" else att.node
        rw.start_before(key_user)
        drop = n if site.fillers else 0
        new_key = self._with_prefix(rw, att.key, site.key_row, site.repeat, drop, transposed=att.kind == "eager")
        rw.replace_input(key_user, att.key, new_key)
        if not site.fillers:
            _extend_masks(rw, att, n, site.module_path)
        rw.start_before(att.node)
        new_value = self._with_prefix(rw, att.value, site.value_row, site.repeat, drop, transposed=False)
        rw.replace_input(att.node, att.value, new_value)
        return rw.record(layer=site.layer, key_row=site.key_row, value_row=site.value_row, repeat=site.repeat)

    def _rewrite_folded(self, rw: Rewriter, site: PrefixSite, n: int) -> Rewrite:
        """A site on 3-D [B*H, S, d] keys and values (BLOOM's baddbmm with ALiBi, DeBERTa-v2's bmm): the keys
        every reader of the folded keys reads (the scores, and DeBERTa's position-to-content term) and the
        values get the prefix in place of their V filler positions, through the 4-D cat:

            k3 ─ reshape [B, H, S, d] ─ cat(P_k, ·[:, :, V:]) ─ reshape [B*H, S, d] ─┬─ transpose ─ baddbmm
                                                                                      └─ (other key readers)
        The additive bias (ALiBi) and the masks were computed from the extended sequence: they cover the
        prefix at positions 0..V-1 as the model's own past would be.
        """
        att, key = site.attention, site.folded_key
        rw.start_before(key.next)
        new_key = self._with_folded_prefix(rw, key, site, site.key_row, n)
        rw.replace_uses(key, new_key)
        rw.start_before(att.node)
        new_value = self._with_folded_prefix(rw, att.value, site, site.value_row, n)
        rw.replace_input(att.node, att.value, new_value)
        return rw.record(layer=site.layer, key_row=site.key_row, value_row=site.value_row, repeat=site.repeat,
                         folded_heads=site.heads)

    def _with_folded_prefix(self, rw: Rewriter, x: fx.Node, site: PrefixSite, row: int, n: int) -> fx.Node:
        """x [B*H, S, d] (batch-major fold) -> [B, H, S, d] -> prefix in place of the first n -> [B*H, S, d]."""
        head_dim = x.meta["val"].shape[2]
        unfolded = rw.call(aten.reshape.default, x, [-1, site.heads, rw.call(aten.sym_size.int, x, 1), head_dim])
        joined = self._with_prefix(rw, unfolded, row, site.repeat, n, transposed=False)
        return rw.call(aten.reshape.default, joined, [-1, rw.call(aten.sym_size.int, joined, 2), head_dim])

    def _with_prefix(self, rw: Rewriter, x: fx.Node, row: int, repeat: int, n: int, transposed: bool) -> fx.Node:
        """cat(prefix row, x without its first n positions) on x's sequence axis (n = 0: all of x).

        x is [B, H, S, d], or [B, H, d, S] for the key operand of eager attention (``transposed``).
        """
        p = self._prefix_row(rw, row)                                          # [h, V, d]
        if repeat > 1:
            p = rw.call(aten.repeat_interleave.self_int, p, repeat, 0)         # repeat_kv's head order
        p = rw.call(aten.unsqueeze.default, p, 0)
        p = rw.call(aten.expand.default, p, [rw.call(aten.sym_size.int, x, 0), -1, -1, -1])
        p = rw.call(aten.type_as.default, p, x)
        axis = 3 if transposed else 2
        if transposed:
            p = rw.call(aten.transpose.int, p, 2, 3)
        rest = rw.call(aten.slice.Tensor, x, axis, n, _INT_MAX) if n else x
        return rw.call(aten.cat.default, [p, rest], axis)

    def _prefix_row(self, rw: Rewriter, row: int) -> fx.Node:
        """Row ``row`` of the prefix as [h, V, d]: a select of [2L, h, V, d], or with mixed widths the row's
        columns of the [V, width] table viewed at its layer's heads."""
        if not self._dims.widths:
            return rw.call(aten.select.int, self._prefix, 0, row)
        start, end = self._dims.columns(row)
        heads, head_dim = self._dims.layer_heads(row // 2)
        cols = rw.call(aten.slice.Tensor, self._prefix, 1, start, end)
        cols = rw.call(aten.view.default, cols, [self._dims.num_virtual_tokens, heads, head_dim])
        return rw.call(aten.permute.default, cols, [1, 0, 2])

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
        info, table = entry.info, prompt_embeddings(gm, entry).detach()
        n = int(info["num_virtual_tokens"])
        if "layer_widths" in info:
            dims = PrefixDims(n, int(info["num_layers"]), 0, 0, 0, 1, tuple(map(tuple, info["layer_widths"])))
            rows = [table[:, slice(*dims.columns(row))].view(n, *dims.layer_heads(row // 2)).permute(1, 0, 2)
                    for row in range(2 * dims.num_layers)]
        else:
            heads = int(info["num_attention_heads"])
            rows = table.view(n, 2 * int(info["num_layers"]), heads, int(info["token_dim"]) // heads)
            rows = rows.permute(1, 2, 0, 3)
        return {int(r.info["layer"]): (rows[int(r.info["key_row"])], rows[int(r.info["value_row"])])
                for r in records if r.kind != ENCODER_KIND and "layer" in r.info}

    @classmethod
    def saved_config(cls, data: dict[str, Any], records: list[Rewrite]) -> dict[str, Any]:
        """The sizes read off the model are written out, as PEFT writes its resolved config."""
        entry = next((r for r in records if r.kind == ENCODER_KIND), None)
        if entry is None:
            return data
        return {**data, **{k: entry.info[k] for k in _RESOLVED if data.get(k) is None and k in entry.info}}


# -- the sequence entry -------------------------------------------------------------------------------

def _main_input(gm: fx.GraphModule) -> Optional[fx.Node]:
    """The decoder's ids for an encoder-decoder, else input_ids; else the one 2-D integer input."""
    for name in _MAIN_INPUTS:
        node = placeholder(gm, name)
        if node is not None:
            return node
    ids = [n for n in gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)
           and n.meta["val"].dim() == 2 and not n.meta["val"].is_floating_point() and "mask" not in str(n.target)]
    return ids[0] if len(ids) == 1 else None


def _sequence_dim(main: fx.Node) -> Any:
    val = main.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() < 2:
        raise GraphPeftError("prefix_tuning needs the graph's shapes: capture the model with torch.export "
                             "(pass example_inputs when rewriting a model that is not a Hugging Face model)")
    if isinstance(val.shape[1], int):
        raise GraphPeftError(f"prefix_tuning: {main.target} was captured with a fixed sequence length "
                             f"({val.shape[1]}); capture with a dynamic sequence dimension "
                             f"(graphpeft.engine.capture's default)")
    return val.shape[1]


def _same(a: Any, b: Any) -> bool:
    return not isinstance(a, int) and not isinstance(b, int) and str(a) == str(b)


def _downstream(starts: list[fx.Node]) -> set[fx.Node]:
    """Nodes whose tensor value depends on ``starts`` through tensors (sizes read off a tensor do not count)."""
    seen: set[fx.Node] = set()
    frontier = list(starts)
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            val = user.meta.get("val")
            if isinstance(val, torch.Tensor) or (isinstance(val, (tuple, list)) and val
                                                 and all(isinstance(v, torch.Tensor) for v in val)):
                frontier.append(user)
    return seen


def _filler(gm: fx.GraphModule, main: fx.Node) -> Any:
    """A filler value for the main input: any id but the pad id (padding-derived positions then count it)."""
    if main.meta["val"].is_floating_point():
        return 0.0
    config = getattr(capture_info(gm), "hf_config", None)
    pad = getattr(config, "pad_token_id", None) if config is not None else None
    return 1 if pad == 0 else 0


def _pooling_ops(gm: fx.GraphModule, reach: set[fx.Node], seq: Any) -> tuple[fx.Node, ...]:
    """select / slice ops on the sequence axis (dim 1) of token-derived tensors that pick given positions.

    A whole-axis slice is left alone (it keeps the fillers, which the outputs then drop).
    """
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (aten.select.int, aten.slice.Tensor):
            continue
        x = node.args[0]
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if x not in reach or not isinstance(val, torch.Tensor) or val.dim() < 2 or not _same(val.shape[1], seq):
            continue
        dim = node.args[1] if len(node.args) > 1 else 0
        if dim % val.dim() != 1:
            continue
        if node.target is aten.select.int:
            if isinstance(node.args[2], int) and node.args[2] >= 0:
                found.append(node)
            continue
        start = node.args[2] if len(node.args) > 2 else None
        end = node.args[3] if len(node.args) > 3 else None
        start = 0 if start is None else start
        whole = start == 0 and (end is None or isinstance(end, fx.Node) or end >= _INT_MAX // 2)
        if isinstance(start, int) and start >= 0 and not whole:
            found.append(node)
    return tuple(found)


def _shifted_args(op: fx.Node, n: int) -> tuple:
    """The args of a select / slice on the sequence axis with its positions moved n on."""
    args = list(op.args)
    if op.target is aten.select.int:
        args[2] = args[2] + n
        return tuple(args)
    args += [None] * (4 - len(args))
    args[2] = (args[2] or 0) + n
    if isinstance(args[3], int) and 0 <= args[3] < _INT_MAX // 2:
        args[3] = args[3] + n
    return tuple(args)


def _sequence_outputs(gm: fx.GraphModule, reach: set[fx.Node], seq: Any) -> tuple[fx.Node, ...]:
    output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
    found = []
    for node in output.all_input_nodes:
        val = node.meta.get("val")
        if node in reach and isinstance(val, torch.Tensor) and val.dim() >= 2 and _same(val.shape[1], seq):
            found.append(node)
    return tuple(found)


def _first_computation(gm: fx.GraphModule) -> fx.Node:
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    return last.next


def _prepend(rw: Rewriter, node: fx.Node, n: int, fill: Any, offset: int = 0) -> None:
    """Every reader of input ``node`` reads cat([full((B, n, ...), fill), node + offset], dim=1)."""
    rank = node.meta["val"].dim() if isinstance(node.meta.get("val"), torch.Tensor) else 2
    sizes = [rw.call(aten.sym_size.int, node, 0), n, *(rw.call(aten.sym_size.int, node, d) for d in range(2, rank))]
    pad = rw.call(aten.new_full.default, node, sizes, fill)
    body = rw.call(aten.add.Tensor, node, offset) if offset else node
    joined = rw.call(aten.cat.default, [pad, body], 1)
    rw.replace_uses(node, joined)


# -- attention sites --------------------------------------------------------------------------------

def _site_shape(att: AttentionSite, seq: Any, batch: Any = None) -> tuple[int, int, int]:
    """(heads at the site, head size, key/value heads before any repetition) of a 4-D attention site, or of a
    3-D one on a token sequence (heads folded into the batch axis: [B*H, S, d])."""
    key, value = att.key.meta.get("val"), att.value.meta.get("val")
    where = module_stack_entry(att.node)[0] or att.node.name
    if seq is not None and _three_d(att):
        heads, head_dim = _folded_heads(att, seq, batch, where)
        return heads, head_dim, heads
    if not isinstance(key, torch.Tensor) or not isinstance(value, torch.Tensor) or key.dim() != 4 or value.dim() != 4:
        shape = tuple(key.shape) if isinstance(key, torch.Tensor) else "?"
        raise GraphPeftError(f"prefix_tuning: the attention site {where} ({_ops(att)}, keys of shape {shape}) does not "
                             f"take 4-D [batch, heads, sequence, head size] keys and values; prefix tuning cannot "
                             f"put a prefix there")
    if att.key is att.value:
        raise GraphPeftError(f"prefix_tuning: the attention site {where} uses one tensor as keys and values; "
                             f"it cannot take separate key and value prefixes")
    heads, head_dim = value.shape[1], value.shape[3]
    key_seq = key.shape[3] if att.kind == "eager" else key.shape[2]
    static = isinstance(heads, int) and isinstance(head_dim, int)
    if seq is None:         # no token sequence: keys and values need only run along the same axis
        along = str(key_seq) == str(value.shape[2])
    else:
        along = _same(key_seq, seq) and _same(value.shape[2], seq)
    if not static or not along:
        raise GraphPeftError(f"prefix_tuning: the attention site {where} has keys of shape {tuple(key.shape)}, "
                             f"which do not run along the sequence of the input; prefix tuning cannot put a "
                             f"prefix there")
    return heads, head_dim, _kv_heads(att.value, heads, head_dim)


def _three_d(att: AttentionSite) -> bool:
    vals = [x.meta.get("val") for x in (att.key, att.value)]
    return all(isinstance(v, torch.Tensor) and v.dim() == 3 for v in vals)


def _ops(att: AttentionSite) -> str:
    return f"{att.node.target}" + (f" after {att.scores.target}" if att.scores is not None else "")


def _folded_heads(att: AttentionSite, seq: Any, batch: Any, where: str) -> tuple[int, int]:
    """(H, d) of a site on 3-D values [B*H, S, d]: H is the first axis over the input's batch size B. The keys
    and values must be folded batch-major, from [B, H, S, d] (a reshape of it), as the prefix is laid in."""
    value = att.value.meta["val"]
    head_dim = value.shape[2]
    heads = _quotient(value.shape[0], batch)
    if att.key is att.value or not _same(value.shape[1], seq) or not isinstance(head_dim, int) or heads is None:
        raise GraphPeftError(f"prefix_tuning: the attention site {where} ({_ops(att)}) takes 3-D values of shape "
                             f"{tuple(value.shape)}, not [batch*heads, sequence, head size] over the input's "
                             f"batch {batch} and sequence {seq}; prefix tuning cannot put a prefix there")
    for role, x in (("keys", _folded_key(att, seq, head_dim)), ("values", att.value)):
        if not _folded_from(x, batch, heads):
            raise GraphPeftError(f"prefix_tuning: the attention site {where} ({_ops(att)}) takes 3-D {role} "
                                 f"({x.target}) that are not a reshape of [batch, heads, sequence, head size]; "
                                 f"prefix tuning cannot tell which heads they fold")
    return heads, head_dim


def _folded_from(x: fx.Node, batch: Any, heads: int) -> bool:
    """x is a view / reshape of a [B, H, S, d] tensor (through copies): batch-major B*H."""
    for _ in range(4):
        if x.op != "call_function" or x.target not in _COPIES or not isinstance(x.args[0], fx.Node):
            break
        x = x.args[0]
    if x.op != "call_function" or x.target not in _FOLDS or not isinstance(x.args[0], fx.Node):
        return False
    val = x.args[0].meta.get("val")
    return (isinstance(val, torch.Tensor) and val.dim() == 4 and str(val.shape[0]) == str(batch)
            and val.shape[1] == heads)


def _quotient(folded: Any, batch: Any) -> Optional[int]:
    """folded / batch when it is a positive whole number, for plain and symbolic sizes (4*s0 / s0 = 4)."""
    if isinstance(folded, int) and isinstance(batch, int):
        return folded // batch if batch > 0 and folded % batch == 0 else None
    if isinstance(folded, int) or isinstance(batch, int):
        return None
    ratio = sympy.simplify(folded.node.expr / batch.node.expr)
    return int(ratio) if ratio.is_Integer and int(ratio) > 0 else None


def _folded_key(att: AttentionSite, seq: Any, head_dim: int) -> fx.Node:
    """The [B*H, S, d] keys behind the score operand of a 3-D site, through transposes, casts and scalings
    (DeBERTa's k^T / scale): the node whose readers all see keys on the sequence axis."""
    node = att.key
    for _ in range(8):
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        if (isinstance(val, torch.Tensor) and val.dim() == 3 and _same(val.shape[1], seq) and val.shape[2] == head_dim
                and str(val.shape[0]) == str(att.value.meta["val"].shape[0])):
            return node
        if not isinstance(node, fx.Node) or node.op != "call_function" or not _key_preserving(node):
            break
        node = node.args[0]
    where = module_stack_entry(att.node)[0] or att.node.name
    seen = f"{node.target}" if isinstance(node, fx.Node) else repr(node)
    shape = tuple(att.key.meta["val"].shape) if isinstance(att.key.meta.get("val"), torch.Tensor) else "?"
    raise GraphPeftError(f"prefix_tuning: the attention site {where} ({_ops(att)}) takes 3-D keys of shape {shape} "
                         f"that do not come from [batch*heads, sequence, head size] keys through transposes, casts "
                         f"or scalings (it reached {seen}); prefix tuning cannot put a prefix there")


def _key_preserving(node: fx.Node) -> bool:
    """An op that moves, casts or scales keys by a scalar: the prefix may enter before it."""
    if node.target in _KEY_LAYOUT:
        return True
    if node.target in (aten.div.Tensor, aten.mul.Tensor) and len(node.args) == 2:
        other = node.args[1]
        val = other.meta.get("val") if isinstance(other, fx.Node) else other
        return isinstance(val, (int, float)) or (isinstance(val, torch.Tensor) and val.dim() == 0)
    return False


def _four_d(att: AttentionSite) -> bool:
    vals = [x.meta.get("val") for x in (att.query, att.key, att.value)]
    return all(isinstance(v, torch.Tensor) and v.dim() == 4 for v in vals)


def _refuse_causal(att: AttentionSite) -> None:
    """SDPA's is_causal aligns the causal mask to the top left when keys are longer than queries."""
    causal = att.node.kwargs.get("is_causal", att.node.args[5] if len(att.node.args) > 5 else False)
    if att.kind == "sdpa" and causal:
        where = module_stack_entry(att.node)[0] or att.node.name
        raise GraphPeftError(f"prefix_tuning: the attention site {where} ({att.node.target}) is causal "
                             f"(is_causal=True) and the graph has no token input to offset positions by; "
                             f"prefix tuning without token inputs needs non-causal attention")


def _extend_masks(rw: Rewriter, att: AttentionSite, n: int, where: str) -> None:
    """The site's mask gets n attended key columns in front: an additive mask 0, a boolean keep-mask True,
    a masked_fill mask False. A mask broadcast over the keys (last size 1) stays as it is.

    SDPA: its attn_mask. Eager: every tensor combined with the scores between matmul(q, k^T) and softmax."""
    if att.kind == "sdpa":
        mask = att.node.args[3] if len(att.node.args) > 3 else att.node.kwargs.get("attn_mask")
        if isinstance(mask, fx.Node):
            rw.start_before(att.node)
            rw.replace_input(att.node, mask, _pad_keys(rw, mask, n, True))
        return
    key_len = att.scores.meta["val"].shape[-1] if isinstance(att.scores.meta.get("val"), torch.Tensor) else None
    chain, node = [], att.node.args[0]
    while isinstance(node, fx.Node) and node is not att.scores:
        chain.append(node)
        node = node.args[0] if node.args else None
    for op in chain:
        for arg in op.all_input_nodes:
            if arg in chain or arg is att.scores:
                continue
            val = arg.meta.get("val")
            if not isinstance(val, torch.Tensor) or val.dim() == 0 or val.shape[-1] == 1:
                continue
            if op.target in (aten.add.Tensor, aten.sub.Tensor):
                keep = False                        # additive: 0 keeps the prefix column
            elif op.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
                keep = False                        # True masks out: False keeps
            elif op.target is aten.where.self and arg is op.args[0]:
                keep = True                         # True keeps the scores
            else:
                raise GraphPeftError(f"prefix_tuning: in the attention site {where}, {op.target} combines the "
                                     f"scores with a tensor of shape {tuple(val.shape)} that prefix tuning cannot "
                                     f"extend by {n} key positions")
            if str(val.shape[-1]) != str(key_len):
                continue
            rw.start_before(op)
            rw.replace_input(op, arg, _pad_keys(rw, arg, n, keep))


def _pad_keys(rw: Rewriter, mask: fx.Node, n: int, keep: bool) -> fx.Node:
    """mask with n columns in front on its last axis that let the prefix through: 0 in a float mask, ``keep``
    in a boolean one."""
    val = mask.meta.get("val")
    fill = keep if isinstance(val, torch.Tensor) and val.dtype == torch.bool else 0.0
    return rw.call(aten.constant_pad_nd.default, mask, [n, 0], fill)


def _kv_heads(x: fx.Node, heads: int, head_dim: int) -> int:
    """Key/value heads before a repeat_kv (expand + reshape) on the way to the site; ``heads`` if none."""
    node, best = x, heads
    for _ in range(12):
        if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in _HEAD_VIEWS:
            break
        node = node.args[0]
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        if isinstance(val, torch.Tensor) and val.dim() == 4 and val.shape[3] == head_dim:
            h = val.shape[1]
            if isinstance(h, int) and 0 < h < best and heads % h == 0:
                best = h
    return best


def _model_sizes(gm: fx.GraphModule) -> dict[str, Optional[int]]:
    """num_layers, token_dim and num_attention_heads as PEFT's _prepare_prompt_learning_config reads them
    (key/value heads for grouped-query attention); None where the model config has no such field."""
    config = getattr(capture_info(gm), "hf_config", None)
    out: dict[str, Optional[int]] = {"num_layers": None, "token_dim": None, "num_attention_heads": None}
    if config is None:
        return out
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    as_dict = as_dict.get("text_config") or as_dict

    def first(*names: str) -> Optional[int]:
        return next((as_dict[k] for k in names if isinstance(as_dict.get(k), int)), None)

    layers = getattr(config, "num_hidden_layers", None)
    out["num_layers"] = layers if isinstance(layers, int) else first("num_hidden_layers", "num_layers", "n_layer")
    out["token_dim"] = first("hidden_size", "n_embd", "d_model")
    out["num_attention_heads"] = first("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
    kv = as_dict.get("num_key_value_heads")
    if isinstance(kv, int) and out["token_dim"] and out["num_attention_heads"]:
        head_dim = as_dict.get("head_dim") or out["token_dim"] // out["num_attention_heads"]
        out["token_dim"], out["num_attention_heads"] = head_dim * kv, kv
    return out


def _mixed_dims(cfg: PrefixTuningConfig, shapes: list[tuple[int, int, int]]) -> PrefixDims:
    """Sites of different widths (Swin's stages: more heads, or larger ones): one prefix per site at its own
    width, in one table whose row holds every layer's key and value prefix in layer order (PEFT's [V, 2L*T]
    layout when all are equal). Sizes are read off the graph; one token_dim, PEFT's projection (an embedding of
    token_dim) or an encoder-decoder's row layout cannot fit them."""
    found = sorted({f"{kv}x{d}" for _, d, kv in shapes})
    for name in ("token_dim", "num_attention_heads", "prefix_projection"):
        if getattr(cfg, name):
            raise GraphPeftError(f"prefix_tuning: {name}={getattr(cfg, name)!r} but the attention sites have "
                                 f"different widths (heads x head size: {found}), so each layer's prefix takes "
                                 f"its own width; leave {name} unset")
    if cfg.num_layers not in (None, len(shapes)) or cfg.num_transformer_submodules == 2:
        raise GraphPeftError(f"prefix_tuning: the {len(shapes)} attention sites have different widths "
                             f"({found}): one prefix per site, so num_layers must be {len(shapes)} and "
                             f"num_transformer_submodules 1 (or leave them unset)")
    widths = tuple((kv, d) for _, d, kv in shapes)
    return PrefixDims(cfg.num_virtual_tokens, len(shapes), 0, 0, 0, 1, widths)


def _head_sizes(cfg: PrefixTuningConfig, model: dict[str, Optional[int]],
                shapes: list[tuple[int, int, int]]) -> tuple[int, int]:
    """(num_attention_heads, token_dim) of the prefix: the config's, else the model config's if they fit the
    sites, else the graph's (key/value heads x head size). Given sizes that do not fit are an error."""
    head_dim = shapes[0][1]

    def fits(heads: Optional[int], token_dim: Optional[int]) -> bool:
        return (bool(heads) and bool(token_dim) and token_dim % heads == 0 and token_dim // heads == head_dim
                and all(s[0] % heads == 0 for s in shapes))

    heads, token_dim = cfg.num_attention_heads, cfg.token_dim
    if heads is None and token_dim is None:
        if fits(model["num_attention_heads"], model["token_dim"]):
            return model["num_attention_heads"], model["token_dim"]
        kv_heads = min(s[2] for s in shapes)
        return kv_heads, kv_heads * head_dim
    if heads is None:
        heads = max(token_dim // head_dim, 1)
    if token_dim is None:
        token_dim = heads * head_dim
    if not fits(heads, token_dim):
        raise GraphPeftError(f"prefix_tuning: token_dim={token_dim} with num_attention_heads={heads} does not fit "
                             f"the attention sites ({shapes[0][0]} heads of size {head_dim}); leave them unset to "
                             f"read them from the model")
    return heads, token_dim


# -- parameters -------------------------------------------------------------------------------------

def _device(gm: fx.GraphModule) -> torch.device:
    return next((p.device for p in gm.parameters()), torch.device("cpu"))


def _init_encoder(dims: PrefixDims, project: bool, init_weights: Optional[str],
                  device: torch.device) -> dict[str, torch.Tensor]:
    """PEFT's PrefixEncoder parameters, initialised as PEFT does (float32, like PEFT's prompt encoder)."""
    n, width = dims.num_virtual_tokens, dims.table_width
    if not project:
        table = nn.Embedding(n, width).weight.detach()
        if init_weights == "zero":
            table.zero_()
        return {"embedding.weight": table.to(device)}
    table = nn.Embedding(n, dims.token_dim).weight.detach()
    first, last = nn.Linear(dims.token_dim, dims.encoder_hidden_size), nn.Linear(dims.encoder_hidden_size, width)
    if init_weights == "zero":
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    params = {"embedding.weight": table, "transform.0.weight": first.weight, "transform.0.bias": first.bias,
              "transform.2.weight": last.weight, "transform.2.bias": last.bias}
    return {k: v.detach().to(device) for k, v in params.items()}


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
