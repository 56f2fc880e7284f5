"""Site selection: which graph nodes a rule may anchor on, by op kind and module path.

A *site* is an op whose weight operand is a parameter of the graph module:

    linear     aten.linear(x, W[out,in], b) / F.linear                      nn.Linear
    addmm      aten.addmm(b, x2d, W[in,out])                                GPT-2's Conv1D
    mm         aten.mm(x2d, W[in,out])                                      Conv1D without bias
    matmul     aten.matmul / torch.matmul with a parameter operand          custom layers
    einsum     aten.einsum / torch.einsum with a parameter operand          custom layers
    linear/mm  linear / matmul / mm / bmm reading a 2-D parameter through   custom layers (x @ W.t(),
               a transpose, a same-shape view, a batch broadcast or a       bmm on W expanded over the
               cast to its own dtype: "linear" when the op computes x W^T,  batch)
               "mm" when it computes x W (W stored [in, out])
    embedding  aten.embedding(W[num,dim], ids) / F.embedding                nn.Embedding
    experts    any op reading a 3-D parameter W[experts,out,in]             MoE experts (transformers 5 Mixtral's
                                                                             gate_up_proj, indexed per token)
    conv       aten.conv1d/2d/3d(x, W[out,in/groups,*k], b, stride, ...)    nn.Conv1d/2d/3d (string padding too)
    linear     a registered quantized linear op(x, Wq, b, ..., in, out)      bitsandbytes / torchao layers
               (graphpeft/quantized_ops.py; Wq a frozen packed parameter)   (``Site.quantized``)

and, in graphs traced with torch.fx's default leaf modules, ``call_module`` nodes of nn.Linear
(kind linear) and nn.Embedding (kind embedding), whose weight has no get_attr node.

Module paths come from ``node.meta["nn_module_stack"]`` (last entry). ``target_modules`` follows
PEFT: a list entry matches a path exactly or as its suffix ``.name``; a string is a full regex match;
"all-linear" takes every linear-kind site except the output head, and 3-D expert parameters. Entries may also name the
weight parameter itself (``"mix.weight"``), which is how a bare parameter used in ``einsum`` is
targeted; ``target_parameters`` names parameters only (PEFT's field).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.fx as fx

from graphpeft.engine.errors import GraphPeftError

aten = torch.ops.aten
STAMP = "graphpeft"          # node.meta key set on every node a rule inserts
ALL_LINEAR = "all-linear"
LINEAR_KINDS = ("linear", "addmm", "mm")
PARAM_KINDS = ("matmul", "einsum", "experts")

_LINEAR = {aten.linear.default, torch._C._nn.linear, torch.nn.functional.linear}
_MATMUL = {aten.matmul.default, torch.matmul, aten.bmm.default}
_SCORES = _MATMUL | {aten.baddbmm.default}        # q @ k^T, or bias + q @ k^T
_EINSUM = {aten.einsum.default, torch.einsum, torch.functional.einsum}
_EMBEDDING = {aten.embedding.default, torch.nn.functional.embedding}
CONV_OPS = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3,
            aten.conv1d.padding: 1, aten.conv2d.padding: 2, aten.conv3d.padding: 3}     # padding="same"/"valid"
# quantized linear ops: op -> (argument index of in_features, of out_features); x is args[0], the packed
# weight args[1], the bias args[2] (graphpeft/quantized_ops.py registers its ops here)
QUANTIZED_LINEAR: dict[object, tuple[int, int]] = {}


def register_quantized_linear(op: object, in_index: int, out_index: int) -> None:
    """Count ``op`` as a linear site: a weight op whose weight (args[1]) is stored quantized."""
    QUANTIZED_LINEAR[op] = (in_index, out_index)


@dataclass(frozen=True)
class Site:
    """One candidate op. ``weight`` is the get_attr node of its parameter (None for call_module sites)."""

    node: fx.Node
    kind: str
    module_path: str
    weight: Optional[fx.Node]
    weight_name: str            # attribute path of the parameter in the graph module
    in_features: int
    out_features: int
    module_class: str = ""
    quantized: bool = False     # the weight is stored quantized (a QUANTIZED_LINEAR op): frozen, not a float matrix

    @property
    def param_owner(self) -> str:
        """The module that holds the parameter (PEFT's key for target_parameters)."""
        return self.weight_name.rpartition(".")[0]


# -- finding sites ------------------------------------------------------------------------------

def module_stack_entry(node: fx.Node) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    cls_name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
    return str(path), cls_name.rpartition(".")[2]


def is_stamped(node: fx.Node) -> bool:
    return STAMP in node.meta


def _param(gm: fx.GraphModule, node: object) -> Optional[torch.nn.Parameter]:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.nn.Parameter) else None


