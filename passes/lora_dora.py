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

In the graph (p = 0) the factor is moved onto the small B: y = addcmul(A x ·B'^T + c, W x + b, m/n) with
B' = s (m/n) B and c = b (1 - m/n), so the activation-sized work is that of plain LoRA (two thin
linears and one fused multiply-add), where PEFT adds four activation-sized ops per module.

before:                     after (p = 0, with bias b):
    x ─ op(W, b) ─ y            x ─ op(W, b) ──────────────────────────── addcmul ─ y
                                └ A ─ linear(B', c) ────────────────────────┘  │
                                A, B ─ detach ─ addmm(W) ─ norm ─ detach ─ div(m) ┘ (m/n also makes B' and c)

The norm is computed once per graph call from the adapter's current A and B, where PEFT also rebuilds
``B A`` through an identity-matrix forward (``lora_B(lora_A(eye))``) per module call.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from graphpeft.engine.rewriter import Rewriter

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
               magnitude_shape: tuple[int, ...]) -> tuple[fx.Node, fx.Node]:
    """Graph nodes computing m / n (n detached): (flat [out], shaped as the magnitude)."""
    a = rw.call(aten.detach.default, rw.get_param(a_attr))
    b = rw.call(aten.detach.default, rw.get_param(b_attr))
    out_rows = rw.gm.get_parameter(b_attr).shape[0]
    r = rw.gm.get_parameter(a_attr).shape[0]
    if rw.gm.get_parameter(a_attr).dim() != 2:      # conv: A [r, in, *k], B [out, r, 1, ...]
        a = rw.call(aten.reshape.default, a, [r, -1])
        b = rw.call(aten.reshape.default, b, [out_rows, r])
    full = rw.call(aten.addmm.default, rows, b, a, beta=1, alpha=scale)       # W + s * B A, one op
    norm = rw.call(aten.linalg_vector_norm.default, full, 2, [1])
    norm = rw.call(aten.detach.default, norm)
    flat = rw.call(aten.div.Tensor, rw.get_param(magnitude_attr) if len(magnitude_shape) == 1 else
                   rw.call(aten.reshape.default, rw.get_param(magnitude_attr), [-1]), norm)
    shaped = flat if len(magnitude_shape) == 1 else rw.call(aten.reshape.default, flat, list(magnitude_shape))
    return flat, shaped


def scaled_b(rw: Rewriter, b: fx.Node, flat: fx.Node, scale: float, b_dims: int) -> fx.Node:
    """B' = s * (m / n) * B row by row: the branch comes out already multiplied by s * m / n, so the
    activation-sized work stays that of plain LoRA (the multiply touches out * r numbers)."""
    factor = rw.call(aten.mul.Tensor, flat, scale)
    factor = rw.call(aten.reshape.default, factor, [-1] + [1] * (b_dims - 1))
    return rw.call(aten.mul.Tensor, b, factor)


def bias_correction(rw: Rewriter, bias: fx.Node, flat: fx.Node) -> fx.Node:
    """c = b * (1 - m / n): with it as the branch's bias, (m / n) * (W x + b) + branch + c = (m / n) * W x + branch + b."""
    return rw.call(aten.mul.Tensor, bias, rw.call(aten.rsub.Scalar, flat, 1))


def combine(rw: Rewriter, base: fx.Node, branch: fx.Node, mns: fx.Node, base_dropped: Optional[fx.Node] = None) -> fx.Node:
    """The DoRA output from the base op's output, the branch (already times s * m / n, see ``scaled_b``) and m / n.

    p = 0: ``addcmul(branch, base, m / n)`` (one fused op; the branch carries the bias correction).
    ``base_dropped`` (lora dropout p > 0, PEFT's form): base + (m / n - 1) * W d(x) + branch.
    """
    if base_dropped is None:
        return rw.call(aten.addcmul.default, branch, base, mns)
    factor = rw.call(aten.sub.Tensor, mns, 1)
    out = rw.call(aten.add.Tensor, base, rw.call(aten.mul.Tensor, base_dropped, factor))
    return rw.call(aten.add.Tensor, out, branch)


def merged_rows(rows: torch.Tensor, delta: torch.Tensor, scale: float, magnitude: torch.Tensor) -> torch.Tensor:
    """W' = (m / n) * (W + s * delta) row by row, in [out, in] rows."""
    full = rows + scale * delta
    norm = torch.linalg.vector_norm(full, dim=1)
    return (magnitude.reshape(-1) / norm).unsqueeze(1) * full
