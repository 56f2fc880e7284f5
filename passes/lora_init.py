"""PiSSA and OLoRA initialisation for the LoRA rule (PEFT's ``init_lora_weights="pissa"``,
``"pissa_niter_K"``, ``"olora"``), and their conversion to a plain LoRA adapter when saving.

Part of the LoRA rule (passes/lora.py calls it); not a rule of its own.

Maths, on the weight W [out, in] (GPT-2's Conv1D transposed), s the LoRA scaling, r the rank:

    pissa         W = U S V^T (full SVD);  B = U_r sqrt(S_r / s),  A = sqrt(S_r / s) V_r^T
    pissa_niter_K the same from torch.svd_lowrank(W, r, niter=K) (randomised, as PEFT)
    olora         W = Q R (QR);            B = Q[:, :r],  A = R[:r]

and the base weight keeps the residual ``W_res = W - s B A``, so the adapted model starts as the base
model: W_res x + s B A x = W x. The graph's weight becomes W_res; the captured model's own tensor is
left as it was (PEFT overwrites the base layer's weight in place).

Conversion (PEFT's ``path_initial_model_for_weight_conversion``): with A0, B0 the initial values,
W_res + s B A = W + s (B A - B0 A0) = W + s [B | -B0] [A ; A0], a plain LoRA of rank 2r (alpha doubled,
or times sqrt 2 with rsLoRA, so that the scaling stays s) on the original weight.

before:  x ─ linear(W) ─ y       after:  x ─ linear(W_res) ─ add ─ y
                                         └ A ─ B ─ mul(s) ──┘
"""

from __future__ import annotations

import math
import re
from typing import Any, Union

import torch

from graphpeft.engine.errors import GraphPeftError

DECOMPOSING = re.compile(r"^(pissa(_niter_\d+)?|olora)$")


def is_decomposing(init: Union[bool, str]) -> bool:
    """True for the inits that take the adapter from the base weight (and leave it the residual)."""
    return isinstance(init, str) and DECOMPOSING.match(init) is not None


def decompose(init: str, rows: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) in float32 from the weight rows [out, in], as PEFT computes them."""
    w = rows.detach().to(torch.float32)
    if init == "olora":
        q, rr = torch.linalg.qr(w)
        return rr[:r].contiguous(), q[:, :r].contiguous()
    if init == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        ur, sr, vhr = u[:, :r], s[:r] / scale, vh[:r]
    else:
        u, s, v = torch.svd_lowrank(w, r, niter=int(init.split("_niter_")[-1]))
        ur, sr, vhr = u, s / scale, v.t()
    return torch.diag(torch.sqrt(sr)) @ vhr, ur @ torch.diag(torch.sqrt(sr))


def converted_state(state: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain LoRA state of rank 2r: A' = [A ; A0], B' = [B | -B0] (PEFT's subtract_mutated_init)."""
    out = {}
    for key, value in state.items():
        if key not in initial:
            raise GraphPeftError(f"the initial adapter lacks {key}; pass the folder saved right after rewriting "
                                 f"with this init, before training")
        if ".lora_A." in key:
            out[key] = torch.cat([value, initial[key].to(value.dtype)], dim=0)
        elif ".lora_B." in key:
            out[key] = torch.cat([value, -initial[key].to(value.dtype)], dim=1)
        else:
            out[key] = value
    return out


def converted_config(data: dict[str, Any]) -> dict[str, Any]:
    """adapter_config.json of the converted adapter, as PEFT writes it."""
    data = dict(data, init_lora_weights=True, r=2 * data["r"])
    data["lora_alpha"] = data["lora_alpha"] * (math.sqrt(2) if data.get("use_rslora") else 2)
    for name in ("rank_pattern", "alpha_pattern"):
        if data.get(name):
            data[name] = {k: 2 * v for k, v in data[name].items()}
    return data
