"""Runs passes in order, checks the graph after each, and names the pass that failed."""

from __future__ import annotations

from typing import Iterable

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase

from graphpeft.engine.errors import GraphPeftError
from graphpeft.engine.result import PassResult, Rewrite


class PassError(RuntimeError):
    """A pass broke the graph (an internal error, not bad input)."""


def run_passes(gm: fx.GraphModule, passes: Iterable[PassBase]) -> PassResult:
    records: list[Rewrite] = []
    modified = False
    for p in passes:
        name = type(p).__name__
        try:
            result = p(gm)
        except GraphPeftError:
            raise
        except Exception as exc:
            raise PassError(f"pass {name} failed: {type(exc).__name__}: {exc}") from exc
        if result is None:
            continue
        gm = result.graph_module
        modified |= result.modified
        records.extend(getattr(result, "records", ()))
        try:
            gm.graph.lint()
        except Exception as exc:
            raise PassError(f"pass {name} left an invalid graph: {exc}") from exc
    return PassResult(gm, modified, tuple(records))
