"""A rule is three small parts — pattern, check, rewrite — and ``RulePass`` runs one over a graph.

    pattern   ``sites(gm)``: which nodes the rule anchors on
    check     ``check(site)``: decides, never mutates; returns None to accept or the reason it declines
    rewrite   ``rewrite(gm, site)``: mutates only through a Rewriter, returns its Rewrite record

``RulePass`` follows torch.fx's pass contract and returns ``PassResult(gm, modified, records)``.
Inserted nodes are stamped and never offered again as sites, so a pass applied twice changes nothing.
A pass that matches nothing raises NoMatchError, repeating the targets and the nearest module paths.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase

from graphpeft.engine.errors import NoMatchError
from graphpeft.engine.match import find_sites, nearest_paths
from graphpeft.engine.result import PassResult, Rewrite
from graphpeft.engine.rewriter import was_rewritten


class Rule:
    """Base class of every rule. Subclasses set ``name`` and implement the three parts."""

    name: ClassVar[str] = ""
    # False for rules whose change is not a weight update (prompt or prefix tokens): merge refuses them
    mergeable: ClassVar[bool] = True

    def __init__(self, config: Any, adapter_name: str = "default"):
        self.config = config
        self.adapter_name = adapter_name

    def sites(self, gm: fx.GraphModule) -> list[Any]:
        raise NotImplementedError

    def check(self, site: Any) -> Optional[str]:
        return None

    def rewrite(self, gm: fx.GraphModule, site: Any) -> Rewrite:
        raise NotImplementedError

    # -- what the engine asks of a rule after rewriting ------------------------------------------
    @classmethod
    def merged_weights(cls, gm: fx.GraphModule, record: Rewrite) -> dict[str, torch.Tensor]:
        """{weight attribute: merged value} for this record's site; empty when it cannot merge."""
        return {}

    @classmethod
    def saved_config(cls, data: dict[str, Any], records: list[Rewrite]) -> dict[str, Any]:
        """adapter_config.json as written for this rule's ``records`` (e.g. resolved site lists); as is by default."""
        return data


class RulePass(PassBase):
    """Runs one rule over every site it accepts."""

    rule_cls: ClassVar[type[Rule]]

    def __init__(self, config: Any, adapter_name: str = "default"):
        self.config = config
        self.adapter_name = adapter_name
        self.rule = self.rule_cls(config, adapter_name)
        self.declined: list[tuple[str, str]] = []   # (module path, reason)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        records, self.declined = [], []
        sites = self.rule.sites(graph_module)
        fresh = [s for s in sites if not was_rewritten(s.node, self.rule.name, self.adapter_name)]
        if sites and not fresh:  # applied before: a second application changes nothing
            return PassResult(graph_module, False, ())
        for site in fresh:
            reason = self.rule.check(site)
            if reason is not None:
                self.declined.append((getattr(site, "module_path", str(site)), reason))
                continue
            records.append(self.rule.rewrite(graph_module, site))
        if not records:
            raise self.no_match(graph_module)
        graph_module.graph.lint()
        graph_module.recompile()
        return PassResult(graph_module, True, tuple(records))

    def no_match(self, gm: fx.GraphModule) -> NoMatchError:
        targets = getattr(self.config, "target_modules", None) or getattr(self.config, "target_parameters", None)
        if self.declined:
            path, reason = self.declined[0]
            return NoMatchError(f"{self.rule.name}: every matched site was declined, e.g. {path}: {reason}")
        near = nearest_paths(targets, (s.module_path for s in find_sites(gm)))
        if targets is None:
            return NoMatchError(f"{self.rule.name}: no target_modules given and no default site found in the graph "
                                f"(no attention site); pass target_modules, e.g. one of: {', '.join(near) or '(none)'}")
        return NoMatchError(f"{self.rule.name}: target_modules={targets!r} matched no site in the graph; "
                            f"nearest module paths: {', '.join(near) or '(none: the graph has no weight ops)'}")
