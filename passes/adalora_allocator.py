"""AdaLoRA's rank allocator: PEFT's RankAllocator and AdaLoraModel.update_and_allocate, step for step.

Part of the AdaLoRA rule (passes/adalora.py); the pass class exposes ``update_and_allocate`` and
``progress`` below as its method hooks, which GraphPeftModel calls without naming the method.

Maths (PEFT's adalora.RankAllocator). Every site holds triplets (A_i, E_i, B_i): right vectors
A [r, in], singular values E [r, 1], left vectors B [out, r]. After backward(), for every entry p of
A, E and B:

    sensitivity   I = |p * grad(p)|
    EMA           Ī <- beta1 Ī + (1 - beta1) I
    uncertainty   Ū <- beta2 Ū + (1 - beta2) |I - Ī|
    score         s(p) = Ī * Ū

and triplet i of a site scores  S_i = s(E_i) + mean_j s(A[i, j]) + mean_j s(B[j, i]).

Budget schedule (total kept ranks over all sites; init_bgt = init_r per site, target_bgt = target_r
per site), at step t:

    t <= tinit                      init_bgt (warm-up: scores accumulate, nothing is pruned)
    tinit < t < total_step - tfinal target_bgt + (init_bgt - target_bgt) (1 - (t - tinit) / (total_step - tfinal - tinit))^3
    t >= total_step - tfinal        target_bgt, fixed

Masking: every deltaT steps of the budgeting phase, the triplets scoring at or below the
(init_bgt - budget)-th smallest score get E_i = 0; config.rank_pattern records the kept ones. At
t = total_step - tfinal the mask is computed one last time and fixed; on every later step it is
re-applied (the optimizer moves the zeroed E_i).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphpeft.engine.errors import GraphPeftError
from graphpeft.engine.rewriter import get_attr_path
from graphpeft.passes.adalora_config import RULE, AdaLoraConfig, rank_mask

_STATE = "adalora"      # key in GraphPeftModel.method_state[adapter_name]


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
                mask = rank_mask(self.config, site.path, self.adapter_name)
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


# -- the hooks AdaLoraPass exposes (GraphPeftModel.update_and_allocate / progress call them) -------------

def allocator(model: Any, adapter_name: str, config: AdaLoraConfig) -> RankAllocator:
    """The adapter's RankAllocator, kept in ``model.method_state``; a new one when the config was replaced."""
    state = model.method_state.setdefault(adapter_name, {})
    if _STATE not in state or state[_STATE].config is not config:
        state[_STATE] = RankAllocator(model, adapter_name, config)
    return state[_STATE]


def update_and_allocate(model: Any, adapter_name: str, config: AdaLoraConfig, step: int) -> None:
    """After backward() (and the optimizer step), before zero_grad(): update scores, prune to the budget."""
    if config.inference_mode:
        return
    alloc = allocator(model, adapter_name, config)
    if not alloc.fixed:          # an adapter loaded pruned keeps its ranks
        alloc.step(model.graph_module, int(step))


def progress(model: Any, adapter_name: str, config: AdaLoraConfig) -> dict:
    if config.inference_mode:
        return {}
    alloc = allocator(model, adapter_name, config)
    return {"budget": f"{alloc.budget}/{alloc.init_bgt}" if not alloc.fixed else "fixed"}
