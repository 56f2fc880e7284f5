"""AdaLoRA: LoRA in SVD form whose ranks are pruned by importance during training (PEFT's semantics).

Maths (PEFT's adalora.SVDLinear): with W [out, in], right vectors A [r, in], singular values
E [r, 1], left vectors B [out, r], s = lora_alpha and the buffer-like ``ranknum`` = init_r,

    y = W x + b   ->   y = W x + b + ((dropout(x) (A * E)^T) B^T) * s / (ranknum + 1e-5)

Training prunes triplets (A_i, E_i, B_i) by zeroing E_i; the schedule and scores are PEFT's
RankAllocator (see ``RankAllocator`` below). Conv2d sites (groups 1) add ``conv2d(dropout(x), ΔW)``
with ΔW = (B (A * E) * s / (ranknum + 1e-5)).reshape(W.shape), as PEFT's SVDConv2d.

before:                  after (linear; GPT-2's addmm and mm alike):
    x ─ linear(W, b) ─ y     x ─ linear(W, b) ────────────────────────────────────────────────────────┬─ add ─ y
                             └ dropout ─ matmul((A*E)^T) ─ matmul(B^T) ─ mul(s) ─ div(ranknum + 1e-5) ┘

Parameters live at PEFT's in-memory names (``<path>.lora_A.<adapter>``, ``lora_B``, ``lora_E``, and
the frozen ``ranknum``); the file keys are PEFT's: ``base_model.model.<path>.lora_A`` (no ``.weight``),
``lora_B``, ``lora_E``; ranknum is not saved. ``rank_pattern`` maps ``<path>.lora_E`` to the kept
triplets; a pruned adapter is saved pruned and rewritten at its allocated ranks, as PEFT loads one.

``shrink_to_lora(model)`` turns an allocated adapter into plain LoRA (peft_type LORA) of the kept
ranks, with the same outputs; ``save_as_lora(model, folder)`` writes it in PEFT's format, and ONNX
export uses it (the ``export_form`` hook of ``AdaLoraPass``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.fx as fx
from torch import nn

from graphpeft.engine.config import TargetingConfig
from graphpeft.engine.errors import GraphPeftError
from graphpeft.engine.match import LINEAR_KINDS, Site, attention_input_projections, select_sites
from graphpeft.engine.registry import register_method, register_rule
from graphpeft.engine.result import Rewrite
from graphpeft.engine.rewriter import Rewriter, get_attr_path
from graphpeft.engine.rule import Rule, RulePass

aten = torch.ops.aten
RULE = "adalora"
SITE_KINDS = LINEAR_KINDS + ("conv",)
RANKNUM_EPS = 1e-5          # PEFT divides by ranknum + 1e-5


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass
class AdaLoraConfig(TargetingConfig):
    """PEFT's AdaLoraConfig fields and defaults (LoRA's targeting fields plus the budget schedule)."""

    peft_type = "ADALORA"
    unsupported_fields = ("use_dora", "lora_bias", "layer_replication", "loftq_config", "eva_config",
                          "corda_config", "trainable_token_indices", "alora_invocation_tokens",
                          "arrow_config", "kasa_config", "velora_config", "monteclora_config")

    target_r: int = field(default=8, metadata={"cli": "--target-r", "help": "average rank left after allocation"})
    init_r: int = field(default=12, metadata={"cli": "--init-r", "help": "rank of every site before allocation"})
    tinit: int = field(default=0, metadata={"cli": "--tinit", "help": "warm-up steps before pruning"})
    tfinal: int = field(default=0, metadata={"cli": "--tfinal", "help": "final steps with the ranks fixed"})
    deltaT: int = field(default=1, metadata={"cli": "--delta-t", "help": "steps between two allocations"})
    beta1: float = field(default=0.85, metadata={"cli": "--beta1", "help": "EMA factor of the sensitivity"})
    beta2: float = field(default=0.85, metadata={"cli": "--beta2", "help": "EMA factor of the uncertainty"})
    orth_reg_weight: float = field(default=0.5, metadata={"cli": "--orth-reg-weight",
                                                          "help": "weight of the orthogonality loss"})
    total_step: Optional[int] = field(default=None, metadata={
        "cli": "--total-step", "help": "number of training steps, required ('train' counts them when not given)"})
    rank_pattern: Optional[dict] = None
    r: int = 8                                  # PEFT's LoRA field; not used by AdaLoRA (init_r is)
    lora_alpha: float = field(default=8, metadata={"cli": "--alpha", "help": "scaling numerator (alpha / ranknum)"})
    lora_dropout: float = field(default=0.0, metadata={"cli": "--dropout", "help": "dropout on the adapter input"})
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    alpha_pattern: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.total_step is None or not _is_int(self.total_step, 1):
            raise GraphPeftError(f"AdaLoRA needs total_step, the number of training steps (an integer > 0), got "
                                 f"{self.total_step!r}; set total_step (--total-step)")
        for name, low in (("init_r", 1), ("target_r", 1), ("tinit", 0), ("tfinal", 0), ("deltaT", 1)):
            if not _is_int(getattr(self, name), low):
                raise GraphPeftError(f"{name} must be an integer >= {low}, got {getattr(self, name)!r}")
        if self.target_r > self.init_r:
            raise GraphPeftError(f"target_r={self.target_r} is larger than init_r={self.init_r}: the allocator only "
                                 f"prunes ranks; choose target_r <= init_r")
        if self.tinit >= self.total_step - self.tfinal:
            raise GraphPeftError(f"tinit={self.tinit} and tfinal={self.tfinal} leave no budgeting phase in "
                                 f"total_step={self.total_step} steps (PEFT needs tinit < total_step - tfinal); "
                                 f"decrease tinit/tfinal or increase total_step")
        for name in ("beta1", "beta2"):
            if not 0.0 < float(getattr(self, name)) < 1.0:
                raise GraphPeftError(f"{name} must be in (0, 1), got {getattr(self, name)!r}")
        if float(self.orth_reg_weight) < 0:
            raise GraphPeftError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise GraphPeftError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias != "none":
            raise GraphPeftError(f"bias={self.bias!r} is not supported yet; use bias='none'")
        if self.use_rslora or self.alpha_pattern:
            raise GraphPeftError("AdaLoRA scales every site by lora_alpha / ranknum; use_rslora and alpha_pattern "
                                 "have no effect (PEFT ignores them): remove them")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise GraphPeftError("layers_to_transform cannot be used when target_modules is a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise GraphPeftError("layers_pattern needs layers_to_transform too")
        for key, mask in (self.rank_pattern or {}).items():
            if not isinstance(mask, list) or any(not isinstance(v, (bool, int)) for v in mask):
                raise GraphPeftError(f"rank_pattern[{key!r}] must be a list of booleans (the kept triplets), "
                                     f"got {mask!r}")
        if self.r != 8:
            warnings.warn("r is not used by AdaLoRA and is ignored; set the initial rank with init_r", stacklevel=3)

    def for_loading(self) -> "AdaLoraConfig":
        return dataclasses.replace(self, init_lora_weights=False)    # the file's weights replace the init

    def to_dict(self) -> dict[str, Any]:
        """As PEFT saves it: rank_pattern keys without the adapter name (``<path>.lora_E``)."""
        data = super().to_dict()
        if self.rank_pattern:
            data["rank_pattern"] = {_file_key(k): [bool(v) for v in mask] for k, mask in self.rank_pattern.items()}
        return data

    @property
    def scaling(self) -> float:
        """PEFT: ``lora_alpha if lora_alpha > 0 else r``, then divided by ranknum in the forward."""
        return float(self.lora_alpha) if self.lora_alpha > 0 else float(self.init_r)


def _file_key(key: str) -> str:
    """``<path>.lora_E.<adapter>`` -> ``<path>.lora_E`` (PEFT strips the adapter name when it saves)."""
    head, sep, _ = key.rpartition(".lora_E")
    return head + sep if sep else key


def _rank_mask(config: AdaLoraConfig, path: str, adapter: str) -> Optional[list[bool]]:
    pattern = config.rank_pattern or {}
    for key in (f"{path}.lora_E.{adapter}", f"{path}.lora_E"):
        if key in pattern:
            return [bool(v) for v in pattern[key]]
    return None


def _kept_rows(mask: Optional[list[bool]], rows: int) -> Optional[list[bool]]:
    """Row selector of a site's tensors by its rank_pattern mask; None keeps every row.

    A site rewritten at its allocated rank (loaded pruned) already holds only the kept rows.
    """
    if mask is None or rows == sum(mask):
        return None
    if rows == len(mask):
        return mask
    raise GraphPeftError(f"rank_pattern has {len(mask)} entries ({sum(mask)} kept) for a site of rank {rows}; "
                         f"the adapter does not fit its config")


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
        mask = _rank_mask(cfg, path, adapter)
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


# -- the sites of one adapter, as the allocator sees them --------------------------------------------

@dataclass(frozen=True)
class Triplet:
    """One adapted module: attribute paths of its A, E, B and ranknum (shared when called twice)."""

    path: str
    a: str
    e: str
    b: str
    ranknum: str
    weight: str
    kind: str
    init_r: int

    def tensors(self, gm: fx.GraphModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return get_attr_path(gm, self.a), get_attr_path(gm, self.e), get_attr_path(gm, self.b)


def triplets(model: Any, adapter_name: str) -> list[Triplet]:
    """The AdaLoRA sites of ``adapter_name`` in graph order, one per module (a module called twice is one)."""
    seen, out = set(), []
    for rec in model.records:
        if rec.rule != RULE or rec.adapter != adapter_name or rec.info["lora_A_attr"] in seen:
            continue
        seen.add(rec.info["lora_A_attr"])
        out.append(Triplet(rec.module_path, rec.info["lora_A_attr"], rec.info["lora_E_attr"], rec.info["lora_B_attr"],
                           rec.info["ranknum_attr"], rec.info["weight"], rec.kind, int(rec.info["init_r"])))
    return out


# -- PEFT's RankAllocator ---------------------------------------------------------------------------------

class RankAllocator:
    """Importance-driven rank budget, PEFT's RankAllocator step for step.

    For every entry p of A, E, B after backward():  I = |p * grad|,
        sensitivity  Ī <- beta1 Ī + (1 - beta1) I,    uncertainty  Ū <- beta2 Ū + (1 - beta2) |I - Ī|,
    element score Ī * Ū; triplet i scores  S_E[i] + mean_j S_A[i, j] + mean_j S_B[j, i].
    Budget (total kept ranks) at step t: init_bgt until tinit, then the cubic
        target_bgt + (init_bgt - target_bgt) (1 - (t - tinit) / (total_step - tfinal - tinit))^3,
    every deltaT steps the triplets scoring at or below the (init_bgt - budget)-th score get E_i = 0;
    at total_step - tfinal the mask is fixed (config.rank_pattern) and re-applied on every later step.
    """

    def __init__(self, model: Any, adapter_name: str, config: AdaLoraConfig):
        self.adapter_name, self.config = adapter_name, config
        self.sites = triplets(model, adapter_name)
        gm = model.graph_module
        self.init_bgt = sum(get_attr_path(gm, t.a).shape[0] for t in self.sites)
        self.target_bgt = config.target_r * len(self.sites)
        self.fixed = any(get_attr_path(gm, t.a).shape[0] != t.init_r for t in self.sites)   # loaded pruned
        self.budget = self.init_bgt
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        cfg = self.config
        if step <= cfg.tinit:
            return self.init_bgt, False
        if step > cfg.total_step - cfg.tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - cfg.tinit) / (cfg.total_step - cfg.tfinal - cfg.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff ** 3) + self.target_bgt)
        return budget, step % cfg.deltaT == 0

    def update_ipt(self, gm: fx.GraphModule) -> None:
        beta1, beta2 = self.config.beta1, self.config.beta2
        for site in self.sites:
            for attr in (site.a, site.e, site.b):
                p = get_attr_path(gm, attr)
                if p.grad is None:
                    raise GraphPeftError(f"{attr} has no gradient: call update_and_allocate(step) after "
                                         f"loss.backward() and before zero_grad()")
                if attr not in self.ipt:
                    self.ipt[attr] = torch.zeros_like(p)
                    self.exp_avg_ipt[attr] = torch.zeros_like(p)
                    self.exp_avg_unc[attr] = torch.zeros_like(p)
                with torch.no_grad():
                    self.ipt[attr] = (p * p.grad).abs().detach()
                    self.exp_avg_ipt[attr] = beta1 * self.exp_avg_ipt[attr] + (1 - beta1) * self.ipt[attr]
                    self.exp_avg_unc[attr] = (beta2 * self.exp_avg_unc[attr]
                                              + (1 - beta2) * (self.ipt[attr] - self.exp_avg_ipt[attr]).abs())

    def _score(self, attr: str) -> torch.Tensor:
        return self.exp_avg_ipt[attr] * self.exp_avg_unc[attr]

    def mask_to_budget(self, gm: fx.GraphModule, budget: int) -> dict[str, list[bool]]:
        scores = {}
        for site in self.sites:
            ipt_a = torch.mean(self._score(site.a), dim=1, keepdim=True)
            ipt_b = torch.mean(self._score(site.b), dim=0, keepdim=False).view(-1, 1)
            ipt_ab = torch.cat([ipt_a, ipt_b], dim=1).sum(dim=1, keepdim=False)
            scores[site.e] = (self._score(site.e).view(-1) + ipt_ab.view(-1)).view(-1, 1)
        k = self.init_bgt - budget
        # PEFT calls kthvalue(k=0), which fails, while the budget has not dropped yet: then nothing is pruned
        all_scores = torch.cat([s.view(-1) for s in scores.values()])
        threshold = torch.kthvalue(all_scores, k=k)[0].item() if k > 0 else -math.inf
        rank_pattern = {}
        with torch.no_grad():
            for site in self.sites:
                pruned = scores[site.e] <= threshold
                get_attr_path(gm, site.e).masked_fill_(pruned, 0.0)
                rank_pattern[f"{site.path}.lora_E.{self.adapter_name}"] = (~pruned).view(-1).tolist()
        return rank_pattern

    def mask_using_rank_pattern(self, gm: fx.GraphModule) -> None:
        """Zero the pruned singular values again (the optimizer moves them) from config.rank_pattern."""
        with torch.no_grad():
            for site in self.sites:
                mask = _rank_mask(self.config, site.path, self.adapter_name)
                if mask is None:
                    continue
                keep = torch.tensor(mask, dtype=torch.bool, device=get_attr_path(gm, site.e).device).unsqueeze(-1)
                get_attr_path(gm, site.e).masked_fill_(~keep, 0.0)

    def step(self, gm: fx.GraphModule, step: int) -> None:
        """PEFT's AdaLoraModel.update_and_allocate(global_step)."""
        cfg = self.config
        end = cfg.total_step - cfg.tfinal
        if step < end:
            self.update_ipt(gm)
            self.budget, mask_now = self.budget_schedule(step)
            if mask_now:
                cfg.rank_pattern = self.mask_to_budget(gm, self.budget)
        elif step == end:
            self.budget, _ = self.budget_schedule(step)
            cfg.rank_pattern = self.mask_to_budget(gm, self.budget)
            self.reset_ipt()
        else:
            self.budget = self.target_bgt
            self.mask_using_rank_pattern(gm)


