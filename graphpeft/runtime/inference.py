"""Merging for inference: every adapter folded into its weight, in an eval-only copy of the graph."""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from graphpeft.engine.errors import GraphPeftError
from graphpeft.runtime.model import CapturedModel
from graphpeft.runtime.optimize import drop_identity_dropout

def merge_for_inference(model: Any) -> Any:
    """An eval-only module with every adapter merged into its weight: the base graph, no adapter nodes.

    W' = W + s * B A per site (each rule says how, through ``merged_weights``), then eval-mode dropout
    removed as well. The result computes the adapted model's eval outputs (to float rounding) at the
    base model's cost; it refuses ``.train()``. The merged weights are new tensors: the model and its
    base weights are not changed, and the merged module costs one copy of every merged weight.

        before:  x ─ linear(W) ─ add ─ y        after:  x ─ linear(W') ─ y
                 └ linear(A) ─ linear(B) ┘
    """
    merged = model.merged_graph()
    gm = merged.graph_module
    inference = InferenceModel(gm)
    drop_identity_dropout(gm, inference=True)
    return inference


class InferenceModel(CapturedModel):
    """A merged, eval-only graph (``merge_for_inference``): the base model's cost, the adapted outputs."""

    def __init__(self, graph_module: fx.GraphModule):
        super().__init__(graph_module)
        self.eval()

    def train(self, mode: bool = True) -> "InferenceModel":
        if mode:
            raise GraphPeftError("a model merged for inference cannot train (its dropout is gone); train the "
                                 "GraphPeftModel and call merge_for_inference again")
        return super().train(False)


__all__ = ["InferenceModel", "merge_for_inference"]
