"""AdaLoRA: LoRA in SVD form whose ranks are pruned by importance during training (PEFT's semantics).

Maths (PEFT's adalora.SVDLinear): with W [out, in], right vectors A [r, in], singular values
E [r, 1], left vectors B [out, r], s = lora_alpha and the buffer-like ``ranknum`` = init_r,

    y = W x + b   ->   y = W x + b + ((dropout(x) (A * E)^T) B^T) * s / (ranknum + 1e-5)

Training prunes triplets (A_i, E_i, B_i) by zeroing E_i; the schedule and scores are PEFT's
RankAllocator (passes/adalora_allocator.py, reached through the pass's ``update_and_allocate`` hook). Conv2d sites (groups 1) add ``conv2d(dropout(x), ΔW)``
with ΔW = (B (A * E) * s / (ranknum + 1e-5)).reshape(W.shape), as PEFT's SVDConv2d.

before:                  after (linear; GPT-2's addmm and mm alike):
    x ─ linear(W, b) ─ y     x ─ linear(W, b) ────────────────────────────────────────────────────────┬─ add ─ y
                             └ dropout ─ matmul((A*E)^T) ─ matmul(B^T) ─ mul(s) ─ div(ranknum + 1e-5) ┘

Parameters live at PEFT's in-memory names (``<path>.lora_A.<adapter>``, ``lora_B``, ``lora_E``, and
the frozen ``ranknum``); the file keys are PEFT's: ``base_model.model.<path>.lora_A`` (no ``.weight``),
``lora_B``, ``lora_E``; ranknum is not saved. ``rank_pattern`` maps ``<path>.lora_E`` to the kept
triplets; a pruned adapter is saved pruned and rewritten at its allocated ranks, as PEFT loads one.

``shrink_to_lora(model)`` turns an allocated adapter into plain LoRA (peft_type LORA) of the kept
ranks, with the same outputs; it is the ``export_form`` hook of ``AdaLoraPass``, which ONNX export and
``graphpeft.runtime.svd_to_lora.save_as_lora(model, folder)`` (PEFT's files) use. The config is in
passes/adalora_config.py.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from graphpeft.engine.errors import GraphPeftError
from graphpeft.engine.match import LINEAR_KINDS, Site, attention_input_projections, select_sites
from graphpeft.engine.registry import register_method, register_rule
from graphpeft.engine.result import Rewrite
from graphpeft.engine.rewriter import Rewriter, get_attr_path
from graphpeft.engine.rule import Rule, RulePass
from graphpeft.passes.adalora_allocator import progress, triplets, update_and_allocate
from graphpeft.passes.adalora_config import RULE, AdaLoraConfig, kept_rows, rank_mask

aten = torch.ops.aten
SITE_KINDS = LINEAR_KINDS + ("conv",)
RANKNUM_EPS = 1e-5          # PEFT divides by ranknum + 1e-5
__all__ = ["AdaLoraConfig", "AdaLoraPass", "AdaLoraRule", "shrink_to_lora"]


# -- the rule -----------------------------------------------------------------------------------------

@register_rule
class AdaLoraRule(Rule):
    __doc__ = __doc__
    name = RULE

    def sites(self, gm: fx.GraphModule) -> list[Site]:
        cfg = self.config
        targeted = cfg.target_modules or cfg.target_parameters
        default = () if targeted else attention_input_projections(gm, ("query", "value"))
        return select_sites(gm, cfg, SITE_KINDS, default_paths=default)

    def check(self, site: Site) -> Optional[str]:
        if site.kind == "conv":
            args = _conv_args(site.node)
            if site.node.target is not aten.conv2d.default:
                return "AdaLoRA supports Conv2d but not other convolutions (PEFT's SVDConv2d)"
            if args["groups"] != 1 or any(d != 1 for d in args["dilation"]) or isinstance(args["padding"], str):
                return "grouped, dilated or string-padded convolutions are not supported"
        return None

    def rewrite(self, gm: fx.GraphModule, site: Site) -> Rewrite:
        cfg, adapter, path = self.config, self.adapter_name, site.module_path
        weight = get_attr_path(gm, site.weight_name)
        mask = rank_mask(cfg, path, adapter)
        r = sum(mask) if mask is not None else cfg.init_r
        ranknum = float(cfg.init_r) if r > 0 else 0.0    # PEFT keeps the old ranknum when it resizes on load
        fin = site.in_features * (math.prod(weight.shape[2:]) if site.kind == "conv" else 1)
        a, e, b, rn = _init_triplets(cfg.init_lora_weights, r, fin, site.out_features, ranknum, weight)
        rw = Rewriter(gm, self.name, site.node, path, site.kind, adapter=adapter)
        key = f"base_model.model.{path}"
        attrs = {name: rw.add_parameter(f"{path}.{name}.{adapter}", t, f"{key}.{name}")
                 for name, t in (("lora_A", a), ("lora_B", b), ("lora_E", e))}
        attrs["ranknum"] = rw.add_parameter(f"{path}.ranknum.{adapter}", rn, requires_grad=False)
        scale = cfg.scaling
        ae = rw.call(aten.mul.Tensor, rw.get_param(attrs["lora_A"]), rw.get_param(attrs["lora_E"]))
        if site.kind == "conv":
            x = self._dropout(rw, site.node.args[0])
            delta = rw.call(aten.mm.default, rw.get_param(attrs["lora_B"]), ae)
            delta = self._scaled(rw, delta, scale, attrs["ranknum"])
            delta = rw.call(aten.reshape.default, delta, list(weight.shape))
            args = _conv_args(site.node)
            h = rw.call(aten.conv2d.default, x, delta, None, args["stride"], args["padding"], args["dilation"], 1)
        else:
            x = site.node.args[1] if site.kind == "addmm" else site.node.args[0]
            # activations in another dtype than the triplets (a quantized base keeps them in float32, as PEFT; a
            # weight cast on its way): x cast in before the dropout, the branch cast back before its scaling, and
            # the sum stored in the activation's dtype (PEFT's in-place add)
            act = getattr(site.node.meta.get("val"), "dtype", None)
            act = act if act is not None and act != a.dtype else None
            x = self._dropout(rw, rw.call(aten._to_copy.default, x, dtype=a.dtype) if act else x)
            h = rw.call(aten.matmul.default, x, rw.call(aten.t.default, ae))
            h = rw.call(aten.matmul.default, h, rw.call(aten.t.default, rw.get_param(attrs["lora_B"])))
            h = self._scaled(rw, rw.call(aten._to_copy.default, h, dtype=act) if act else h, scale, attrs["ranknum"])
        out = rw.call(aten.add.Tensor, site.node, h)
        if site.kind != "conv" and act:
            out = rw.call(aten._to_copy.default, out, dtype=act)
        rw.replace_uses(site.node, out)
        return rw.record(r=r, init_r=cfg.init_r, lora_alpha=cfg.lora_alpha, scaling=scale, weight=site.weight_name,
                         layout="in_out" if site.kind in ("addmm", "mm") else "out_in",
                         **{f"{k}_attr": v for k, v in attrs.items()})

    def _dropout(self, rw: Rewriter, x: fx.Node) -> fx.Node:
        p = float(self.config.lora_dropout)
        return rw.call(aten.dropout.default, x, p, rw.gm.training) if p else x

    @staticmethod
    def _scaled(rw: Rewriter, h: fx.Node, scale: float, ranknum_attr: str) -> fx.Node:
        """``h * s / (ranknum + 1e-5)``, in PEFT's order of operations."""
        h = rw.call(aten.mul.Tensor, h, scale)
        denom = rw.call(aten.add.Tensor, rw.get_param(ranknum_attr), RANKNUM_EPS)
        return rw.call(aten.div.Tensor, h, denom)

    @classmethod
    def merged_weights(cls, gm: fx.GraphModule, record: Rewrite) -> dict[str, torch.Tensor]:
        info = record.info
        weight = get_attr_path(gm, info["weight"]).detach()
        a, b, e, rn = (get_attr_path(gm, info[f"{n}_attr"]).detach() for n in ("lora_A", "lora_B", "lora_E", "ranknum"))
        delta = (b @ (a * e)) * float(info["scaling"]) / (rn + RANKNUM_EPS)
        delta = delta.T if info["layout"] == "in_out" else delta.reshape(weight.shape)
        return {info["weight"]: (weight + delta).to(weight.dtype)}