# -- the pass, and the training-time hooks the engine calls ---------------------------------------------

_STATE = "adalora"      # key in GraphPeftModel.method_state[adapter_name]


class AdaLoraPass(RulePass):
    """torch.fx pass: ``AdaLoraPass(AdaLoraConfig(...))(graph_module) -> PassResult``.

    The class methods below are the hooks GraphPeftModel calls for an AdaLoRA adapter.
    """

    rule_cls = AdaLoraRule

    @staticmethod
    def _allocator(model: Any, adapter_name: str, config: AdaLoraConfig) -> RankAllocator:
        state = model.method_state.setdefault(adapter_name, {})
        if _STATE not in state or state[_STATE].config is not config:
            state[_STATE] = RankAllocator(model, adapter_name, config)
        return state[_STATE]

    @classmethod
    def update_and_allocate(cls, model: Any, adapter_name: str, config: AdaLoraConfig, step: int) -> None:
        """After backward() (and the optimizer step), before zero_grad(): update scores, prune to the budget."""
        if config.inference_mode:
            return
        allocator = cls._allocator(model, adapter_name, config)
        if not allocator.fixed:          # an adapter loaded pruned keeps its ranks
            allocator.step(model.graph_module, int(step))

    @classmethod
    def progress(cls, model: Any, adapter_name: str, config: AdaLoraConfig) -> dict:
        if config.inference_mode:
            return {}
        allocator = cls._allocator(model, adapter_name, config)
        return {"budget": f"{allocator.budget}/{allocator.init_bgt}" if not allocator.fixed else "fixed"}

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
            mask = _rank_mask(config, site.path, adapter_name)
            key = f"base_model.model.{site.path}"
            if mask is None or f"{key}.lora_E" not in state:
                continue
            rows = _kept_rows(mask, state[f"{key}.lora_E"].shape[0])
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
        rows = _kept_rows(_rank_mask(config, site.path, name), a.shape[0])
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


def save_as_lora(model: Any, directory: Union[str, Path], adapter_name: Optional[str] = None) -> Path:
    """Write ``shrink_to_lora(model)`` as a PEFT LoRA adapter folder (adapter_config.json + safetensors)."""
    from safetensors.torch import save_file

    from graphpeft.runtime.outputs import atomic_write

    config, tensors = shrink_to_lora(model, adapter_name)
    out = Path(directory)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GraphPeftError(f"cannot create output folder {out}: {exc.strerror}; choose a writable path") from None
    atomic_write(out / "adapter_model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(out / "adapter_config.json",
                 lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return out
