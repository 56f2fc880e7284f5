"""What a pass returns: torch.fx's PassResult, extended with one record per rewritten site."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult as _FxPassResult


@dataclass(frozen=True)
class Rewrite:
    """One rewritten site.

    rule         the rule that rewrote it (its registry name)
    anchor       name of the graph node the rule anchored on
    module_path  module path of the site (PEFT's module key)
    kind         op kind of the anchor (linear, addmm, mm, embedding, einsum, matmul, ...)
    inserted     names of the nodes inserted into the graph
    params       graph attribute name -> shape of every parameter the rule added
    saved_keys   graph attribute name -> key in PEFT's adapter_model.safetensors
    adapter      the adapter name the site belongs to
    info         rule-specific facts needed later (scaling, weight attribute, layout, ...)
    """

    rule: str
    anchor: str
    module_path: str
    kind: str
    adapter: str = "default"
    inserted: tuple[str, ...] = ()
    params: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    saved_keys: Mapping[str, str] = field(default_factory=dict)
    info: Mapping[str, object] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "rule": self.rule,
            "anchor": self.anchor,
            "module_path": self.module_path,
            "kind": self.kind,
            "adapter": self.adapter,
            "inserted": list(self.inserted),
            "params": {k: list(v) for k, v in self.params.items()},
            "saved_keys": dict(self.saved_keys),
            "info": {k: v for k, v in self.info.items() if isinstance(v, (str, int, float, bool, type(None)))},
        }


class PassResult(_FxPassResult):
    """``PassResult(graph_module, modified, records)``; unpacks like torch.fx's two-field result."""

    def __new__(cls, graph_module: fx.GraphModule, modified: bool, records: tuple[Rewrite, ...] = ()):
        self = super().__new__(cls, graph_module, modified)
        self.records = tuple(records)
        return self
