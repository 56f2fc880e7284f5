"""The only code that mutates a graph. Every change goes through a ``Rewriter``, which stamps the
nodes it inserts (``node.meta["graphpeft"]``) and records what it did as a ``Rewrite``.

Parameters are added to the graph module at ``<module path>.<name>.<adapter>[.<leaf>]`` — the same
names PEFT gives them in memory — creating plain container modules along the path where the
graph module has none.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch import nn

from graphpeft.engine.errors import GraphPeftError
from graphpeft.engine.match import STAMP
from graphpeft.engine.result import Rewrite


REWRITTEN = STAMP + ".rewritten"   # anchor meta: [(rule, adapter)] that rewrote it
EXTRA_INPUTS = STAMP + ".extra_inputs"   # gm meta: {input name: message when it is missing}
EXTRA_INPUT_CHECKS = STAMP + ".extra_input_checks"   # gm meta: {input name: value -> None or what is wrong}
# gm meta: "encoder" when the graph is the encoder of an encoder-decoder, "decoder" when it is the decoder of
# one whose encoder reads token ids (generation captures the halves apart); absent for a whole model
MODEL_HALF = STAMP + ".model_half"


def was_rewritten(node: Any, rule_name: str, adapter: str) -> bool:
    return isinstance(node, fx.Node) and (rule_name, adapter) in node.meta.get(REWRITTEN, ())


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A deep copy of ``graph`` (node names and meta kept), without torch's pytree deprecation chatter."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(graph)


def get_attr_path(root: nn.Module, path: str) -> Any:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def ensure_module(root: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path``, creating empty containers (nn.Module / nn.ModuleDict) as needed."""
    module = root
    for part in [p for p in path.split(".") if p]:
        child = module._modules.get(part)
        if child is None:
            if hasattr(module, part):
                raise ValueError(f"cannot add a module at {path!r}: {part!r} is already an attribute")
            child = nn.Module()
            module.add_module(part, child)
        module = child
    return module


def _add_keyword_to_input_spec(graph: fx.Graph, name: str) -> None:
    """A graph captured by torch.export flattens its inputs with a pytree spec: add keyword ``name`` to it."""
    codegen = graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is None or info.in_spec is None:
        return
    from torch.utils import _pytree as pytree

    leaves = [object() for _ in range(info.in_spec.num_leaves)]
    tree = pytree.tree_unflatten(leaves, info.in_spec)
    if not (isinstance(tree, tuple) and len(tree) == 2 and isinstance(tree[1], dict)):
        raise ValueError(f"cannot add input {name!r}: the graph's inputs are not (args, kwargs)")
    args, kwargs = tree
    _, in_spec = pytree.tree_flatten((args, {**kwargs, name: object()}))
    codegen.pytree_info = info._replace(orig_args=[*info.orig_args, name], in_spec=in_spec)


