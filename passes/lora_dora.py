"""DoRA for the LoRA rule (PEFT's ``use_dora=True``): weight-decomposed low-rank adaptation.

Part of the LoRA rule (passes/lora.py calls it); not a rule of its own.

Maths (PEFT's DoraLinearLayer; Liu et al. 2024, section 4.3). With the weight in [out, in] rows
``W`` (GPT-2's Conv1D transposed, a convolution flattened to [out, in * k], an embedding transposed to
[dim, num]), ``V = W + s * B A`` and ``n = ||V||`` row by row, computed from detached A and B and
detached itself (the paper treats it as a constant: no gradient flows through it), and ``m`` the
trained magnitude (initialised to ``n``):

    y = (m / n) * (W x + s * B A x) + b                      (p = 0, or eval mode)
    y = W x + b + (m / n - 1) * W d(x) + (m / n) * s * B A d(x)   (lora dropout d with p > 0, PEFT's form)

Merged: ``W' = (m / n) * V`` row by row; the bias is unchanged.

before:                     after (p = 0, with bias b):
    x ─ op(W, b) ─ y            x ─ op(W, b) ─ sub(b) ─ add ─ mul ─ add(b) ─ y
                                └ A ─ B ─ mul(s) ────────┘     │
                                A, B ─ detach ─ mm ─ add(W) ─ norm ─ detach ─ div(m) ┘

The norm is computed once per graph call from the adapter's current A and B, where PEFT also rebuilds
``B A`` through an identity-matrix forward (``lora_B(lora_A(eye))``) per module call.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from graphpeft.rewriter import Rewriter

aten = torch.ops.aten


def initial_magnitude(rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                      shape: tuple[int, ...]) -> torch.Tensor:
    """m = ||W + s * B A|| per row, in the magnitude's own shape (PEFT: [out], conv [1, out, 1, ...])."""
    r = a.shape[0]
    with torch.no_grad():
        delta = b.reshape(b.shape[0], r).float() @ a.reshape(r, -1).float()
        norm = torch.linalg.vector_norm(rows.float() + scale * delta, dim=1)
    return norm.reshape(shape).to(rows.dtype)


def norm_scale(rw: Rewriter, rows: fx.Node, a_attr: str, b_attr: str, scale: float, magnitude_attr: str,
               magnitude_shape: tuple[int, ...]) -> fx.Node:
    """Graph nodes computing m / n (n detached), shaped as the magnitude."""
    a = rw.call(aten.detach.default, rw.get_param(a_attr))
    b = rw.call(aten.detach.default, rw.get_param(b_attr))
    out_rows = rw.gm.get_parameter(b_attr).shape[0]
    r = rw.gm.get_parameter(a_attr).shape[0]
    if rw.gm.get_parameter(a_attr).dim() != 2:      # conv: A [r, in, *k], B [out, r, 1, ...]
        a = rw.call(aten.reshape.default, a, [r, -1])
        b = rw.call(aten.reshape.default, b, [out_rows, r])
    delta = rw.call(aten.mm.default, b, a)
    delta = rw.call(aten.mul.Tensor, delta, scale)
    full = rw.call(aten.add.Tensor, rows, delta)
    norm = rw.call(aten.linalg_vector_norm.default, full, 2, [1])
    norm = rw.call(aten.detach.default, norm)
    if len(magnitude_shape) != 1:
        norm = rw.call(aten.reshape.default, norm, list(magnitude_shape))
    return rw.call(aten.div.Tensor, rw.get_param(magnitude_attr), norm)


def combine(rw: Rewriter, base: fx.Node, branch: fx.Node, mns: fx.Node, bias: Optional[fx.Node],
            base_dropped: Optional[fx.Node] = None) -> fx.Node:
    """The DoRA output from the base op's output, the scaled LoRA branch and m / n (see the module maths).

    ``bias`` is the base op's bias, already shaped to broadcast (None: no bias, or an embedding);
    ``base_dropped`` the base op without bias on the dropped-out input (lora dropout p > 0).
    """
    if base_dropped is not None:
        factor = rw.call(aten.sub.Tensor, mns, 1)
        h = rw.call(aten.mul.Tensor, base_dropped, factor)
        out = rw.call(aten.add.Tensor, base, h)
        return rw.call(aten.add.Tensor, out, rw.call(aten.mul.Tensor, branch, mns))
    h = base if bias is None else rw.call(aten.sub.Tensor, base, bias)
    h = rw.call(aten.add.Tensor, h, branch)
    h = rw.call(aten.mul.Tensor, h, mns)
    return h if bias is None else rw.call(aten.add.Tensor, h, bias)


def merged_rows(rows: torch.Tensor, delta: torch.Tensor, scale: float, magnitude: torch.Tensor) -> torch.Tensor:
    """W' = (m / n) * (W + s * delta) row by row, in [out, in] rows."""
    full = rows + scale * delta
    norm = torch.linalg.vector_norm(full, dim=1)
    return (magnitude.reshape(-1) / norm).unsqueeze(1) * full