def _classify_module(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple[str, None, str, int, int]]:
    module = gm.get_submodule(str(node.target))
    if type(module) is torch.nn.Linear:
        return "linear", None, f"{node.target}.weight", module.in_features, module.out_features
    if type(module) is torch.nn.Embedding:
        return "embedding", None, f"{node.target}.weight", module.num_embeddings, module.embedding_dim
    return None


def _classify(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple[str, Optional[fx.Node], str, int, int]]:
    """(kind, weight node, weight name, in_features, out_features) when ``node`` is a site, else None."""
    if node.op == "call_module":
        return _classify_module(gm, node)
    found = _classify_function(gm, node)
    if found is None:
        return None
    kind, weight, fin, fout = found
    return kind, weight, str(weight.target), fin, fout


def _classify_function(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple[str, fx.Node, int, int]]:
    t, a = node.target, node.args
    if t in QUANTIZED_LINEAR and len(a) > max(QUANTIZED_LINEAR[t]) and _param(gm, a[1]) is not None:
        fin, fout = QUANTIZED_LINEAR[t]
        return "linear", a[1], int(a[fin]), int(a[fout])
    if t in _LINEAR and len(a) >= 2 and (p := _param(gm, a[1])) is not None and p.dim() == 2:
        return "linear", a[1], p.shape[1], p.shape[0]
    if t is aten.addmm.default and len(a) >= 3 and (p := _param(gm, a[2])) is not None:
        return "addmm", a[2], p.shape[0], p.shape[1]
    if t is aten.mm.default and len(a) >= 2 and (p := _param(gm, a[1])) is not None:
        return "mm", a[1], p.shape[0], p.shape[1]
    if t in CONV_OPS and len(a) >= 2 and (p := _param(gm, a[1])) is not None:
        groups = a[6] if len(a) > 6 else node.kwargs.get("groups", 1)
        return "conv", a[1], p.shape[1] * groups, p.shape[0]
    if t in _EMBEDDING:
        w = a[0] if t is aten.embedding.default else (a[1] if len(a) > 1 else node.kwargs.get("weight"))
        if (p := _param(gm, w)) is not None and p.dim() == 2:
            return "embedding", w, p.shape[0], p.shape[1]
    if t in _MATMUL and len(a) >= 2:
        for w in a[:2]:
            if (p := _param(gm, w)) is not None and p.dim() == 2:
                return "matmul", w, p.shape[1], p.shape[0]
    for w in a:
        if (p := _param(gm, w)) is not None and p.dim() == 3:
            return "experts", w, p.shape[2], p.shape[1]
    if t in _EINSUM:        # the parameter itself, or through a transpose, view or cast of it
        operands = a[1] if len(a) == 2 and isinstance(a[1], (list, tuple)) else a[1:]
        params = [found for w in operands if (found := _param_or_through(gm, w)) is not None]
        if len(params) == 1 and (p := params[0][1]).dim() == 2:
            return "einsum", params[0][0], p.shape[1], p.shape[0]
    if (t in _LINEAR or t in _MATMUL or t is aten.mm.default) and len(a) >= 2 \
            and (found := _param_through(gm, a[1])) is not None:
        w, p, flipped = found
        if (t in _LINEAR) != flipped:       # the op computes x @ W^T: nn.Linear's layout
            return "linear", w, p.shape[1], p.shape[0]
        return "mm", w, p.shape[0], p.shape[1]        # x @ W, W stored [in, out] as GPT-2's Conv1D
    return None


# ops a weight may go through on its way to a matmul: layout flips, and ops that keep its values and layout
_FLIPS = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default}   # numpy_T: W.T (Falcon)
_KEEPS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.contiguous.default, aten.clone.default,
          aten.alias.default, aten.detach.default, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
          aten.unsqueeze.default, aten.expand.default}


def _param_or_through(gm: fx.GraphModule, node: object) -> Optional[tuple[fx.Node, torch.nn.Parameter]]:
    if (p := _param(gm, node)) is not None:
        return node, p
    found = _param_through(gm, node)
    return (found[0], found[1]) if found is not None else None


