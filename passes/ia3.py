"""(IA)^3: a learned vector that rescales a projection's output, or a feed-forward projection's input,
with Hugging Face PEFT's semantics (peft.tuners.ia3).

Maths (PEFT's ia3.Linear / ia3.Conv2d): with W [out, in], bias b and the learned vector l (ones at init),

    attention projection (key, value)     y = (W x + b) * l          l [out, 1], bias included
    feed-forward projection (down)        y = W (x * l) + b          l [1, in],  bias untouched

GPT-2's Conv1D (addmm, W stored [in, out]) keeps the same l shapes. A convolution scales channels:
l [1, C, 1, ...] with C = out channels (output) or in channels (input); conv2d/3d as PEFT, conv1d too
(which PEFT refuses). Merging folds l into the weight: W * l along the out axis (and b * l) or along the
in axis (per group for a grouped convolution, as PEFT does).

before:                        after (output scaled):
    x ─ linear(W, b) ─ y           x ─ linear(W, b) ─ mul ─ y
                                          l ─ view(-1) ┘

before:                        after (input scaled, feed-forward):
    x ─ linear(W, b) ─ y           x ─ mul ─ linear(W, b) ─ y
                                   l ─ view(-1) ┘

Default sites come from the graph: the projections that feed the key and value of every attention
site, and the down projection of every feed-forward block (a linear op whose input comes from a
linear op through an activation, and whose output goes to a residual add); the down projections
scale their input. ``feedforward_modules`` follows PEFT: a regex (full match) or names that end
the module path. The parameter lives at ``<path>.ia3_l.<adapter>`` and is saved as
``base_model.model.<path>.ia3_l``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.fx as fx

from graphpeft.engine.config import TargetingConfig
from graphpeft.engine.errors import GraphPeftError
from graphpeft.engine.match import LINEAR_KINDS, PARAM_KINDS, Site, attention_input_projections, find_sites, select_sites
from graphpeft.engine.registry import register_method, register_rule
from graphpeft.engine.result import Rewrite
from graphpeft.engine.rewriter import Rewriter, get_attr_path
from graphpeft.engine.rule import Rule, RulePass

aten = torch.ops.aten
SITE_KINDS = LINEAR_KINDS + ("conv",)
# fields of graphpeft's targeting configs that PEFT's IA3Config lacks: not written to adapter_config.json
_NOT_IN_PEFT = ("target_parameters", "layers_to_transform", "layers_pattern")


@dataclass
class IA3Config(TargetingConfig):
    """PEFT's IA3Config fields and defaults (target_modules, exclude_modules, feedforward_modules,
    fan_in_fan_out, modules_to_save, init_ia3_weights); layers_to_transform / layers_pattern are
    graphpeft's additions (saved adapters list the chosen modules, so PEFT loads the same sites)."""

    peft_type = "IA3"

    feedforward_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"cli": "--feedforward",
                                "help": "which targets scale their input (feed-forward), not their output"})
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.feedforward_modules, (set, frozenset, tuple)):
            self.feedforward_modules = sorted(self.feedforward_modules)
        super().__post_init__()

    def validate(self) -> None:
        if self.target_parameters:
            raise GraphPeftError("target_parameters is not part of PEFT's IA3Config; "
                                 "name the modules in target_modules")
        ff, targets = self.feedforward_modules, self.target_modules
        if ff is not None and not isinstance(ff, (str, list)):
            raise GraphPeftError(f"feedforward_modules must be a list of module names or a regex string, "
                                 f"got {type(ff).__name__}")
        if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
            extra = sorted(set(ff) - set(targets))
            raise GraphPeftError(f"feedforward_modules must be a subset of target_modules (as in PEFT), but "
                                 f"{', '.join(map(repr, extra))} is not in target_modules; add it there or drop it")
        if not isinstance(self.init_ia3_weights, bool):
            raise GraphPeftError(f"init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")

    def is_feedforward(self, module_path: str, graph_feedforward: set[str]) -> bool:
        """PEFT's _check_target_module_feedforward; without feedforward_modules, what the graph shows."""
        ff = self.feedforward_modules
        if ff is None:
            return module_path in graph_feedforward
        if isinstance(ff, str):
            return re.fullmatch(ff, module_path) is not None
        return any(module_path.endswith(name) for name in ff)    # PEFT: a plain suffix, no dot required