def _init_triplets(init: Any, r: int, fin: int, fout: int, ranknum: float, weight: torch.Tensor):
    """A [r, in], E [r, 1], B [out, r], ranknum [1], drawn in PEFT's order (randn, then reset when init)."""
    a, e, b = torch.randn(r, fin), torch.randn(r, 1), torch.randn(fout, r)
    rn = torch.randn(1).fill_(ranknum)
    if init:                                   # PEFT: any truthy init_lora_weights resets the same way
        nn.init.zeros_(e)
        nn.init.normal_(a, mean=0.0, std=0.02)
        nn.init.normal_(b, mean=0.0, std=0.02)
    dtype = weight.dtype if weight.is_floating_point() else torch.float32
    return tuple(t.to(device=weight.device, dtype=dtype) for t in (a, e, b, rn))


def _conv_args(node: fx.Node) -> dict:
    names, defaults = ("stride", "padding", "dilation", "groups"), ([1, 1], [0, 0], [1, 1], 1)
    return {n: (node.args[3 + i] if len(node.args) > 3 + i else node.kwargs.get(n, d))
            for i, (n, d) in enumerate(zip(names, defaults))}


# -- the pass, and the training-time hooks the engine calls ---------------------------------------------

class AdaLoraPass(RulePass):
    """torch.fx pass: ``AdaLoraPass(AdaLoraConfig(...))(graph_module) -> PassResult``.

    The class methods below are the hooks GraphPeftModel calls for an AdaLoRA adapter.
    """

    rule_cls = AdaLoraRule
    update_and_allocate = staticmethod(update_and_allocate)     # passes/adalora_allocator.py
    progress = staticmethod(progress)

    @staticmethod
    def loss_term(model: Any, adapter_name: str, config: AdaLoraConfig) -> Optional[torch.Tensor]:
        """PEFT's orthogonality regulariser: w * mean over A, B of ||A A^T - I||_F, ||B^T B - I||_F."""
        if config.inference_mode:
            return None
        gm, terms = model.graph_module, []
        for site in triplets(model, adapter_name):
            for attr, is_a in ((site.a, True), (site.b, False)):
                p = get_attr_path(gm, attr)
                cov = p @ p.T if is_a else p.T @ p
                eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
                terms.append(torch.norm(cov - eye, p="fro"))
        if not terms:
            return None
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        return config.orth_reg_weight * (total / len(terms))

    @staticmethod
    def saved_state(model: Any, adapter_name: str, config: AdaLoraConfig,
                    state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT's resize_state_dict_by_rank_pattern: the file holds only the kept triplets."""
        if not config.rank_pattern:
            return state
        state = dict(state)
        for site in triplets(model, adapter_name):
            mask = rank_mask(config, site.path, adapter_name)
            key = f"base_model.model.{site.path}"
            if mask is None or f"{key}.lora_E" not in state:
                continue
            rows = kept_rows(mask, state[f"{key}.lora_E"].shape[0])
            if rows is None:
                continue
            idx = torch.tensor(rows, dtype=torch.bool)
            state[f"{key}.lora_A"] = state[f"{key}.lora_A"][idx].contiguous()
            state[f"{key}.lora_E"] = state[f"{key}.lora_E"][idx].contiguous()
            state[f"{key}.lora_B"] = state[f"{key}.lora_B"][:, idx].contiguous()
        return state

    @staticmethod
    def export_form(model: Any, adapter_name: str,
                    config: AdaLoraConfig) -> Optional[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
        """What ONNX export writes instead: plain LoRA of the allocated ranks (``shrink_to_lora``).

        Same outputs, no E or ranknum, pruned triplets and rank-0 sites gone; the edge trains that LoRA
        (without the orthogonality regulariser, which constrains the SVD form only).
        """
        return shrink_to_lora(model, adapter_name)


register_method("adalora", AdaLoraConfig, AdaLoraPass, "SVD-form LoRA with a rank budget allocated in training "
                                                        "(PEFT AdaLoRA; needs --total-step)")


# -- shrinking an allocated adapter to plain LoRA -----------------------------------------------------------

def _adapter(model: Any, adapter_name: Optional[str]) -> tuple[str, AdaLoraConfig]:
    name = adapter_name or model.active_adapter
    config = model.peft_config.get(name)
    if not isinstance(config, AdaLoraConfig):
        raise GraphPeftError(f"adapter {name!r} is not an AdaLoRA adapter; shrink_to_lora needs one")
    return name, config


def shrink_to_lora(model: Any, adapter_name: Optional[str] = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config dict, {key: tensor}) of plain LoRA (peft_type LORA) with the allocated ranks per site.

    Per site, kept triplets (rank_pattern; all when none was allocated) give A' = (A * E)[kept],
    B' = B[:, kept]; rank_pattern[path] = r' and alpha_pattern[path] = r' * lora_alpha / (ranknum + 1e-5),
    so LoRA's alpha / r equals AdaLoRA's lora_alpha / (ranknum + 1e-5). Sites with no kept rank are
    dropped (they add nothing). Loads with graphpeft.from_pretrained and with PEFT as LoRA.
    """
    name, config = _adapter(model, adapter_name)
    gm = model.graph_module
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    conv1d_only = True
    for site in triplets(model, name):
        a, e, b = (t.detach() for t in site.tensors(gm))
        rows = kept_rows(rank_mask(config, site.path, name), a.shape[0])
        if rows is not None:
            idx = torch.tensor(rows, dtype=torch.bool, device=a.device)
            a, e, b = a[idx], e[idx], b[:, idx]
        r = a.shape[0]
        if r == 0:
            continue
        weight = get_attr_path(gm, site.weight)
        a_new, b_new = a * e, b
        if site.kind == "conv":
            a_new = a_new.reshape(r, *weight.shape[1:])
            b_new = b_new.reshape(b.shape[0], r, 1, 1)
        key = f"base_model.model.{site.path}"
        tensors[f"{key}.lora_A.weight"] = a_new.contiguous().cpu()
        tensors[f"{key}.lora_B.weight"] = b_new.contiguous().cpu()
        ranknum = (get_attr_path(gm, site.ranknum).detach() + RANKNUM_EPS).item()
        ranks[site.path] = r
        alphas[site.path] = r * config.scaling / ranknum
        conv1d_only = conv1d_only and site.kind in ("addmm", "mm")
    if not ranks:
        raise GraphPeftError("every site of the adapter has rank 0 after allocation: there is no LoRA to write")
    for rec in model.records:           # modules trained in full (modules_to_save, a classifier head)
        if rec.adapter == name and rec.rule != RULE:
            for attr, key in rec.saved_keys.items():
                tensors[key] = get_attr_path(gm, attr).detach().contiguous().cpu()
    first = next(iter(ranks))
    info = getattr(model, "capture_info", None)
    lora = {
        "peft_type": "LORA", "task_type": config.task_type, "inference_mode": True,
        "base_model_name_or_path": config.base_model_name_or_path or getattr(info, "name_or_path", None),
        "revision": config.revision, "r": ranks[first], "lora_alpha": alphas[first], "lora_dropout": config.lora_dropout,
        "target_modules": sorted(ranks), "exclude_modules": None, "target_parameters": None,
        "layers_to_transform": None, "layers_pattern": None, "modules_to_save": config.modules_to_save,
        "rank_pattern": ranks, "alpha_pattern": alphas, "fan_in_fan_out": conv1d_only, "bias": "none",
        "use_rslora": False, "init_lora_weights": True,
    }
    return lora, tensors
