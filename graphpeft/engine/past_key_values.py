"""Learned past key values: the [V, width] table, its sizes and PEFT's attention cache layout.

V positions of keys and values for every attention site j (graph order) of L, h key/value heads of size d,
T = h * d, are held as one table (PEFT's prompt-encoder output), optionally produced by a two-layer projection:

    P = E                                      E [V, 2L*T]
    P = W2 tanh(W1 E + b1) + b2                E [V, T], W1 [H', T], W2 [2L*T, H']     (project)
    P -> view [V, 2L, h, d] -> permute -> [2L, h, V, d]
    site j reads row 2j as its keys and row 2j+1 as its values (num_transformer_submodules=2,
    encoder-decoders: rows 4j and 4j+1 modulo 2L, PEFT's cache layout)

    E ─ [linear ─ tanh ─ linear] ─ view ─ permute ─ P ─ select(row) ─ [h, V, d]

Sites of different widths (Swin's stages: more heads, or larger ones) get a block each at their own width
T_j = h_j * d_j. The table is then [V, 2 * sum_j T_j], a row holding layer 0's keys (T_0 columns), its
values, then layer 1's ... in layer order: the [V, 2L*T] layout when all T_j are equal, generalised:

    E [V, 2 sum T] ─ slice(columns of row r) ─ view [V, h_j, d_j] ─ permute ─ [h_j, V, d_j]

Sizes come from the config, else the model config (PEFT's rules, key/value heads for grouped-query
attention), else the graph (the attention sites' shapes, attention_shapes.site_shape). ``who`` (the
caller's name) opens the errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from graphpeft.engine.capture import capture_info
from graphpeft.engine.errors import GraphPeftError
from graphpeft.engine.rewriter import Rewriter

aten = torch.ops.aten


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


# -- sizes ------------------------------------------------------------------------------------------

def resolve_dims(cfg: Any, model: dict[str, Optional[int]], main: fx.Node, shapes: list[tuple[int, int, int]],
                 n_sites: int, *, who: str) -> PrefixDims:
    """Config sizes, else the model config's (PEFT's rules, grouped-query heads included), else the graph's."""
    if len({(s[2], s[1]) for s in shapes}) > 1:      # widths differ by layer (Swin's stages)
        return mixed_dims(cfg, shapes, who=who)
    heads, token_dim = head_sizes(cfg, model, shapes, who=who)
    nts = cfg.num_transformer_submodules
    if nts is None:     # PEFT: 2 for SEQ_2_SEQ_LM; with no task type, 2 when the decoder carries the prefix
        decoder = cfg.task_type is None and str(main.target).startswith("decoder_")
        nts = 2 if cfg.task_type == "SEQ_2_SEQ_LM" or decoder else 1
    layers = cfg.num_layers
    if layers is None:
        usable = model["num_layers"] and (nts == 2 or model["num_layers"] >= n_sites)
        layers = model["num_layers"] if usable else n_sites
    if nts == 1 and layers < n_sites:
        raise GraphPeftError(f"{who}: num_layers={layers} but the graph has {n_sites} attention sites "
                             f"that read the sequence; set num_layers={n_sites} or leave it unset")
    return PrefixDims(cfg.num_virtual_tokens, layers, token_dim, heads, cfg.encoder_hidden_size or token_dim, nts)


def model_sizes(gm: fx.GraphModule) -> dict[str, Optional[int]]:
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


def mixed_dims(cfg: Any, shapes: list[tuple[int, int, int]], *, who: str) -> PrefixDims:
    """Sites of different widths (Swin's stages: more heads, or larger ones): one prefix per site at its own
    width, in one table whose row holds every layer's key and value prefix in layer order (PEFT's [V, 2L*T]
    layout when all are equal). Sizes are read off the graph; one token_dim, PEFT's projection (an embedding of
    token_dim) or an encoder-decoder's row layout cannot fit them."""
    found = sorted({f"{kv}x{d}" for _, d, kv in shapes})
    for name in ("token_dim", "num_attention_heads", "prefix_projection"):
        if getattr(cfg, name):
            raise GraphPeftError(f"{who}: {name}={getattr(cfg, name)!r} but the attention sites have "
                                 f"different widths (heads x head size: {found}), so each layer's prefix takes "
                                 f"its own width; leave {name} unset")
    if cfg.num_layers not in (None, len(shapes)) or cfg.num_transformer_submodules == 2:
        raise GraphPeftError(f"{who}: the {len(shapes)} attention sites have different widths "
                             f"({found}): one prefix per site, so num_layers must be {len(shapes)} and "
                             f"num_transformer_submodules 1 (or leave them unset)")
    widths = tuple((kv, d) for _, d, kv in shapes)
    return PrefixDims(cfg.num_virtual_tokens, len(shapes), 0, 0, 0, 1, widths)


