"""Quantized linear ops that ``torch.export`` can capture: ``torch.library`` custom ops with a fake (meta)
implementation and an autograd formula, so a frozen quantized weight is one op in the graph.

    graphpeft::linear_4bit(x, W4 uint8 packed, bias?, absmax, code, absmax_8bit?, absmax_code?, offset?,
                           compute_dtype?, weight_dtype, blocksize, quant_type, in_features, out_features)
        y = x dequant4(W4)^T + b            (bitsandbytes' gemm_4bit: NF4 / FP4, with or without double quant,
                                             in the compute dtype; y in x's dtype; weight_dtype is the dtype the
                                             weight was quantized from, which dequantization returns)
    graphpeft::linear_int8(x, W8 int8 [out, in], bias?, scale [out], scale_output, factor, in_features, out_features)
        y = x (W8 * (scale * factor)[:, None])^T + b   (bitsandbytes' 8-bit CPU training path: scale = SCB,
                                                        factor = 1/127, in bitsandbytes' order of operations)
        y = (x W8^T) * scale + b           (scale_output: torchao's int8 weight-only path, per-row scale)

Backward: dx = dy dequant(W) (the weight is dequantized again, as bitsandbytes does, never stored in float),
db = sum(dy); the quantized weight gets no gradient. ``match.py`` counts both ops as linear sites (weight operand args[1], bias
args[2], features from the last two arguments), so LoRA, AdaLoRA and IA3 anchor on them unchanged.

The 4-bit kernels come from bitsandbytes (imported when the op runs); the int8 op is plain PyTorch.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from graphpeft.engine.match import register_quantized_linear


# -- 4-bit (bitsandbytes) --------------------------------------------------------------------------

def _quant_state(absmax: Tensor, code: Tensor, absmax_8bit: Optional[Tensor], absmax_code: Optional[Tensor],
                 offset: Optional[Tensor], blocksize: int, quant_type: str, in_features: int, out_features: int,
                 dtype: torch.dtype):
    from bitsandbytes.functional import QuantState

    if absmax_8bit is None:
        return QuantState(absmax=absmax, shape=torch.Size([out_features, in_features]), code=code,
                          blocksize=blocksize, quant_type=quant_type, dtype=dtype)
    nested = QuantState(absmax=absmax, code=absmax_code, blocksize=256, dtype=torch.float32)
    return QuantState(absmax=absmax_8bit, shape=torch.Size([out_features, in_features]), code=code,
                      blocksize=blocksize, quant_type=quant_type, dtype=dtype, offset=offset, state2=nested)


def dequantize_4bit(weight: Tensor, absmax: Tensor, code: Tensor, absmax_8bit: Optional[Tensor],
                    absmax_code: Optional[Tensor], offset: Optional[Tensor], blocksize: int, quant_type: str,
                    in_features: int, out_features: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The float weight [out, in] of a packed 4-bit one (bitsandbytes' dequantize_4bit)."""
    from bitsandbytes.functional import dequantize_4bit as bnb_dequantize

    state = _quant_state(absmax, code, absmax_8bit, absmax_code, offset, blocksize, quant_type, in_features,
                         out_features, dtype)
    return bnb_dequantize(weight.view(-1, 1), state)


@torch.library.custom_op("graphpeft::linear_4bit", mutates_args=())
def linear_4bit(x: Tensor, weight: Tensor, bias: Optional[Tensor], absmax: Tensor, code: Tensor,
                absmax_8bit: Optional[Tensor], absmax_code: Optional[Tensor], offset: Optional[Tensor],
                compute_dtype: Optional[torch.dtype], weight_dtype: torch.dtype, blocksize: int, quant_type: str,
                in_features: int, out_features: int) -> Tensor:
    # bitsandbytes' Linear4bit.forward: x and the bias in the compute dtype, then MatMul4Bit's gemm_4bit call,
    # the result in x's dtype
    a = x.to(compute_dtype) if compute_dtype is not None else x
    bias = bias.to(a.dtype) if bias is not None else None
    ops = torch.ops.bitsandbytes
    if absmax_8bit is None:
        y = ops.gemm_4bit.default(a, weight.view(-1, 1), [out_features, in_features], absmax, blocksize,
                                  quant_type, bias=bias)
    else:
        y = ops.gemm_4bit.default(a, weight.view(-1, 1), [out_features, in_features], absmax, blocksize, quant_type,
                                  bias=bias, absmax_8bit=absmax_8bit, absmax_code=absmax_code, absmax_offset=offset)
    return y.to(x.dtype)


