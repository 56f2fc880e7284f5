"""LoRA: a low-rank branch beside every targeted weight op, with Hugging Face PEFT's semantics.

Maths (PEFT's lora.Linear): with W [out, in], A [r, in], B [out, r] and s = lora_alpha / r
(lora_alpha / sqrt(r) with use_rslora),

    y = W x + b   ->   y = W x + b + s * B (A (dropout(x)))

Sites and their forms:

    linear / addmm / mm (GPT-2 Conv1D, W stored [in, out])      factored branch, as above
    conv (W [out, in, *k]; A [r, in, *k], B [out, r, 1..])        y + s * conv_1x1(conv(dropout(x), A), B)
    embedding (W [num, dim]; A [r, num], B [dim, r])              y + s * (A^T[ids]) B^T
    einsum / matmul on a bare parameter (PEFT target_parameters)  W -> W + s * B A inside the op

before:                       after (linear):
    x ─ linear(W, b) ─ y          x ─ linear(W, b) ───────────────────┬─ add ─ y
                                  └ dropout ─ linear(A) ─ linear(B) ─ mul(s) ┘

before:                       after (parameter site):
    x ─ einsum(W) ─ y             W ─┬─ add ─ einsum(x, ·) ─ y
                                  B ─ mm(A) ─ mul(s) ┘

Parameters live at PEFT's in-memory names (``<path>.lora_A.<adapter>.weight``,
``<path>.lora_embedding_A.<adapter>``) and are saved under PEFT's file keys.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.fx as fx
from torch import nn

from graphpeft.config import TargetingConfig
from graphpeft.errors import GraphPeftError
from graphpeft.match import CONV_OPS, LINEAR_KINDS, PARAM_KINDS, Site, attention_input_projections, select_sites
from graphpeft.registry import register_method, register_rule
from graphpeft.result import Rewrite
from graphpeft.rewriter import Rewriter, get_attr_path
from graphpeft.rule import Rule, RulePass

aten = torch.ops.aten
SITE_KINDS = LINEAR_KINDS + PARAM_KINDS + ("embedding", "conv")


@dataclass
class LoraConfig(TargetingConfig):
    """PEFT's LoraConfig fields and defaults (the subset graphpeft implements)."""

    peft_type = "LORA"
    unsupported_fields = ("use_dora", "lora_bias", "layer_replication", "loftq_config", "eva_config",
                          "corda_config", "trainable_token_indices", "alora_invocation_tokens",
                          "arrow_config", "kasa_config", "velora_config", "monteclora_config")

    r: int = field(default=8, metadata={"cli": "--r", "help": "LoRA rank"})
    lora_alpha: float = field(default=8, metadata={"cli": "--alpha", "help": "scaling numerator (alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"cli": "--dropout", "help": "dropout on the LoRA input"})
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = field(default=False, metadata={"cli": "--rslora", "help": "scale by alpha / sqrt(r)"})
    init_lora_weights: Union[bool, str] = True
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise GraphPeftError(f"r must be a positive integer, got {self.r!r}")
        if any(not isinstance(v, int) or v <= 0 for v in (self.rank_pattern or {}).values()):
            raise GraphPeftError(f"rank_pattern values must be positive integers, got {self.rank_pattern!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise GraphPeftError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias != "none":
            raise GraphPeftError(f"bias={self.bias!r} is not supported yet; use bias='none'")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise GraphPeftError(f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}")
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern):
            raise GraphPeftError("use_rslora cannot be combined with rank_pattern or alpha_pattern (PEFT refuses it too)")

    def for_loading(self) -> "LoraConfig":
        return dataclasses.replace(self, init_lora_weights=False)

    def rank_and_alpha(self, module_path: str) -> tuple[int, float]:
        """PEFT's get_pattern_key: the first pattern that matches the end of the module path wins."""
        return (_pattern_value(self.rank_pattern, module_path, self.r),
                _pattern_value(self.alpha_pattern, module_path, self.lora_alpha))

    def scaling(self, module_path: str) -> float:
        r, alpha = self.rank_and_alpha(module_path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_value(pattern: dict, key: str, default):
    for name, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({name})$", key):
            return value
    return default


@register_rule
class LoraRule(Rule):
    __doc__ = __doc__
    name = "lora"

    def sites(self, gm: fx.GraphModule) -> list[Site]:
        cfg = self.config
        default = () if cfg.target_modules or cfg.target_parameters else attention_input_projections(gm, ("query", "value"))
        return select_sites(gm, cfg, SITE_KINDS, default_paths=default)

    def check(self, site: Site) -> Optional[str]:
        if site.kind in PARAM_KINDS and self.config.lora_dropout:
            return "lora_dropout must be 0 on a bare parameter site (PEFT's target_parameters refuses it too)"
        if site.kind == "conv":
            args = _conv_args(site.node)
            if args["groups"] != 1 or any(d != 1 for d in args["dilation"]) or isinstance(args["padding"], str):
                return "grouped, dilated or string-padded convolutions are not supported yet"
        return None

    def rewrite(self, gm: fx.GraphModule, site: Site) -> Rewrite:
        cfg, name = self.config, self.adapter_name
        r, alpha = cfg.rank_and_alpha(site.module_path)
        scale = cfg.scaling(site.module_path)
        rw = Rewriter(gm, self.name, site.node, site.module_path, site.kind, adapter=name)
        weight = get_attr_path(gm, site.weight_name)
        if site.kind == "embedding":
            self._embedding(rw, site, r, scale, weight)
        elif site.kind == "conv":
            self._conv(rw, site, r, scale, weight)
        elif site.kind in PARAM_KINDS:
            self._parameter_site(rw, site, r, scale, weight)
        else:
            self._linear(rw, site, r, scale, weight)
        return rw.record(r=r, lora_alpha=alpha, scaling=scale, weight=site.weight_name,
                         layout="in_out" if site.kind in ("addmm", "mm") else "out_in")

    # -- the four forms ---------------------------------------------------------------------------
    def _add_pair(self, rw: Rewriter, path: str, a: torch.Tensor, b: torch.Tensor) -> tuple[str, str]:
        """Register A and B at PEFT's names; returns their attribute paths."""
        name = self.adapter_name
        return (rw.add_parameter(f"{path}.lora_A.{name}.weight", a, f"base_model.model.{path}.lora_A.weight"),
                rw.add_parameter(f"{path}.lora_B.{name}.weight", b, f"base_model.model.{path}.lora_B.weight"))

    def _dropout(self, rw: Rewriter, x: fx.Node) -> fx.Node:
        p = float(self.config.lora_dropout)
        return rw.call(aten.dropout.default, x, p, rw.gm.training) if p else x

    def _linear(self, rw: Rewriter, site: Site, r: int, scale: float, weight: torch.Tensor) -> None:
        a, b = _init_pair(self.config.init_lora_weights, r, site.in_features, site.out_features, weight)
        a_attr, b_attr = self._add_pair(rw, site.module_path, a, b)
        x = self._dropout(rw, site.node.args[1] if site.kind == "addmm" else site.node.args[0])
        h = rw.call(aten.linear.default, x, rw.get_param(a_attr))
        h = rw.call(aten.linear.default, h, rw.get_param(b_attr))
        h = rw.call(aten.mul.Tensor, h, scale)
        out = rw.call(aten.add.Tensor, site.node, h)
        rw.replace_uses(site.node, out)

    def _embedding(self, rw: Rewriter, site: Site, r: int, scale: float, weight: torch.Tensor) -> None:
        path, name = site.module_path, self.adapter_name
        num, dim = site.in_features, site.out_features
        a, b = torch.randn(r, num), torch.randn(dim, r)          # PEFT: randn, then init A=0, B=normal
        if self.config.init_lora_weights is not False:
            nn.init.zeros_(a)
            nn.init.normal_(b)
        a, b = a.to(device=weight.device, dtype=weight.dtype), b.to(device=weight.device, dtype=weight.dtype)
        a_attr = rw.add_parameter(f"{path}.lora_embedding_A.{name}", a, f"base_model.model.{path}.lora_embedding_A")
        b_attr = rw.add_parameter(f"{path}.lora_embedding_B.{name}", b,
                                  f"base_model.model.{path}.lora_embedding_B")
        node = site.node
        ids = node.args[1] if node.target is aten.embedding.default else node.args[0]  # F.embedding / nn.Embedding
        extra = tuple(node.args[2:]) if node.target is aten.embedding.default else ()
        a_t = rw.call(aten.t.default, rw.get_param(a_attr))
        h = rw.call(aten.embedding.default, a_t, ids, *extra)
        b_t = rw.call(aten.t.default, rw.get_param(b_attr))
        h = rw.call(aten.matmul.default, h, b_t)
        h = rw.call(aten.mul.Tensor, h, scale)
        out = rw.call(aten.add.Tensor, node, h)
        rw.replace_uses(node, out)

    def _conv(self, rw: Rewriter, site: Site, r: int, scale: float, weight: torch.Tensor) -> None:
        """PEFT's lora.Conv: A is a conv with the base kernel, stride and padding; B a 1x1 conv."""
        kernel, conv = tuple(weight.shape[2:]), site.node.target
        a_lin, b_lin = _init_pair(self.config.init_lora_weights, r, site.in_features * math.prod(kernel),
                                  site.out_features, weight)
        a = a_lin.reshape(r, site.in_features, *kernel)
        b = b_lin.reshape(site.out_features, r, *([1] * len(kernel)))
        a_attr, b_attr = self._add_pair(rw, site.module_path, a, b)
        args = _conv_args(site.node)
        x = self._dropout(rw, site.node.args[0])
        h = rw.call(conv, x, rw.get_param(a_attr), None, args["stride"], args["padding"])
        h = rw.call(conv, h, rw.get_param(b_attr))
        h = rw.call(aten.mul.Tensor, h, scale)
        out = rw.call(aten.add.Tensor, site.node, h)
        rw.replace_uses(site.node, out)

    def _parameter_site(self, rw: Rewriter, site: Site, r: int, scale: float, weight: torch.Tensor) -> None:
        a, b = _init_pair(self.config.init_lora_weights, r, site.in_features, site.out_features, weight)
        a_attr, b_attr = self._add_pair(rw, site.param_owner, a, b)
        rw.start_before(site.node)
        delta = rw.call(aten.mm.default, rw.get_param(b_attr), rw.get_param(a_attr))
        delta = rw.call(aten.mul.Tensor, delta, scale)
        patched = rw.call(aten.add.Tensor, site.weight, delta)
        rw.replace_input(site.node, site.weight, patched)

    # -- merging ------------------------------------------------------------------------------------
    @classmethod
    def merged_weights(cls, gm: fx.GraphModule, record: Rewrite) -> dict[str, torch.Tensor]:
        info = record.info
        weight = get_attr_path(gm, info["weight"]).detach()
        if record.kind == "embedding":
            a = next(get_attr_path(gm, k) for k in record.params if ".lora_embedding_A." in k)
            b = next(get_attr_path(gm, k) for k in record.params if ".lora_embedding_B." in k)
            delta = (b @ a).T
        else:
            a = next(get_attr_path(gm, k) for k in record.params if ".lora_A." in k)
            b = next(get_attr_path(gm, k) for k in record.params if ".lora_B." in k)
            delta = (b.flatten(1) @ a.flatten(1)).reshape(weight.shape)   # conv: B is 1x1, so this is exact
            if info["layout"] == "in_out":
                delta = (b @ a).T
        return {info["weight"]: (weight + float(info["scaling"]) * delta.detach()).to(weight.dtype)}


def _conv_args(node: fx.Node) -> dict:
    """stride, padding, dilation, groups of an aten.convNd call, with aten's defaults."""
    dims = CONV_OPS[node.target]
    names = ("stride", "padding", "dilation", "groups")
    defaults = ([1] * dims, [0] * dims, [1] * dims, 1)
    return {n: (node.args[3 + i] if len(node.args) > 3 + i else node.kwargs.get(n, d))
            for i, (n, d) in enumerate(zip(names, defaults))}


def _init_pair(init, r: int, fin: int, fout: int, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, in] and B [out, r] as PEFT initialises them (nn.Linear's init, then reset)."""
    a = nn.Linear(fin, r, bias=False).weight.data
    b = nn.Linear(r, fout, bias=False).weight.data
    if init is True:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)
    elif init == "gaussian":
        nn.init.normal_(a, std=1 / r)
        nn.init.zeros_(b)
    dtype = weight.dtype if weight.is_floating_point() else torch.float32
    return a.to(device=weight.device, dtype=dtype), b.to(device=weight.device, dtype=dtype)


class LoraPass(RulePass):
    """torch.fx pass: ``LoraPass(LoraConfig(...))(graph_module) -> PassResult``."""

    rule_cls = LoraRule


register_method("lora", LoraConfig, LoraPass, "low-rank adapters on weight ops (PEFT LoRA)")