@register_rule
class IA3Rule(Rule):
    __doc__ = __doc__
    name = "ia3"

    def __init__(self, config: Any, adapter_name: str = "default"):
        super().__init__(config, adapter_name)
        self._graph_feedforward: set[str] = set()

    def sites(self, gm: fx.GraphModule) -> list[Site]:
        cfg = self.config
        needed = cfg.feedforward_modules is None or cfg.target_modules is None
        self._graph_feedforward = set(feedforward_down_projections(gm)) if needed else set()
        default = () if cfg.target_modules else (attention_input_projections(gm, ("key", "value"))
                                                 + sorted(self._graph_feedforward))
        # embeddings and bare-parameter ops are offered too, so that naming one is declined with a reason
        return select_sites(gm, cfg, SITE_KINDS + PARAM_KINDS + ("embedding",), default_paths=default)

    def check(self, site: Site) -> Optional[str]:
        if site.kind not in SITE_KINDS:
            return f"(IA)^3 scales linear and convolution ops (as PEFT does), not {site.kind} ops"
        return None

    def rewrite(self, gm: fx.GraphModule, site: Site) -> Rewrite:
        name, path = self.adapter_name, site.module_path
        feedforward = self.config.is_feedforward(path, self._graph_feedforward)
        rw = Rewriter(gm, self.name, site.node, path, site.kind, adapter=name)
        weight = get_attr_path(gm, site.weight_name)
        channels = site.in_features if feedforward else site.out_features
        if site.kind == "conv":
            shape = (1, channels) + (1,) * (weight.dim() - 2)
        else:
            shape = (1, channels) if feedforward else (channels, 1)
        init = torch.ones(shape) if self.config.init_ia3_weights else torch.randn(shape)   # PEFT: randn, then ones
        dtype = weight.dtype if weight.is_floating_point() else torch.float32     # a quantized base: float32, as PEFT
        attr = rw.add_parameter(f"{path}.ia3_l.{name}", init.to(device=weight.device, dtype=dtype),
                                f"base_model.model.{path}.ia3_l")
        node = site.node
        # l in another dtype than the activations (a quantized base keeps it in float32, as PEFT; a weight cast on
        # its way): the product returns to the activation's dtype (where PEFT's own 4-bit layer lets float32 leak
        # into a bfloat16 model and fails)
        act = getattr(node.meta.get("val"), "dtype", None)
        act = act if act is not None and act != dtype else None
        if feedforward:
            x = node.args[1] if site.kind == "addmm" else node.args[0]
            rw.start_before(node)
            scaled = rw.call(aten.mul.Tensor, x, self._vector(rw, attr, site))
            rw.replace_input(node, x, rw.call(aten._to_copy.default, scaled, dtype=act) if act else scaled)
        else:
            out = rw.call(aten.mul.Tensor, node, self._vector(rw, attr, site))
            rw.replace_uses(node, rw.call(aten._to_copy.default, out, dtype=act) if act else out)
        layout = "conv" if site.kind == "conv" else ("in_out" if site.kind in ("addmm", "mm") else "out_in")
        return rw.record(feedforward=feedforward, weight=site.weight_name, bias=_bias_name(gm, site), layout=layout,
                         groups=_conv_groups(node) if site.kind == "conv" else 1)

    @staticmethod
    def _vector(rw: Rewriter, attr: str, site: Site) -> fx.Node:
        """l as it broadcasts against the site's activations: flat for linear ops, [1, C, 1..] for conv."""
        param = rw.get_param(attr)
        return param if site.kind == "conv" else rw.call(aten.view.default, param, [-1])

    # -- what the engine asks after rewriting --------------------------------------------------------
    @classmethod
    def merged_weights(cls, gm: fx.GraphModule, record: Rewrite) -> dict[str, torch.Tensor]:
        """PEFT's ia3 merge: W * l along the scaled axis; the bias is scaled too when the output is."""
        info = record.info
        weight = get_attr_path(gm, info["weight"]).detach()
        vec = get_attr_path(gm, next(iter(record.params))).detach()
        feedforward, layout = info["feedforward"], info["layout"]
        if layout == "in_out":
            factor = vec.T                                          # PEFT: transpose(l, fan_in_fan_out)
        elif layout == "conv" and not feedforward:
            factor = vec.transpose(0, 1)                            # [out, 1, 1..]
        elif layout == "conv" and info["groups"] != 1:
            factor = _grouped_input_factor(vec, weight.shape, int(info["groups"]))
        else:
            factor = vec                                            # [out, 1] or [1, in] (conv [1, in, 1..])
        merged = {info["weight"]: (weight * factor).to(weight.dtype)}
        if not feedforward and info.get("bias"):
            bias = get_attr_path(gm, info["bias"]).detach()
            merged[info["bias"]] = (bias * vec.reshape(bias.shape)).to(bias.dtype)
        return merged

    @classmethod
    def saved_config(cls, data: dict, records: list[Rewrite]) -> dict:
        """adapter_config.json as PEFT's IA3Config reads it: the feed-forward sites written out."""
        data = {k: v for k, v in data.items() if k not in _NOT_IN_PEFT}
        data["feedforward_modules"] = sorted({r.module_path for r in records if r.info.get("feedforward")})
        return data


def _bias_name(gm: fx.GraphModule, site: Site) -> Optional[str]:
    """Attribute path of the site's bias parameter, or None."""
    node = site.node
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return f"{node.target}.bias" if getattr(module, "bias", None) is not None else None
    if site.kind == "mm":
        return None
    index = 0 if site.kind == "addmm" else 2          # addmm(b, x, W); linear / conv(x, W, b)
    bias = node.args[index] if len(node.args) > index else node.kwargs.get("bias")
    return str(bias.target) if isinstance(bias, fx.Node) and bias.op == "get_attr" else None