class Rewriter:
    """Inserts nodes around one anchor and records them.

    Use one Rewriter per site: ``rw = Rewriter(gm, rule, site)``, insert with ``call`` /
    ``get_param``, reroute with ``replace_uses``, then ``rw.record(**info)``.
    """

    def __init__(self, gm: fx.GraphModule, rule_name: str, anchor: fx.Node, module_path: str, kind: str,
                 adapter: str = "default"):
        self.gm, self.graph = gm, gm.graph
        self.rule_name, self.anchor, self.module_path, self.kind = rule_name, anchor, module_path, kind
        self.adapter = adapter
        self.inserted: list[fx.Node] = []
        self.params: dict[str, tuple[int, ...]] = {}
        self.saved_keys: dict[str, str] = {}
        self._cursor: fx.Node = anchor

    # -- parameters ----------------------------------------------------------------------------
    def add_parameter(self, attr: str, tensor: torch.Tensor, saved_key: Optional[str] = None,
                      requires_grad: bool = True) -> str:
        """Register ``tensor`` as a parameter at attribute path ``attr``; returns ``attr``.

        If a parameter already sits there (a module called twice shares its adapter), it is kept.
        """
        owner_path, _, leaf = attr.rpartition(".")
        owner = ensure_module(self.gm, owner_path)
        if not isinstance(getattr(owner, leaf, None), nn.Parameter):
            owner.register_parameter(leaf, nn.Parameter(tensor, requires_grad=requires_grad))
        self.params[attr] = tuple(get_attr_path(self.gm, attr).shape)
        if saved_key is not None:
            self.saved_keys[attr] = saved_key
        return attr

    def replace_parameter(self, attr: str, tensor: torch.Tensor) -> None:
        """The graph module's parameter at ``attr`` becomes a new one holding ``tensor`` (same requires_grad).

        Every graph node reading ``attr`` sees the new value; the captured model's own parameter object
        is not changed (the owning module is copied first, see ``own_module``).
        """
        owner_path, _, leaf = attr.rpartition(".")
        old = get_attr_path(self.gm, attr)
        owner = own_module(self.gm, owner_path)
        owner.register_parameter(leaf, nn.Parameter(tensor, requires_grad=old.requires_grad))

    # -- nodes ---------------------------------------------------------------------------------
    def _stamp(self, node: fx.Node) -> fx.Node:
        node.meta[STAMP] = {"rule": self.rule_name, "adapter": self.adapter, "anchor": self.anchor.name}
        if "nn_module_stack" in self.anchor.meta:
            node.meta["nn_module_stack"] = dict(self.anchor.meta["nn_module_stack"])
        self.inserted.append(node)
        self._cursor = node
        return node

    def get_param(self, attr: str) -> fx.Node:
        """A get_attr node for ``attr``, placed right after the cursor."""
        with self.graph.inserting_after(self._cursor):
            return self._stamp(self.graph.get_attr(attr))

    def call(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        """A call_function node placed after the last inserted node (or after the anchor)."""
        with self.graph.inserting_after(self._cursor):
            node = self.graph.call_function(target, tuple(args), kwargs)
        return self._stamp(node)

    def start_before(self, node: fx.Node) -> None:
        """Insert the next nodes just before ``node`` (e.g. to compute a new operand of the anchor)."""
        self._cursor = node.prev

    def add_input(self, name: str, missing_hint: str, check: Optional[Callable[[Any], Optional[str]]] = None) -> fx.Node:
        """A new graph input (keyword argument) ``name``, e.g. task ids; the caller must then pass it.

        ``missing_hint`` is the one-line error raised when a call omits it; ``check(value)``, when given,
        returns None for a good value or the one-line error to raise. Adding it twice returns the same
        placeholder.
        """
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        for node in placeholders:
            if node.target == name:
                return node
        with self.graph.inserting_after(placeholders[-1]) if placeholders else self.graph.inserting_before(None):
            node = self.graph.placeholder(name)
        node.meta[STAMP] = {"rule": self.rule_name, "adapter": self.adapter, "anchor": self.anchor.name}
        _add_keyword_to_input_spec(self.graph, name)
        self.gm.meta.setdefault(EXTRA_INPUTS, {})[name] = missing_hint
        if check is not None:
            self.gm.meta.setdefault(EXTRA_INPUT_CHECKS, {})[name] = check
        return node

    def adopt(self, nodes: list[fx.Node]) -> None:
        """Stamp and record ``nodes`` that a graph helper inserted (e.g. ``graphpeft.engine.sequence``); the cursor stays."""
        cursor = self._cursor
        for node in nodes:
            self._stamp(node)
        self._cursor = cursor

    def call_module(self, path: str, module: nn.Module, *args: Any) -> fx.Node:
        """A call_module node running ``module``, registered at ``path`` (kept if one is there already).

        Its parameters are recorded as added; use it for a stateful block such as an LSTM, whose
        train/eval mode then follows the model's.
        """
        parent, _, leaf = path.rpartition(".")
        owner = ensure_module(self.gm, parent)
        if leaf not in owner._modules:
            owner.add_module(leaf, module)
        for name, param in owner._modules[leaf].named_parameters():
            self.params[f"{path}.{name}"] = tuple(param.shape)
        with self.graph.inserting_after(self._cursor):
            node = self.graph.call_module(path, tuple(args))
        return self._stamp(node)

    def replace_uses(self, old: fx.Node, new: fx.Node) -> None:
        """Every user of ``old`` except the inserted nodes now reads ``new``."""
        inserted = set(self.inserted)
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in inserted)

    def replace_input(self, node: fx.Node, old: fx.Node, new: fx.Node) -> None:
        """``node`` reads ``new`` where it read ``old``; recorded as a change of the anchor."""
        node.replace_input_with(old, new)

    def retarget(self, node: fx.Node, attr: str) -> None:
        """A get_attr node now reads ``attr``."""
        node.target = attr
        node.meta.setdefault(REWRITTEN, []).append((self.rule_name, self.adapter))

    def record(self, **info: Any) -> Rewrite:
        self.anchor.meta.setdefault(REWRITTEN, []).append((self.rule_name, self.adapter))
        return Rewrite(
            rule=self.rule_name, anchor=self.anchor.name, module_path=self.module_path, kind=self.kind,
            adapter=self.adapter,
            inserted=tuple(n.name for n in self.inserted), params=dict(self.params),
            saved_keys=dict(self.saved_keys), info=dict(info),
        )


def own_module(root: nn.Module, path: str) -> nn.Module:
    """The module at ``path`` in ``root``, first replaced by a shallow copy of its own (parameter dict copied).

    A graph module may share submodules with the model it was captured from (symbolic tracing keeps
    call_module targets); giving a parameter a new value on the copy leaves the original model as it was.
    """
    module = ensure_module(root, path)
    if not path:
        return module
    own = copy.copy(module)
    own._parameters, own._buffers, own._modules = dict(module._parameters), dict(module._buffers), dict(module._modules)
    parent_path, _, name = path.rpartition(".")
    setattr(ensure_module(root, parent_path), name, own)
    return own


def extra_inputs(gm: fx.GraphModule, kwargs: dict) -> dict:
    """Inputs a pass added to the graph (e.g. task ids), taken out of ``kwargs``; each is required."""
    wanted, checks = gm.meta.get(EXTRA_INPUTS, {}), gm.meta.get(EXTRA_INPUT_CHECKS, {})
    extras = {name: kwargs.pop(name) for name in list(kwargs) if name in wanted}
    for name, missing_hint in wanted.items():
        if extras.get(name) is None:
            raise GraphPeftError(missing_hint)
        problem = checks[name](extras[name]) if name in checks else None
        if problem:
            raise GraphPeftError(problem)
    return extras
