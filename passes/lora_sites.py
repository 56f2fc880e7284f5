"""Site helpers of the LoRA rule: the base op's weight, bias and convolution arguments (as attribute paths
and as graph values), PEFT's initial A and B, and PEFT's names for parameter sites (nested ParamWrappers,
all-linear's fused MoE gate+up parameter).

Part of the LoRA rule (passes/lora.py calls it); not a rule of its own.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from graphpeft.engine.match import CONV_OPS, Site
from graphpeft.engine.result import Rewrite
from graphpeft.engine.rewriter import Rewriter, get_attr_path


def has_attr(root: nn.Module, path: str) -> bool:
    try:
        get_attr_path(root, path)
    except AttributeError:
        return False
    return True


def bias_attr(site: Site) -> Optional[str]:
    """Attribute path of the base op's bias parameter, or None (no bias, or not a parameter)."""
    node = site.node
    if site.kind not in ("linear", "addmm", "conv"):
        return None
    if node.op == "call_module":
        return f"{node.target}.bias" if getattr(node.graph.owning_module.get_submodule(str(node.target)), "bias",
                                                 None) is not None else None
    bias = node.args[0] if site.kind == "addmm" else (node.args[2] if len(node.args) > 2 else node.kwargs.get("bias"))
    return str(bias.target) if isinstance(bias, fx.Node) and bias.op == "get_attr" else None


def weight_node(rw: Rewriter, site: Site) -> fx.Node:
    """The base weight as a graph value: the anchor's own operand (a call_module site has none: read it)."""
    return site.weight if site.weight is not None else rw.get_param(site.weight_name)


def bias_node(rw: Rewriter, site: Site) -> Optional[fx.Node]:
    """The base op's bias as a graph value (its operand, or the module's parameter read), or None."""
    attr = bias_attr(site)
    if attr is None:
        return None
    node = site.node
    if node.op == "call_module":
        return rw.get_param(attr)
    return node.args[0] if site.kind == "addmm" else node.args[2]


def conv_args(node: fx.Node) -> dict:
    """stride, padding, dilation, groups of an aten.convNd call, with aten's defaults."""
    dims = CONV_OPS[node.target]
    names = ("stride", "padding", "dilation", "groups")
    defaults = ([1] * dims, [0] * dims, [1] * dims, 1)
    return {n: (node.args[3 + i] if len(node.args) > 3 + i else node.kwargs.get(n, d))
            for i, (n, d) in enumerate(zip(names, defaults))}


def fused_gate_up(cfg: Any, site: Site, key: str) -> bool:
    """A fused gate+up MoE expert parameter reached through all-linear, with no pattern of its own."""
    all_linear = isinstance(cfg.target_modules, str) and cfg.target_modules.lower() == "all-linear"
    patterned = any(re.match(rf"(.*\.)?({p})$", key) for p in {**cfg.rank_pattern, **cfg.alpha_pattern})
    return all_linear and site.kind == "experts" and key.endswith("gate_up_proj") and not patterned


def fused_gate_up_patterns(data: dict, records: list[Rewrite]) -> dict:
    """LoraRule.saved_config: PEFT writes the doubled rank and alpha of a fused gate+up expert parameter as patterns."""
    fused = [rec for rec in records if rec.info.get("fused_gate_up")]
    if fused:
        name = re.escape(str(fused[0].info["weight"]).rpartition(".")[2])
        data = dict(data, rank_pattern={**(data.get("rank_pattern") or {}), rf".*\.{name}": fused[0].info["r"]},
                    alpha_pattern={**(data.get("alpha_pattern") or {}), rf".*\.{name}": fused[0].info["lora_alpha"]})
    return data


def wrapper_path(gm: fx.GraphModule, site: Site, cfg: Any) -> str:
    """PEFT's key prefix of a parameter site: its module, inside one ``base_layer`` per parameter of the same module
    targeted after it (PEFT nests one ParamWrapper per parameter, in the module's parameter order)."""
    owner, _, leaf = site.weight_name.rpartition(".")
    wanted = cfg.target_parameters or ()
    all_linear = isinstance(cfg.target_modules, str) and cfg.target_modules.lower() == "all-linear"
    params = gm.get_submodule(owner)._parameters
    names = [n for n, p in params.items() if (all_linear and p is not None and p.dim() == 3)
             or any(f"{owner}.{n}" == t or f"{owner}.{n}".endswith(f".{t}") for t in wanted)]
    depth = len(names) - 1 - names.index(leaf) if leaf in names else 0
    return owner + ".base_layer" * depth


def init_pair(init, r: int, fin: int, fout: int, weight: torch.Tensor,
               rank: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, in] and B [out, r] as PEFT initialises them (nn.Linear's init, then reset); ``rank`` for the
    gaussian std when r counts several experts' ranks."""
    a = nn.Linear(fin, r, bias=False).weight.data
    b = nn.Linear(r, fout, bias=False).weight.data
    if init is True:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)
    elif init == "gaussian":
        nn.init.normal_(a, std=1 / (rank or r))
        nn.init.zeros_(b)
    dtype = weight.dtype if weight.is_floating_point() else torch.float32
    return a.to(device=weight.device, dtype=dtype), b.to(device=weight.device, dtype=dtype)
