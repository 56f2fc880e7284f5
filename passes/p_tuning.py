"""P-Tuning: virtual tokens produced by a prompt encoder, with Hugging Face PEFT's semantics
(peft.tuners.p_tuning.PromptEncoder).

Maths: with the input table P0 [T, H] (T = num_virtual_tokens x num_transformer_submodules) and
hidden size h (encoder_hidden_size, default H),

    MLP    P = W3 relu(W2 relu(W1 P0 + b1) + b2) + b3             W1 [h, H], W2 [h, h], W3 [H, h]
    LSTM   P = W2 relu(W1 biLSTM(P0) + b1) + b2                   biLSTM: encoder_num_layers, encoder_dropout;
                                                                   W1 [2h, 2h], W2 [H, 2h]

and then, as in prompt tuning, with the first V rows of P and E the token-embedding module,

    h = E(x) [B, L, H]  ->  [P[:V] ; E(x)] [B, V+L, H],   mask m -> [1_V ; m],   token types -> [0_V ; t]

before:                                    after:
    input_ids ─ embedding(W) ─ h ─ ...         input_ids ─ cat(0…) ─ embedding(W) ─ h ─ slice(V:) ─┐
    attention_mask ─────────── ...             prompt_encoder() ─ [:V] ─ type_as ─ expand(B) ──── cat ─ ...
                                               attention_mask ─ cat(1…) ─ ...

The encoder is one module in the graph (``call_module prompt_encoder.<adapter>``, PEFT's layout and
parameter names: ``embedding``, ``mlp_head``, ``lstm_head``), so the LSTM's dropout follows the model's
train/eval mode. As in PEFT, the file holds only ``prompt_embeddings``: the encoder's output for all
T tokens (computed in eval mode when saving). A model loaded for inference
(``inference_mode=True``, e.g. ``graphpeft.from_pretrained`` without ``is_trainable``) has no encoder:
its prompt is that table itself. Loaded with ``is_trainable=True`` the saved table becomes the new
encoder's input, as PEFT does.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from graphpeft.engine.config import PromptLearningConfig
from graphpeft.engine.errors import GraphPeftError
from graphpeft.engine.registry import register_method, register_rule
from graphpeft.engine.result import Rewrite
from graphpeft.engine.rewriter import Rewriter, get_attr_path
from graphpeft.engine.rule import RulePass
from graphpeft.engine.virtual_tokens import (TokenLookup, TokenLookupRule, extend_sequence, fill_unset, model_dims,
                                      replace_leading_rows)

aten = torch.ops.aten
ENCODERS = ("MLP", "LSTM")
_RESOLVED = ("token_dim", "num_transformer_submodules", "num_layers", "num_attention_heads", "encoder_hidden_size")


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """PEFT's PromptEncoderConfig fields and defaults (encoder_hidden_size None: token_dim)."""

    peft_type = "P_TUNING"

    encoder_reparameterization_type: str = field(default="MLP", metadata={
        "cli": "--encoder", "help": "prompt encoder: MLP or LSTM"})
    encoder_hidden_size: Optional[int] = field(default=None, metadata={
        "cli": "--encoder-hidden-size", "help": "hidden size of the prompt encoder; unset: the token dim"})
    encoder_num_layers: int = field(default=2, metadata={
        "cli": "--encoder-num-layers", "help": "LSTM layers (the MLP always has 3 linear layers)"})
    encoder_dropout: float = field(default=0.0, metadata={
        "cli": "--encoder-dropout", "help": "dropout between LSTM layers"})

    def validate(self) -> None:
        super().validate()
        if isinstance(self.encoder_reparameterization_type, enum.Enum):
            self.encoder_reparameterization_type = self.encoder_reparameterization_type.value
        if self.encoder_reparameterization_type not in ENCODERS:
            raise GraphPeftError(f"encoder_reparameterization_type must be MLP or LSTM, "
                                 f"got {self.encoder_reparameterization_type!r}")
        hidden = self.encoder_hidden_size
        if hidden is not None and (not isinstance(hidden, int) or hidden <= 0):
            raise GraphPeftError(f"encoder_hidden_size must be a positive integer, got {hidden!r}")
        if not isinstance(self.encoder_num_layers, int) or self.encoder_num_layers <= 0:
            raise GraphPeftError(f"encoder_num_layers must be a positive integer, got {self.encoder_num_layers!r}")
        if not 0.0 <= float(self.encoder_dropout) < 1.0:
            raise GraphPeftError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")


