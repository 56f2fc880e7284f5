"""modules_to_save: whole modules trained beside the adapter, as PEFT's ModulesToSaveWrapper does.

Every parameter of a selected module is cloned to ``<path>.modules_to_save.<adapter>.<name>`` and
the graph reads the clone; the original stays untouched (and is what a disabled adapter sees).

before:  get_attr classifier.weight ─ linear
after:   get_attr classifier.modules_to_save.default.weight ─ linear
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx

from graphpeft.engine.registry import register_rule
from graphpeft.engine.result import Rewrite
from graphpeft.engine.rewriter import REWRITTEN, Rewriter, get_attr_path
from graphpeft.engine.rule import Rule

RULE = "modules_to_save"


def _selected_modules(gm: fx.GraphModule, names: Iterable[str], adapter_params: set[str]) -> list[str]:
    names = list(names or ())
    chosen: list[str] = []
    for path, module in gm.named_modules():
        if not path or any(path.startswith(c + ".") for c in chosen):
            continue
        own = [f"{path}.{name}" for name, _ in module.named_parameters()]
        if ".modules_to_save." in f".{path}." or (own and set(own) <= adapter_params):
            continue  # a container a pass made for its adapter parameters
        if any(path.endswith(n) for n in names):    # PEFT's test: a plain suffix ("pre_classifier" too)
            chosen.append(path)
    return chosen


@register_rule
class ModulesToSave(Rule):
    __doc__ = __doc__
    name = RULE

    @classmethod
    def merged_weights(cls, gm: fx.GraphModule, record: Rewrite) -> dict[str, torch.Tensor]:
        return {record.info[attr]: get_attr_path(gm, attr).detach() for attr in record.params}


def apply_modules_to_save(gm: fx.GraphModule, names: Iterable[str], adapter: str = "default",
                          adapter_params: Iterable[str] = (), key_prefix: str = "base_model.model.") -> list[Rewrite]:
    """Clone the parameters of every module named in ``names`` (not the passes' own ``adapter_params``).

    They are saved as ``<key_prefix><module path>.<name>`` (PEFT: ``base_model.`` for methods that
    leave the model unwrapped, the prompt-learning ones).
    """
    records, adapter_params = [], set(adapter_params)
    for path in _selected_modules(gm, names, adapter_params):
        # the module's own parameters; a pass's parameters inside it (LoRA on a linear named "pre_classifier",
        # which "classifier" matches by suffix) stay the pass's
        readers = [n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target).startswith(path + ".")
                   and str(n.target) not in adapter_params
                   and isinstance(get_attr_path(gm, str(n.target)), torch.nn.Parameter)]
        if not readers or any((RULE, adapter) in n.meta.get(REWRITTEN, ()) for n in readers):
            continue
        rw = Rewriter(gm, RULE, readers[0], path, "module", adapter=adapter)
        originals = {}
        for node in readers:
            leaf = str(node.target)[len(path) + 1:]
            attr = f"{path}.modules_to_save.{adapter}.{leaf}"
            original = get_attr_path(gm, str(node.target))
            rw.add_parameter(attr, original.detach().clone(), f"{key_prefix}{path}.{leaf}")
            originals[attr] = str(node.target)
            rw.retarget(node, attr)
        records.append(rw.record(**originals))
    if records:
        gm.recompile()
    return records