def leads_to(node: fx.Node, anchor: fx.Node) -> bool:
    """``node`` is ``anchor``, or leads to it through ops read by one node each (a weight's transpose, view or
    cast); a reader whose value nobody reads (torch.export's metadata assert) does not count."""
    for _ in range(8):
        if node is anchor:
            return True
        live = [u for u in node.users if u.users or u is anchor]
        if len(live) != 1:
            return False
        node = live[0]
    return False


def weight_reader(site: "Site") -> fx.Node:
    """The node that reads ``site``'s weight on the way to its op: the op itself, or the first of the transposes,
    views and casts between them (where a rule that patches the weight, W -> W + delta, puts the patched value)."""
    reader = next((u for u in site.weight.users if leads_to(u, site.node)), None)
    if reader is None:
        raise GraphPeftError(f"{site.module_path}: its weight {site.weight_name} reaches the {site.node.target} op "
                             f"through values that other ops read too; it cannot be patched there")
    return reader


def _param_through(gm: fx.GraphModule, node: object) -> Optional[tuple[fx.Node, torch.nn.Parameter, bool]]:
    """(get_attr node, parameter, transposed?) of a 2-D parameter that ``node`` is, through a transpose, a
    view that keeps its shape, a broadcast over a leading batch axis or a cast (to any dtype: a rule's branch
    then runs in the parameter's dtype, cast in and out as PEFT's layers do); None otherwise, or when ``node``
    is the parameter itself (the plain sites)."""
    flipped, hops = False, 0
    while isinstance(node, fx.Node) and node.op == "call_function" and hops < 8:
        val, src = node.meta.get("val"), node.args[0] if node.args else None
        src_val = src.meta.get("val") if isinstance(src, fx.Node) else None
        if not isinstance(val, torch.Tensor) or not isinstance(src_val, torch.Tensor):
            return None
        if node.target in _FLIPS:
            if val.dim() < 2 or tuple(val.shape[-2:]) != tuple(src_val.shape[-2:])[::-1]:
                return None
            if node.target is aten.numpy_T.default and val.dim() != 2:     # it reverses every axis
                return None
            if node.target is aten.permute.default and list(node.args[1])[-2:] not in ([1, 0], [-1, -2]):
                return None
            if node.target is aten.transpose.int and {d % val.dim() for d in node.args[1:3]} != {val.dim() - 2,
                                                                                                 val.dim() - 1}:
                return None
            flipped = not flipped
        elif node.target in _KEEPS:
            if tuple(val.shape[-2:]) != tuple(src_val.shape[-2:]) or (val.dim() > 2 and node.target in
                                                                      (aten.view.default, aten.reshape.default)):
                return None
        else:
            return None
        node, hops = src, hops + 1
    p = _param(gm, node)
    if p is None or p.dim() != 2 or hops == 0:      # a cast to another dtype is fine: rules cast their branch
        return None
    return node, p, flipped


def find_sites(gm: fx.GraphModule) -> list[Site]:
    """Every weight-matmul and embedding site of the graph, in graph order; inserted nodes are skipped."""
    sites = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_module") or is_stamped(node):
            continue
        found = _classify(gm, node)
        if found is None:
            continue
        kind, weight, weight_name, fin, fout = found
        path, cls = module_stack_entry(node)
        if node.op == "call_module":
            path, cls = str(node.target), type(gm.get_submodule(str(node.target))).__name__
        elif kind in PARAM_KINDS or not path:
            path = path or weight_name.rpartition(".")[0]
        sites.append(Site(node, kind, path, weight, weight_name, int(fin), int(fout), cls,
                          quantized=node.target in QUANTIZED_LINEAR))
    return sites


# -- PEFT's target_modules semantics --------------------------------------------------------------

def _matches(spec: object, key: str) -> bool:
    if spec is None or not key:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return key in spec or any(key.endswith(f".{name}") for name in spec)


def _layer_index(key: str, layers_pattern: object) -> Optional[int]:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    return int(match.group("idx")) if match else None


def _in_layers(key: str, cfg: object) -> bool:
    layers = getattr(cfg, "layers_to_transform", None)
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    idx = _layer_index(key, getattr(cfg, "layers_pattern", None))
    if idx is None:
        return False
    return idx == layers if isinstance(layers, int) else idx in layers


def in_modules_to_save(key: str, modules_to_save: Optional[Iterable[str]]) -> bool:
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in modules_to_save or ())