def head_sizes(cfg: Any, model: dict[str, Optional[int]], shapes: list[tuple[int, int, int]], *,
               who: str) -> tuple[int, int]:
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
        raise GraphPeftError(f"{who}: token_dim={token_dim} with num_attention_heads={heads} does not fit "
                             f"the attention sites ({shapes[0][0]} heads of size {head_dim}); leave them unset to "
                             f"read them from the model")
    return heads, token_dim


# -- the table, its parameters and its rows ---------------------------------------------------------

def init_encoder(dims: PrefixDims, project: bool, init_weights: Optional[str],
                 device: torch.device) -> dict[str, torch.Tensor]:
    """PEFT's prompt-encoder parameters for the table, initialised as PEFT does (float32, like PEFT's prompt
    encoder)."""
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


def table_node(rw: Rewriter, attrs: dict[str, str], project: bool, dims: PrefixDims) -> fx.Node:
    """The table in the graph, at the rewriter's insertion point: [2L, h, V, d] ([V, width]: mixed widths)."""
    n = dims.num_virtual_tokens
    prefix = rw.get_param(attrs["embedding.weight"])
    if project:
        prefix = rw.call(aten.linear.default, prefix, rw.get_param(attrs["transform.0.weight"]),
                         rw.get_param(attrs["transform.0.bias"]))
        prefix = rw.call(aten.tanh.default, prefix)
        prefix = rw.call(aten.linear.default, prefix, rw.get_param(attrs["transform.2.weight"]),
                         rw.get_param(attrs["transform.2.bias"]))
    if not dims.widths:
        prefix = rw.call(aten.view.default, prefix, [n, 2 * dims.num_layers, dims.num_attention_heads,
                                                     dims.head_dim])
        prefix = rw.call(aten.permute.default, prefix, [1, 2, 0, 3])
    return prefix


def prefix_row(rw: Rewriter, prefix: fx.Node, dims: PrefixDims, row: int) -> fx.Node:
    """Row ``row`` of the prefix as [h, V, d]: a select of [2L, h, V, d], or with mixed widths the row's
    columns of the [V, width] table viewed at its layer's heads."""
    if not dims.widths:
        return rw.call(aten.select.int, prefix, 0, row)
    start, end = dims.columns(row)
    heads, head_dim = dims.layer_heads(row // 2)
    cols = rw.call(aten.slice.Tensor, prefix, 1, start, end)
    cols = rw.call(aten.view.default, cols, [dims.num_virtual_tokens, heads, head_dim])
    return rw.call(aten.permute.default, cols, [1, 0, 2])


def table_rows(table: torch.Tensor, info: dict[str, Any]) -> Any:
    """The [V, width] table's rows as [h, V, d] tensors, indexed by row, from the sizes a rewrite recorded
    (``num_virtual_tokens``, ``num_layers``, and ``layer_widths`` or ``num_attention_heads`` and ``token_dim``)."""
    n = int(info["num_virtual_tokens"])
    if "layer_widths" in info:
        dims = PrefixDims(n, int(info["num_layers"]), 0, 0, 0, 1, tuple(map(tuple, info["layer_widths"])))
        return [table[:, slice(*dims.columns(row))].view(n, *dims.layer_heads(row // 2)).permute(1, 0, 2)
                for row in range(2 * dims.num_layers)]
    heads = int(info["num_attention_heads"])
    rows = table.view(n, 2 * int(info["num_layers"]), heads, int(info["token_dim"]) // heads)
    return rows.permute(1, 2, 0, 3)