@linear_4bit.register_fake
def _(x, weight, bias, absmax, code, absmax_8bit, absmax_code, offset, compute_dtype, weight_dtype, blocksize,
      quant_type, in_features, out_features):
    torch._check(x.shape[-1] == in_features, lambda: f"linear_4bit: input has {x.shape[-1]} features, "
                                                     f"the weight {in_features}")
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_4bit(ctx, inputs, output):
    x, weight, bias, absmax, code, absmax_8bit, absmax_code, offset, compute, weight_dtype, blocksize, quant_type, \
        fin, fout = inputs
    ctx.save_for_backward(weight, absmax, code, absmax_8bit, absmax_code, offset)
    ctx.args = (blocksize, quant_type, fin, fout, weight_dtype)
    ctx.dtypes = (x.dtype, compute if compute is not None else x.dtype, bias.dtype if bias is not None else None)


def _backward_4bit(ctx, grad):
    weight, absmax, code, absmax_8bit, absmax_code, offset = ctx.saved_tensors
    x_dtype, compute, bias_dtype = ctx.dtypes
    grad_x = grad_bias = None
    g = grad.to(compute)
    if ctx.needs_input_grad[0]:
        # bitsandbytes' MatMul4Bit.backward: dequantized in the weight's own dtype, then cast to the gradient's
        w = dequantize_4bit(weight, absmax, code, absmax_8bit, absmax_code, offset, *ctx.args)
        grad_x = (g @ w.to(compute)).to(x_dtype)
    if bias_dtype is not None and ctx.needs_input_grad[2]:
        grad_bias = g.reshape(-1, g.shape[-1]).sum(0).to(bias_dtype)
    return (grad_x, None, grad_bias) + (None,) * 11


linear_4bit.register_autograd(_backward_4bit, setup_context=_setup_4bit)


# -- int8 weight, one scale per output row ----------------------------------------------------------

@torch.library.custom_op("graphpeft::linear_int8", mutates_args=())
def linear_int8(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, scale_output: bool, factor: float,
                in_features: int, out_features: int) -> Tensor:
    if scale_output:    # torchao's weight-only path: (x W8^T) * scale, then + b
        y = torch.mm(x.reshape(-1, in_features), weight.t().to(x.dtype)) * scale.to(x.dtype).flatten()
        y = y.reshape(*x.shape[:-1], out_features)
        return (y + bias if bias is not None else y).to(x.dtype)
    # bitsandbytes' CPU path (MatMul8bitFp): linear(x, CB * (SCB / 127)[:, None], b)
    return torch.nn.functional.linear(x, _int8_weight(weight, scale, factor, x.dtype), bias)


def _int8_weight(weight: Tensor, scale: Tensor, factor: float, dtype: torch.dtype) -> Tensor:
    return weight.to(dtype).mul_(scale.unsqueeze(1).mul(factor))


@linear_int8.register_fake
def _(x, weight, bias, scale, scale_output, factor, in_features, out_features):
    torch._check(x.shape[-1] == in_features, lambda: f"linear_int8: input has {x.shape[-1]} features, "
                                                     f"the weight {in_features}")
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_int8(ctx, inputs, output):
    x, weight, bias, scale, scale_output, factor = inputs[:6]
    ctx.save_for_backward(weight, scale)
    ctx.has_bias, ctx.factor = bias is not None, factor


def _backward_int8(ctx, grad):
    weight, scale = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ _int8_weight(weight, scale.to(grad.dtype), ctx.factor, grad.dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, grad_bias, None, None, None, None, None


linear_int8.register_autograd(_backward_int8, setup_context=_setup_int8)

# in_features, out_features are the last two arguments of both ops (torch.fx's symbolic trace records the packet)
for _op, _features in ((torch.ops.graphpeft.linear_4bit, (12, 13)), (torch.ops.graphpeft.linear_int8, (6, 7))):
    register_quantized_linear(_op.default, *_features)
    register_quantized_linear(_op, *_features)