class PromptEncoder(nn.Module):
    """PEFT's PromptEncoder, called without indices: returns the prompts of all T virtual tokens [T, H].

    Submodules are built in PEFT's order (embedding, then lstm_head, then mlp_head), so the same seed
    gives the same initial weights.
    """

    def __init__(self, total: int, dim: int, hidden: int, kind: str = "MLP", num_layers: int = 2,
                 dropout: float = 0.0, inference_mode: bool = False):
        super().__init__()
        self.kind, self.inference_mode = kind, inference_mode
        self.embedding = nn.Embedding(total, dim)
        if inference_mode:
            return
        if kind == "LSTM":
            self.lstm_head = nn.LSTM(input_size=dim, hidden_size=hidden, num_layers=num_layers, dropout=dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    def forward(self) -> torch.Tensor:
        table = self.embedding.weight
        if self.inference_mode:
            return table
        x = table.unsqueeze(0)                 # PEFT encodes one row of token indices [1, T]
        if self.kind == "LSTM":
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)[0]


@register_rule
class PTuningRule(TokenLookupRule):
    __doc__ = __doc__
    name = "p_tuning"
    mergeable = False


    def rewrite(self, gm: fx.GraphModule, lookup: TokenLookup) -> Rewrite:
        cfg, name = self.config, self.adapter_name
        n, total = cfg.num_virtual_tokens, cfg.total_virtual_tokens()
        hidden = cfg.encoder_hidden_size or lookup.dim
        if cfg.encoder_reparameterization_type == "MLP" and cfg.encoder_num_layers != 2:
            warnings.warn("for MLP, encoder_num_layers is ignored: the MLP always has 3 linear layers (as in PEFT)")
        weight = get_attr_path(gm, lookup.site.weight_name)
        encoder = PromptEncoder(total, lookup.dim, hidden, cfg.encoder_reparameterization_type, cfg.encoder_num_layers,
                                float(cfg.encoder_dropout), bool(cfg.inference_mode)).to(weight.device)
        encoder.train(gm.training)
        rw = Rewriter(gm, self.name, lookup.node, lookup.module_path, "embedding", adapter=name)
        extend_sequence(rw, lookup, n)
        path = f"prompt_encoder.{name}"
        prompts = rw.call_module(path, encoder)
        rw.saved_keys[f"{path}.embedding.weight"] = "prompt_embeddings"
        if total != n:
            prompts = rw.call(aten.slice.Tensor, prompts, 0, 0, n)     # the encoder's share
        replace_leading_rows(rw, lookup, prompts, n)
        return rw.record(num_virtual_tokens=n, token_dim=lookup.dim, num_transformer_submodules=total // n,
                         encoder_hidden_size=hidden, encoder=path, **model_dims(gm))

    @classmethod
    def saved_config(cls, data: dict[str, Any], records: list[Rewrite]) -> dict[str, Any]:
        return fill_unset(data, records[0].info, _RESOLVED)


class PTuningPass(RulePass):
    """torch.fx pass: ``PTuningPass(PromptEncoderConfig(num_virtual_tokens=8))(graph_module) -> PassResult``."""

    rule_cls = PTuningRule

    @staticmethod
    def saved_state(model: Any, adapter_name: str, config: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT saves the encoder's output for every virtual token, not the encoder."""
        for rec in model.records:
            if rec.rule != PTuningRule.name or rec.adapter != adapter_name:
                continue
            encoder = get_attr_path(model.graph_module, rec.info["encoder"])
            was_training = encoder.training
            encoder.eval()
            with torch.no_grad():
                state = {**state, "prompt_embeddings": encoder().detach().contiguous().cpu()}
            encoder.train(was_training)
        return state


register_method("p_tuning", PromptEncoderConfig, PTuningPass,
                "virtual tokens from an MLP/LSTM prompt encoder (PEFT P-Tuning)")