def target_matches(cfg: object, site: Site) -> bool:
    """PEFT's check_target_module_exists, on a graph site (module path, and parameter name)."""
    key = site.module_path
    if _matches(getattr(cfg, "exclude_modules", None), key):
        return False
    if in_modules_to_save(key, getattr(cfg, "modules_to_save", None)):
        return False
    params = getattr(cfg, "target_parameters", None)
    if params and (site.weight_name in params or any(site.weight_name.endswith(f".{p}") for p in params)):
        return True
    targets = getattr(cfg, "target_modules", None)
    if targets is None:
        return False
    # a bare parameter site (einsum/matmul) may also be named by its parameter: "mix.weight"
    names = (key, site.weight_name) if site.kind in PARAM_KINDS else (key,)
    if isinstance(targets, str):
        return any(_matches(targets, n) for n in names)
    if any(n in targets for n in names):
        return True
    found = any(n.endswith(f".{t}") for n in names for t in targets)
    return found and _in_layers(key, cfg)


def select_sites(gm: fx.GraphModule, cfg: object, kinds: Iterable[str], default_paths: Iterable[str] = ()) -> list[Site]:
    """Sites of the given kinds that ``cfg`` targets.

    target_modules None -> ``default_paths`` (a rule's graph-derived default); "all-linear" -> every
    linear-kind site except the output head(s) of the graph.
    """
    kinds = tuple(kinds)
    sites = [s for s in find_sites(gm) if s.kind in kinds]
    targets = getattr(cfg, "target_modules", None)
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        heads = set(output_heads(gm))
        # as PEFT: the linear layers but the output head, and MoE expert parameters (PEFT maps them in with
        # target_parameters for transformers 5 MoE models)
        keep = [s for s in sites if (s.kind in LINEAR_KINDS and s.module_path not in heads) or s.kind == "experts"]
        return [s for s in keep if _excluded_ok(cfg, s)]
    if targets is None and not getattr(cfg, "target_parameters", None):
        wanted = set(default_paths)
        return [s for s in sites if s.module_path in wanted and _excluded_ok(cfg, s)]
    return [s for s in sites if target_matches(cfg, s)]


def _excluded_ok(cfg: object, site: Site) -> bool:
    return not (_matches(getattr(cfg, "exclude_modules", None), site.module_path)
                or in_modules_to_save(site.module_path, getattr(cfg, "modules_to_save", None))
                or not _in_layers(site.module_path, cfg))


def nearest_paths(targets: object, paths: Iterable[str], n: int = 5) -> list[str]:
    """Module paths closest to what the user asked for, for 'matched nothing' errors."""
    paths = sorted(set(p for p in paths if p))
    wanted = [targets] if isinstance(targets, str) else list(targets or [])
    names = {p.rpartition(".")[2] for p in paths}
    close: list[str] = []
    for t in wanted:
        for name in difflib.get_close_matches(str(t).rpartition(".")[2], names, n=n, cutoff=0.3):
            close.extend(p for p in paths if p.endswith("." + name) or p == name)
    seen, out = set(), []
    for p in close or paths:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out[:n]


# -- graph structure the rules derive defaults from ------------------------------------------------

# ops that only move, view, cast or combine values elementwise: walking back through them from an
# attention input reaches the projection that produced it.
_TRANSPARENT = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int, aten.permute.default,
    aten.contiguous.default, aten.clone.default, aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.split.Tensor, aten.split_with_sizes.default, aten.slice.Tensor, aten.select.int, aten.narrow.default,
    aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.neg.default, aten.cat.default, aten.div.Tensor,
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default, aten.alias.default,
    aten.chunk.default, aten.unflatten.int, aten.flatten.using_ints, aten.repeat_interleave.self_int,
    aten.t.default, aten.mul.Scalar, aten.div.Scalar, aten.unbind.int, aten.index_select.default,
    aten.index.Tensor, aten.numpy_T.default,
}
_TRANSPARENT_NAMES = {"getitem", "view", "reshape", "transpose", "permute", "contiguous", "split", "chunk",
                      "unsqueeze", "squeeze", "mul", "add", "truediv", "cat", "expand", "flatten", "unflatten",
                      "to", "type_as", "size"}


@dataclass(frozen=True)
class AttentionSite:
    """An attention op and the nodes feeding its query, key and value."""

    node: fx.Node
    query: fx.Node
    key: fx.Node
    value: fx.Node
    kind: str                 # "sdpa" or "eager"
    scores: Optional[fx.Node] = None   # eager only: the matmul(q, k^T) whose second operand is ``key``


