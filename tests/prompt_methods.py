"""The three prompt methods as the prompt tests build them (prompt tuning, P-tuning, multitask prompt tuning), and
the [B, V, H] prompts each computes from a rewritten model's own parameters (PEFT's formulas)."""

from __future__ import annotations

import graphpeft
from graphpeft.engine.rewriter import get_attr_path

PROMPT_METHODS = ["prompt_tuning", "p_tuning", "multitask_prompt_tuning"]


def prompt_config(method: str, v: int, **kw):
    if method == "prompt_tuning":
        return graphpeft.PromptTuningConfig(num_virtual_tokens=v, **kw)
    if method == "p_tuning":
        return graphpeft.PromptEncoderConfig(num_virtual_tokens=v, **kw)
    return graphpeft.MultitaskPromptTuningConfig(num_virtual_tokens=v, num_tasks=2, num_ranks=2, **kw)


def task_inputs(method: str, tasks) -> dict:
    """``task_ids`` for multitask prompt tuning, nothing for the others."""
    return {"task_ids": tasks} if method == "multitask_prompt_tuning" else {}


def prompts(ours, method: str, batch: int, v: int, tasks):
    """The first ``v`` prompt rows of every example, [batch, v, hidden]."""
    gm = ours.graph_module
    if method == "prompt_tuning":
        return get_attr_path(gm, "prompt_encoder.default.embedding.weight")[:v].expand(batch, -1, -1)
    if method == "p_tuning":
        return get_attr_path(gm, "prompt_encoder.default")()[:v].expand(batch, -1, -1)
    table = get_attr_path(gm, "prompt_encoder.default.embedding.weight")
    cols = get_attr_path(gm, "prompt_encoder.default.prefix_task_cols")
    rows = get_attr_path(gm, "prompt_encoder.default.prefix_task_rows")
    return (table * (cols[tasks] @ rows[tasks]))[:, :v]