def _conv_groups(node: fx.Node) -> int:
    return int(node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1))


def _grouped_input_factor(vec: torch.Tensor, shape: torch.Size, groups: int) -> torch.Tensor:
    """PEFT's _get_ia3_scaling_for_weight: l [1, in, 1..] laid out as the grouped weight [out, in/g, 1..]."""
    out_channels, in_per_group = shape[0], shape[1]
    rest = vec.shape[2:]
    factor = vec.reshape(groups, 1, in_per_group, *rest).expand(groups, out_channels // groups, in_per_group, *rest)
    return factor.reshape(out_channels, in_per_group, *rest)


# -- the feed-forward down projections of a graph --------------------------------------------------

_ACTIVATIONS = {"gelu", "silu", "relu", "tanh", "sigmoid", "erf", "hardswish", "hardsigmoid", "mish", "elu", "selu",
                "celu", "leaky_relu", "softplus", "relu6", "hardtanh", "gelutanh", "newgeluactivation",
                "geluactivation", "quickgeluactivation", "siluactivation"}
# elementwise and layout ops an activation's value passes through between the two projections
_PASS = {"view", "reshape", "_unsafe_view", "contiguous", "clone", "to", "_to_copy", "alias", "type_as", "dropout",
         "feature_dropout", "alpha_dropout", "transpose", "permute", "t", "expand", "unsqueeze", "squeeze", "flatten",
         "getitem", "mul", "add", "sub", "div", "truediv", "pow", "neg"}
# met on the way back, these make it an attention output, not a feed-forward value (sdpa, or eager attention)
_ATTENTION = {"scaled_dot_product_attention", "softmax", "_softmax", "bmm", "matmul"}
# ops between a down projection's output and the residual add
_TO_RESIDUAL = {"view", "reshape", "_unsafe_view", "contiguous", "clone", "to", "_to_copy", "alias", "type_as",
                "dropout", "feature_dropout", "alpha_dropout", "getitem"}


def _op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """'gelu' for aten.gelu.default, F.gelu, nn.GELU; 'mul' for aten.mul.Tensor and operator.mul."""
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__.lower()
    if node.op not in ("call_function", "call_method"):
        return ""
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    return str(getattr(packet or target, "__name__", target)).lower()


def _reaches_activated_projection(gm: fx.GraphModule, start: fx.Node, sites: dict[fx.Node, Site]) -> bool:
    """Walking back from ``start`` through elementwise ops, an activation is passed and a linear op reached,
    and no attention output is met (a gated attention output projection is not a feed-forward one)."""
    frontier, seen, activated, reached = [start], set(), False, False
    while frontier and len(seen) < 64:
        node = frontier.pop()
        if not isinstance(node, fx.Node) or node in seen:
            continue
        seen.add(node)
        if node in sites:
            reached = True
            continue
        name = _op_name(gm, node)
        if name in _ATTENTION:
            return False
        if name in _ACTIVATIONS:
            activated = True
        elif name not in _PASS:
            continue
        frontier.extend(node.all_input_nodes)
    return activated and reached


def _feeds_residual_add(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``node``'s value reaches an add of two tensors through layout, cast and dropout ops only."""
    frontier, hops = [node], 0
    while frontier and hops < 8:
        current, hops = frontier.pop(), hops + 1
        for user in current.users:
            name = _op_name(gm, user)
            if name == "add" and sum(isinstance(a, fx.Node) for a in user.args[:2]) == 2:
                return True
            if name in _TO_RESIDUAL:
                frontier.append(user)
    return False


def feedforward_down_projections(gm: fx.GraphModule) -> list[str]:
    """Module paths of linear ops that close a feed-forward block: linear -> activation (-> gate mul) ->
    this linear -> residual add. That is llama's down_proj, GPT-2's mlp.c_proj, BERT's output.dense,
    T5's wo, fc2 in BART / ViT / Whisper, DistilBERT's lin2."""
    sites = {s.node: s for s in find_sites(gm) if s.kind in LINEAR_KINDS}
    paths: list[str] = []
    for node, site in sites.items():
        x = node.args[1] if site.kind == "addmm" else node.args[0]
        if (isinstance(x, fx.Node) and site.module_path not in paths
                and _reaches_activated_projection(gm, x, sites) and _feeds_residual_add(gm, node)):
            paths.append(site.module_path)
    return paths


class IA3Pass(RulePass):
    """torch.fx pass: ``IA3Pass(IA3Config(...))(graph_module) -> PassResult``."""

    rule_cls = IA3Rule


register_method("ia3", IA3Config, IA3Pass, "learned vectors that rescale key/value and feed-forward activations "
                                           "(PEFT (IA)^3)")