def attention_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    """scaled_dot_product_attention ops, and the matmul-softmax-matmul that eager attention is."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or is_stamped(node):
            continue
        if node.target in (aten.scaled_dot_product_attention.default,
                           torch.nn.functional.scaled_dot_product_attention):
            q, k, v = node.args[:3]
            out.append(AttentionSite(node, q, k, v, "sdpa"))
        elif node.target in _MATMUL and len(node.args) >= 2:
            eager = _eager_attention(node)
            if eager is not None:
                out.append(eager)
    return out


def _eager_attention(pv: fx.Node) -> Optional[AttentionSite]:
    """Match matmul(softmax(... matmul(q, k^T) ...), v), walking back through masking and dropout; the scores
    may be a bmm or a baddbmm (an additive bias such as ALiBi), of rank 3 ([batch*heads, q, k]) or 4."""
    probs, value = pv.args[0], pv.args[1]
    node, hops = probs, 0
    while isinstance(node, fx.Node) and hops < 8:
        name = getattr(node.target, "__name__", str(node.target))
        if "softmax" in name:
            break
        node, hops = (node.args[0] if node.args else None), hops + 1
    else:
        return None
    if not isinstance(node, fx.Node) or "softmax" not in getattr(node.target, "__name__", str(node.target)):
        return None
    scores, hops = node.args[0], 0
    while isinstance(scores, fx.Node) and scores.target not in _SCORES and hops < 8:
        scores, hops = (scores.args[0] if scores.args else None), hops + 1
    if not isinstance(scores, fx.Node) or scores.target not in _SCORES:
        return None
    if scores.target is aten.baddbmm.default:      # bias + q @ k^T in one op (BLOOM's ALiBi): q, k are args 1, 2
        return AttentionSite(pv, scores.args[1], scores.args[2], value, "eager", scores)
    return AttentionSite(pv, scores.args[0], scores.args[1], value, "eager", scores)


def producing_sites(gm: fx.GraphModule, start: fx.Node, sites_by_node: dict[fx.Node, Site], limit: int = 64) -> list[Site]:
    """The sites whose output reaches ``start`` through transparent ops only (nearest first)."""
    found, seen, frontier = [], set(), [start]
    while frontier and len(seen) < limit:
        node = frontier.pop(0)
        if not isinstance(node, fx.Node) or node in seen:
            continue
        seen.add(node)
        if node in sites_by_node:
            found.append(sites_by_node[node])
            continue
        if node.op != "call_function" or not _transparent(node):
            continue
        for arg in node.all_input_nodes:
            frontier.append(arg)
    return found


def _transparent(node: fx.Node) -> bool:
    if node.target in _TRANSPARENT:
        return True
    name = getattr(node.target, "__name__", "")
    return name in _TRANSPARENT_NAMES


def attention_input_projections(gm: fx.GraphModule, which: Iterable[str]) -> list[str]:
    """Module paths of the projections that feed the given inputs ("query", "key", "value") of attention."""
    sites = {s.node: s for s in find_sites(gm) if s.kind in LINEAR_KINDS}
    paths: list[str] = []
    for att in attention_sites(gm):
        for role in which:
            for site in producing_sites(gm, getattr(att, role), sites):
                if site.module_path not in paths:
                    paths.append(site.module_path)
    return paths


_SHAPE_ONLY = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.slice.Tensor,
               aten.select.int, aten.contiguous.default, aten.clone.default, aten.to.dtype, aten.squeeze.dim,
               aten._to_copy.default, aten.to.dtype_layout, aten.alias.default,
               aten.index.Tensor}   # a decoder classifier picks the last non-pad position by index


def output_heads(gm: fx.GraphModule) -> list[str]:
    """Module paths of linear sites whose result reaches a graph output through shape/cast ops only.

    That is the LM head or classifier head, which "all-linear" leaves alone.
    """
    sites = {s.node: s for s in find_sites(gm) if s.kind in LINEAR_KINDS}
    heads: list[str] = []
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    frontier = list(output.all_input_nodes)
    seen: set[fx.Node] = set()
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in sites:
            heads.append(sites[node].module_path)
        elif node.op == "call_function" and (node.target in _SHAPE_ONLY or getattr(node.target, "__name__", "") == "getitem"):
            frontier.extend(node.all_input_nodes)
    return heads
