"""Merging for the LoRA rule: the weights a LoRA site leaves in its base op when merged (``W' = W + s * B A``).

Part of the LoRA rule (``LoraRule.merged_weights`` is this function); not a rule of its own.

    linear / conv / Conv1D      W' = W + s * B A        (rows of W: [out, in], a kernel flattened, Conv1D transposed)
    embedding                   W'^T = W^T + s * B A    (A [r, num], B [dim, r])
    experts W [E, out, in]      W'_e = W_e + s * B_e A_e  (PEFT's einsum "o r e, e r i -> e o i")
    DoRA                        W' = (m / n) * (W + s * B A) row by row (passes/lora_dora.py)
    lora_bias                   b' = b + s * b_B        (refused when the base op has no bias, as PEFT)
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphpeft.engine.errors import GraphPeftError
from graphpeft.engine.match import PARAM_KINDS
from graphpeft.engine.result import Rewrite
from graphpeft.engine.rewriter import get_attr_path
from graphpeft.passes.lora_dora import merged_rows


def merged_weights(gm: fx.GraphModule, record: Rewrite) -> dict[str, torch.Tensor]:
    info = record.info
    weight = get_attr_path(gm, info["weight"]).detach()
    scale = float(info["scaling"])

    def param(part: str) -> torch.Tensor:
        key = next(k for k in record.params if f".{part}." in f"{k}." and not k.endswith(".bias"))
        return get_attr_path(gm, key).detach()

    if weight.dim() == 3 and record.kind in PARAM_KINDS:      # MoE experts [E, out, in]
        a, b = param("lora_A"), param("lora_B")
        e, out, fin = weight.shape
        delta = torch.einsum("ore,eri->eoi", b.reshape(out, -1, e), a.reshape(e, -1, fin))
        return {info["weight"]: (weight + scale * delta).to(weight.dtype)}
    if record.kind == "embedding":
        a, b = param("lora_embedding_A"), param("lora_embedding_B")
        rows, delta = weight.T, b @ a                                   # [dim, num]
    else:
        a, b = param("lora_A"), param("lora_B")
        r = a.shape[0]
        delta = b.reshape(b.shape[0], r) @ a.reshape(r, -1)            # conv: B is 1x1, so this is exact
        rows = weight.T if info["layout"] == "in_out" else weight.reshape(weight.shape[0], -1)
    if info.get("dora"):
        new_rows = merged_rows(rows, delta, scale, param("lora_magnitude_vector"))
    else:
        new_rows = rows + scale * delta
    merged = new_rows.T if (record.kind == "embedding" or info["layout"] == "in_out") else new_rows.reshape(weight.shape)
    out = {info["weight"]: merged.to(weight.dtype)}
    if info.get("lora_bias"):
        if info.get("bias") is None:
            raise GraphPeftError(f"cannot merge lora_bias at {record.module_path}: its base layer has no bias "
                                 f"(PEFT refuses it too); keep the adapter model as it is")
        lora_b = next(get_attr_path(gm, k) for k in record.params if k.endswith(".bias")).detach()
        base = get_attr_path(gm, info["bias"]).detach()
        out[info["bias"]] = (base + scale * lora_b).to(base.dtype)
    return out
