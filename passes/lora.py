"""LoRA: a low-rank branch beside every targeted weight op, with Hugging Face PEFT's semantics.

Maths (PEFT's lora.Linear): with W [out, in], A [r, in], B [out, r] and s = lora_alpha / r
(lora_alpha / sqrt(r) with use_rslora),

    y = W x + b   ->   y = W x + b + s * B (A (dropout(x)))

Sites and their forms:

    linear / addmm / mm (GPT-2 Conv1D, W stored [in, out])      factored branch, as above
    conv (W [out, in, *k]; A [r, in, *k], B [out, r, 1..])        y + s * conv_1x1(conv(dropout(x), A), B)
    embedding (W [num, dim]; A [r, num], B [dim, r])              y + s * (A^T[ids]) B^T
    einsum / matmul on a bare parameter (PEFT target_parameters)  W -> W + s * B A inside the op
    experts: any op on a 3-D W [E, out, in] (MoE, target_parameters)  W -> W + s * per-expert B_e A_e
                                                                    (A [r*E, in], B [out, r*E], PEFT's layout)

Variants (PEFT's fields): ``lora_bias`` (B has a bias, scaled with the branch), ``use_dora`` (DoRA, see
passes/lora_dora.py), ``init_lora_weights`` "pissa" / "pissa_niter_K" / "olora" (A and B from the base
weight, which keeps the residual, see passes/lora_init.py). Merging: passes/lora_merge.py.

before:                       after (linear):
    x ─ linear(W, b) ─ y          x ─ linear(W, b) ───────────────────┬─ add ─ y
                                  └ dropout ─ linear(A) ─ linear(B) ─ mul(s) ┘

before:                       after (parameter site):
    x ─ einsum(W) ─ y             W ─┬─ add ─ einsum(x, ·) ─ y       (W reaching the op through a transpose,
                                  B ─ mm(A) ─ mul(s) ┘                view or cast: the add goes before them)

Parameters live at PEFT's in-memory names (``<path>.lora_A.<adapter>.weight``,
``<path>.lora_embedding_A.<adapter>``) and are saved under PEFT's file keys.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx
from torch import nn

from graphpeft.engine.errors import GraphPeftError
from graphpeft.engine.match import (LINEAR_KINDS, PARAM_KINDS, Site, attention_input_projections, select_sites,
                             weight_reader)
from graphpeft.engine.registry import register_method, register_rule
from graphpeft.engine.result import Rewrite
from graphpeft.engine.rewriter import Rewriter, get_attr_path
from graphpeft.engine.rule import Rule, RulePass
from graphpeft.passes.lora_config import LoraConfig
from graphpeft.passes.lora_dora import bias_correction, combine, initial_magnitude, norm_scale, scaled_b
from graphpeft.passes.lora_init import converted_config, converted_state, decompose, is_decomposing
from graphpeft.passes.lora_merge import merged_weights
from graphpeft.passes.lora_sites import (bias_attr, bias_node, conv_args, fused_gate_up, fused_gate_up_patterns, has_attr,
                                        init_pair, weight_node, wrapper_path)

aten = torch.ops.aten
SITE_KINDS = LINEAR_KINDS + PARAM_KINDS + ("embedding", "conv")
__all__ = ["LoraConfig", "LoraPass", "LoraRule"]


@register_rule
class LoraRule(Rule):
    __doc__ = __doc__
    name = "lora"

    def sites(self, gm: fx.GraphModule) -> list[Site]:
        cfg = self.config
        default = () if cfg.target_modules or cfg.target_parameters else attention_input_projections(gm, ("query", "value"))
        return select_sites(gm, cfg, SITE_KINDS, default_paths=default)

    def check(self, site: Site) -> Optional[str]:
        cfg = self.config
        if site.quantized and (cfg.use_dora or is_decomposing(cfg.init_lora_weights)):
            what = "use_dora" if cfg.use_dora else f"init_lora_weights={cfg.init_lora_weights!r}"
            return f"{what} needs the float base weight, and this one is stored quantized; load the base unquantized"
        if site.kind in PARAM_KINDS:
            for name, value in (("lora_dropout", cfg.lora_dropout), ("use_dora", cfg.use_dora), ("lora_bias", cfg.lora_bias),
                                ("init_lora_weights", is_decomposing(cfg.init_lora_weights))):
                if value:
                    return f"{name} is not supported on a bare parameter site (PEFT's target_parameters refuses it too)"
        if site.kind == "embedding" and cfg.lora_bias:
            return "lora_bias is not supported on an embedding (PEFT refuses it too)"
        if site.kind == "conv":
            if is_decomposing(cfg.init_lora_weights):
                return f"init_lora_weights={cfg.init_lora_weights!r} is not supported on a convolution (PEFT refuses it too)"
            args = conv_args(site.node)
            if args["groups"] != 1 or any(d != 1 for d in args["dilation"]) or isinstance(args["padding"], str):
                return "grouped, dilated or string-padded convolutions are not supported yet"
        return None

    def rewrite(self, gm: fx.GraphModule, site: Site) -> Rewrite:
        cfg = self.config
        key = site.weight_name if site.kind in PARAM_KINDS else site.module_path    # PEFT's key for patterns
        r, alpha = cfg.rank_and_alpha(key)
        fused = fused_gate_up(cfg, site, key)
        if fused:           # PEFT's all-linear on a fused MoE gate+up parameter: the rank and alpha of both halves
            r, alpha = 2 * r, 2 * alpha
        scale = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
        rw = Rewriter(gm, self.name, site.node, site.module_path, site.kind, adapter=self.adapter_name)
        weight = get_attr_path(gm, site.weight_name)
        if site.kind == "embedding":
            self._embedding(rw, site, r, scale, weight)
        elif site.kind == "conv":
            self._conv(rw, site, r, scale, weight)
        elif site.kind in PARAM_KINDS:
            self._parameter_site(rw, site, r, scale, weight)
        else:
            self._linear(rw, site, r, scale, weight)
        bias = bias_attr(site)
        return rw.record(r=r, lora_alpha=alpha, scaling=scale, weight=site.weight_name,
                         layout="in_out" if site.kind in ("addmm", "mm") else "out_in",
                         dora=bool(cfg.use_dora), lora_bias=bool(cfg.lora_bias), bias=bias, fused_gate_up=fused)

    saved_config = staticmethod(fused_gate_up_patterns)    # passes/lora_sites.py

    # -- the four forms ---------------------------------------------------------------------------
    def _add_pair(self, rw: Rewriter, path: str, a: torch.Tensor, b: torch.Tensor) -> tuple[str, str]:
        """Register A and B at PEFT's names; returns their attribute paths."""
        name = self.adapter_name
        return (rw.add_parameter(f"{path}.lora_A.{name}.weight", a, f"base_model.model.{path}.lora_A.weight"),
                rw.add_parameter(f"{path}.lora_B.{name}.weight", b, f"base_model.model.{path}.lora_B.weight"))

    def _lora_bias(self, rw: Rewriter, path: str, r: int, out: int, like: torch.Tensor) -> Optional[fx.Node]:
        """PEFT's lora_bias: lora_B has a bias (zero unless init_lora_weights=False, then nn.Linear's init)."""
        if not self.config.lora_bias:
            return None
        bias = nn.Linear(r, out).bias.data
        if self.config.init_lora_weights is not False:
            nn.init.zeros_(bias)
        bias = bias.to(device=like.device, dtype=like.dtype if like.is_floating_point() else torch.float32)
        return rw.get_param(rw.add_parameter(f"{path}.lora_B.{self.adapter_name}.bias", bias,
                                             f"base_model.model.{path}.lora_B.bias"))

    def _magnitude(self, rw: Rewriter, path: str, value: torch.Tensor) -> str:
        """DoRA's magnitude at PEFT's name (``lora_magnitude_vector.<adapter>.weight``)."""
        return rw.add_parameter(f"{path}.lora_magnitude_vector.{self.adapter_name}.weight", value,
                                f"base_model.model.{path}.lora_magnitude_vector")

    def _dropout(self, rw: Rewriter, x: fx.Node) -> fx.Node:
        p = float(self.config.lora_dropout)
        return rw.call(aten.dropout.default, x, p, rw.gm.training) if p else x

    def _starting_pair(self, rw: Rewriter, site: Site, r: int, scale: float, weight: torch.Tensor,
                       rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B as PEFT starts them; PiSSA / OLoRA also leave the graph's weight the residual."""
        init = self.config.init_lora_weights
        if not is_decomposing(init):
            return init_pair(init, r, site.in_features, site.out_features, weight)
        a_attr = f"{site.module_path}.lora_A.{self.adapter_name}.weight"
        if has_attr(rw.gm, a_attr):      # a module called twice: decomposed at its first site
            return get_attr_path(rw.gm, a_attr).data, get_attr_path(rw.gm, a_attr.replace(".lora_A.", ".lora_B.")).data
        if not weight.dtype.is_floating_point:
            raise GraphPeftError(f"init_lora_weights={init!r} needs a float32/float16/bfloat16 weight at "
                                 f"{site.module_path}, got {weight.dtype}")
        init_pair(False, r, site.in_features, site.out_features, weight)   # PEFT's nn.Linear pair: same random stream
        a, b = decompose(init, rows, r, scale)
        residual = rows.detach().float() - scale * (b @ a)
        if site.kind in ("addmm", "mm"):
            residual = residual.T
        rw.replace_parameter(site.weight_name, residual.to(weight.dtype).contiguous())
        return a.to(weight.dtype), b.to(weight.dtype)

    def _linear(self, rw: Rewriter, site: Site, r: int, scale: float, weight: torch.Tensor) -> None:
        in_out = site.kind in ("addmm", "mm")
        a, b = self._starting_pair(rw, site, r, scale, weight, weight.T if in_out else weight)
        a_attr, b_attr = self._add_pair(rw, site.module_path, a, b)
        x = site.node.args[1] if site.kind == "addmm" else site.node.args[0]
        # activations in another dtype than the adapter (a quantized base keeps it in float32, PEFT's dtype there;
        # a weight cast on its way to the matmul): x cast in before the dropout, the branch cast out, as PEFT's
        # LoRA layer does
        act = getattr(site.node.meta.get("val"), "dtype", None)
        cast = act is not None and act != a.dtype
        if cast and self.config.use_dora:
            raise GraphPeftError(f"use_dora at {site.module_path}: its weight is cast to {act} on its way to the "
                                 f"matmul; DoRA's weight norm is not defined across the cast, use plain LoRA there")
        if cast:
            x = rw.call(aten._to_copy.default, x, dtype=a.dtype)
        x = self._dropout(rw, x)
        h = rw.call(aten.linear.default, x, rw.get_param(a_attr))
        if not self.config.use_dora:
            bias = self._lora_bias(rw, site.module_path, r, site.out_features, weight)
            h = rw.call(aten.linear.default, h, rw.get_param(b_attr), *([bias] if bias is not None else []))
            h = rw.call(aten.mul.Tensor, h, scale)
            out = rw.call(aten.add.Tensor, site.node, rw.call(aten._to_copy.default, h, dtype=act) if cast else h)
        else:
            w_now = get_attr_path(rw.gm, site.weight_name)
            w = weight_node(rw, site)
            dropped = None
            if self.config.lora_dropout:
                dropped = rw.call(aten.mm.default, x, w) if in_out else rw.call(aten.linear.default, x, w)
            out = self._dora(rw, site, h, a_attr, b_attr, scale, rw.call(aten.t.default, w) if in_out else w,
                             w_now.T if in_out else w_now, (site.out_features,), aten.linear.default, dropped)
        rw.replace_uses(site.node, out)

    def _dora(self, rw: Rewriter, site: Site, h: fx.Node, a_attr: str, b_attr: str, scale: float, rows: fx.Node,
              rows_now: torch.Tensor, shape: tuple[int, ...], second: object, dropped: Optional[fx.Node]) -> fx.Node:
        """DoRA's output from ``h`` = A's output: the magnitude, m / n, the branch through B' (passes/lora_dora.py)."""
        a_now, b_now = get_attr_path(rw.gm, a_attr), get_attr_path(rw.gm, b_attr)
        magnitude = self._magnitude(rw, site.module_path, initial_magnitude(rows_now, a_now, b_now, scale, shape))
        flat, mns = norm_scale(rw, rows, a_attr, b_attr, scale, magnitude, shape)
        b_scaled = scaled_b(rw, rw.get_param(b_attr), flat, scale, b_now.dim())
        base_bias = bias_node(rw, site) if dropped is None else None
        correction = None if base_bias is None else bias_correction(rw, base_bias, flat)
        if second is aten.matmul.default:       # embedding: (A^T[ids]) B'^T
            branch = rw.call(second, h, rw.call(aten.t.default, b_scaled))
        else:
            branch = rw.call(second, h, b_scaled, *([correction] if correction is not None else []))
        return combine(rw, site.node, branch, mns, dropped)

    def _embedding(self, rw: Rewriter, site: Site, r: int, scale: float, weight: torch.Tensor) -> None:
        path, name = site.module_path, self.adapter_name
        num, dim = site.in_features, site.out_features
        a, b = torch.randn(r, num), torch.randn(dim, r)          # PEFT: randn, then init A=0, B=normal
        if self.config.init_lora_weights is not False:            # (PiSSA / OLoRA too: PEFT's embedding ignores them)
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
        if not self.config.use_dora:
            b_t = rw.call(aten.t.default, rw.get_param(b_attr))
            h = rw.call(aten.mul.Tensor, rw.call(aten.matmul.default, h, b_t), scale)
            out = rw.call(aten.add.Tensor, node, h)
        else:      # rows of the transposed table [dim, num]: one norm per embedding dimension
            rows = rw.call(aten.t.default, weight_node(rw, site))
            out = self._dora(rw, site, h, a_attr, b_attr, scale, rows, weight.T, (dim,), aten.matmul.default, None)
        rw.replace_uses(node, out)

    def _conv(self, rw: Rewriter, site: Site, r: int, scale: float, weight: torch.Tensor) -> None:
        """PEFT's lora.Conv: A is a conv with the base kernel, stride and padding; B a 1x1 conv."""
        kernel, conv = tuple(weight.shape[2:]), site.node.target
        a_lin, b_lin = init_pair(self.config.init_lora_weights, r, site.in_features * math.prod(kernel),
                                  site.out_features, weight)
        a = a_lin.reshape(r, site.in_features, *kernel)
        b = b_lin.reshape(site.out_features, r, *([1] * len(kernel)))
        a_attr, b_attr = self._add_pair(rw, site.module_path, a, b)
        args = conv_args(site.node)
        x = self._dropout(rw, site.node.args[0])
        h = rw.call(conv, x, rw.get_param(a_attr), None, args["stride"], args["padding"])
        if not self.config.use_dora:
            bias = self._lora_bias(rw, site.module_path, r, site.out_features, weight)
            h = rw.call(conv, h, rw.get_param(b_attr), *([bias] if bias is not None else []))
            out = rw.call(aten.add.Tensor, site.node, rw.call(aten.mul.Tensor, h, scale))
        else:
            shape = (1, site.out_features) + (1,) * len(kernel)      # PEFT's magnitude shape for convolutions
            w = weight_node(rw, site)
            dropped = None
            if self.config.lora_dropout:
                dropped = rw.call(conv, x, w, None, args["stride"], args["padding"], args["dilation"], args["groups"])
            rows = rw.call(aten.reshape.default, w, [site.out_features, -1])
            out = self._dora(rw, site, h, a_attr, b_attr, scale, rows, weight.reshape(site.out_features, -1), shape,
                             conv, dropped)
        rw.replace_uses(site.node, out)

    def _parameter_site(self, rw: Rewriter, site: Site, r: int, scale: float, weight: torch.Tensor) -> None:
        """W -> W + s * B A inside the op (PEFT's ParamWrapper); for W [E, out, in], A [r*E, in], B [out, r*E] and
        expert e's delta is B[:, k*E + e] A[e*r + k] summed over k (PEFT's einsum "o r e, e r i -> e o i")."""
        experts = weight.shape[0] if weight.dim() == 3 else 1
        a, b = init_pair(self.config.init_lora_weights, r * experts, site.in_features, site.out_features, weight, r)
        a_attr, b_attr = self._add_pair(rw, wrapper_path(rw.gm, site, self.config), a, b)
        reader = weight_reader(site)        # the op, or the transpose / view / cast of W on its way there
        rw.start_before(reader)
        b_node, a_node = rw.get_param(b_attr), rw.get_param(a_attr)
        if experts == 1:
            delta = rw.call(aten.mm.default, b_node, a_node)
        else:
            b_node = rw.call(aten.reshape.default, b_node, [site.out_features, r, experts])
            a_node = rw.call(aten.reshape.default, a_node, [experts, r, site.in_features])
            delta = rw.call(aten.einsum.default, "ore,eri->eoi", [b_node, a_node])
        delta = rw.call(aten.mul.Tensor, delta, scale)
        patched = rw.call(aten.add.Tensor, site.weight, delta)
        rw.replace_input(reader, site.weight, patched)

    merged_weights = staticmethod(merged_weights)        # passes/lora_merge.py


class LoraPass(RulePass):
    """torch.fx pass: ``LoraPass(LoraConfig(...))(graph_module) -> PassResult``."""

    rule_cls = LoraRule

    @staticmethod
    def convert_for_initial_model(state: dict, initial: dict, config: dict) -> tuple[dict, dict]:
        """PEFT's path_initial_model_for_weight_conversion: a PiSSA / OLoRA adapter as plain LoRA of rank 2r."""
        return converted_state(state, initial), converted_config(config)


register_method("lora", LoraConfig, LoraPass, "low-rank adapters on weight ops (PEFT LoRA)")
