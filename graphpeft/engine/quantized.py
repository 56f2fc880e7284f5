"""Quantized bases (QLoRA): capture a model whose linear layers are stored quantized.

``torch.export`` cannot trace bitsandbytes' weight subclasses (``Params4bit``, ``Int8Params``), and torchao's
``Int8Tensor`` exports as inner-tensor accesses and an ``mm`` that no rule recognizes as a weight op. During
capture, each quantized layer is swapped for a stand-in module that holds the same packed tensors (shared,
not copied) and calls one custom op (graphpeft/quantized_ops.py):

    bitsandbytes Linear4bit (NF4/FP4, double quant)  ->  graphpeft::linear_4bit(x, W4, b, absmax, ...)
    bitsandbytes Linear8bitLt (int8, has_fp16_weights=False) ->  graphpeft::linear_int8(x, W8, b, SCB, 1/127, ...)
    nn.Linear with a torchao Int8Tensor weight (per row)    ->  graphpeft::linear_int8(x, W8, b, scale, ...)

before (eager):  x ─ Linear4bit(Params4bit) ─ y
graph:           x ─ graphpeft::linear_4bit(W4 frozen uint8, absmax, code, compute dtype) ─ y
after LoRA:      x ─ linear_4bit ─┬─ add ─ y         (the branch runs in the adapter's dtype, float32,
                 └ dropout ─ A ─ B ─ mul(s) ┘           on x as the layer receives it, as in PEFT)

The model itself is restored after capture; the graph keeps the quantized weights frozen. A LoRA branch
trained on such a base has PEFT's keys, so its adapter loads on the quantized and the unquantized base.

``quantize_model`` quantizes a loaded model in place (the command line's ``--quantize``: ``nf4``, ``fp4``,
``int8``, ``torchao-int8``), ``load_quantized`` loads a checkpoint quantized through transformers; without the
libraries both raise a one-line error naming the ``graphpeft[quant]`` extra.

Merging (PEFT's merge into bitsandbytes / torchao layers): each adapted weight is dequantized as its library does,
a rule forms W' = W + s B A (or W * l) on that float32 weight, and W' is quantized again into the same kind:

    merged graph:  linear_4bit(x, W4, absmax, ...)        ->  linear_4bit(x, quant(W')4, absmax', ...)
    merged model:  Linear4bit(Params4bit(W))               ->  Linear4bit(Params4bit(W'))   (Int8Params, Int8Tensor alike)
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import fx, nn

from graphpeft.engine.errors import GraphPeftError
from graphpeft.engine.rewriter import get_attr_path, own_module

QUANTIZE_CHOICES = ("nf4", "fp4", "int8", "torchao-int8")
BNB_INT8_FACTOR = 1.0 / 127.0       # bitsandbytes' int8 row statistic SCB is the row's absmax: W = CB * SCB / 127
_EXTRA = "pip install 'graphpeft[quant]'"


def require(library: str) -> None:
    """One-line error naming the extra when ``library`` (bitsandbytes / torchao) is not installed."""
    if importlib.util.find_spec(library) is None:
        raise GraphPeftError(f"quantized bases need {library}, which is not installed: {_EXTRA} "
                             f"(bitsandbytes and torchao)")


def require_for(quantize: str) -> None:
    """The library a ``--quantize`` choice needs, or the one-line error naming the extra."""
    require("torchao" if quantize == "torchao-int8" else "bitsandbytes")


# -- stand-ins ------------------------------------------------------------------------------------

def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.detach(), requires_grad=False)


class Linear4bitGraph(nn.Module):
    """bitsandbytes' Linear4bit as one capturable op; the packed weight and its quant state are shared."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight, state = layer.weight, layer.weight.quant_state
        if state is None:
            raise GraphPeftError(f"{type(layer).__name__} has no quantization state; move the model to its device "
                                 f"(bitsandbytes quantizes on .to()) before rewriting it")
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks CPU weights in place for no-grad inference; back to its canonical layout
            layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            weight, state = layer.weight, layer.weight.quant_state
        if state.nested and state.state2.blocksize != 256:
            raise GraphPeftError("bitsandbytes 4-bit double quantization with a nested block size other than 256 "
                                 "is not supported (bitsandbytes' matmul refuses it too)")
        self.out_features, self.in_features = int(state.shape[0]), int(state.shape[1])
        self.blocksize, self.quant_type = int(state.blocksize), str(state.quant_type)
        self.compute_dtype: Optional[torch.dtype] = getattr(layer, "compute_dtype", None)
        self.weight_dtype: torch.dtype = state.dtype          # what bitsandbytes dequantizes into
        self.weight = _frozen(weight.data)
        self.bias = layer.bias
        self.register_buffer("absmax", state.state2.absmax if state.nested else state.absmax)
        self.register_buffer("code", state.code)
        self.register_buffer("absmax_8bit", state.absmax if state.nested else None)
        self.register_buffer("absmax_code", state.state2.code if state.nested else None)
        offset = state.offset if state.nested else None
        self.register_buffer("offset", torch.as_tensor(offset) if offset is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the op casts to the compute dtype itself: a rule's branch sees x as the layer does, as in PEFT
        return torch.ops.graphpeft.linear_4bit(x, self.weight, self.bias, self.absmax, self.code, self.absmax_8bit,
                                               self.absmax_code, self.offset, self.compute_dtype, self.weight_dtype,
                                               self.blocksize, self.quant_type, self.in_features, self.out_features)


class LinearInt8Graph(nn.Module):
    """An int8 weight with one scale per output row (bitsandbytes 8-bit, torchao int8 weight-only).

    The weight is ``W8 * (scale * factor)`` row by row: bitsandbytes keeps ``SCB`` (factor 1/127), torchao the scale.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], scale_output: bool,
                 factor: float = 1.0):
        super().__init__()
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.scale_output, self.factor = scale_output, factor
        self.weight = _frozen(weight)
        self.bias = bias
        self.register_buffer("scale", scale.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return torch.ops.graphpeft.linear_int8(x, self.weight, bias, self.scale, self.scale_output, self.factor,
                                               self.in_features, self.out_features)


def _int8_bnb(layer: nn.Module) -> nn.Module:
    if layer.state.has_fp16_weights:
        return None          # weights kept in float: an ordinary linear to capture
    cb = layer.state.CB if layer.state.CB is not None else getattr(layer.weight, "CB", None)
    scb = layer.state.SCB if layer.state.SCB is not None else getattr(layer.weight, "SCB", None)
    if cb is None or scb is None:
        raise GraphPeftError(f"{type(layer).__name__} holds no int8 weight yet; move the model to its device "
                             f"(bitsandbytes quantizes on .to()) before rewriting it")
    return LinearInt8Graph(cb.data, scb, layer.bias, scale_output=False, factor=BNB_INT8_FACTOR)


def _int8_torchao(layer: nn.Linear, path: str) -> nn.Module:
    w = layer.weight
    per_row = list(getattr(w, "block_size", [])) == [1, w.qdata.shape[-1]]
    plain = all(getattr(w, name, None) is None for name in ("act_quant_kwargs", "act_pre_scale"))   # the weight-only path ignores zero_point
    if not (per_row and plain):
        raise GraphPeftError(f"{path}: only torchao int8 weight-only with one scale per row "
                             f"(Int8WeightOnlyConfig()) is supported as a quantized base, got {type(w).__name__} "
                             f"with block size {getattr(w, 'block_size', None)}")
    return LinearInt8Graph(w.qdata, w.scale.flatten(), layer.bias, scale_output=True)


def stand_in(module: nn.Module, path: str = "") -> Optional[nn.Module]:
    """The capturable stand-in of a quantized layer, or None when ``module`` is not one."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is not None:
        if isinstance(module, bnb.nn.Linear4bit):
            return Linear4bitGraph(module)
        if isinstance(module, bnb.nn.Linear8bitLt):
            return _int8_bnb(module)
    if "torchao" in sys.modules and type(module) is nn.Linear:
        kind = type(module.weight)
        if kind.__module__.startswith("torchao"):
            if kind.__name__ != "Int8Tensor":
                raise GraphPeftError(f"{path}: torchao weight type {kind.__name__} is not supported as a quantized "
                                     f"base; quantize with Int8WeightOnlyConfig() (int8 weight-only)")
            return _int8_torchao(module, path)
    if bnb is not None and type(module).__module__.startswith("bitsandbytes") and \
            any(type(p).__module__.startswith("bitsandbytes") for p in module.parameters(recurse=False)):
        raise GraphPeftError(f"{path}: bitsandbytes layer {type(module).__name__} is not supported as a quantized "
                             f"base (Linear4bit and Linear8bitLt are)")
    return None


def import_ops() -> None:
    import graphpeft.engine.quantized_ops  # noqa: F401  (registers the custom ops and their site kinds)


@contextlib.contextmanager
def capturable(model: nn.Module) -> Iterator[int]:
    """Swap the quantized layers of ``model`` for their stand-ins while the block runs; yields how many."""
    if "bitsandbytes" not in sys.modules and "torchao" not in sys.modules:
        yield 0          # no quantized layer can exist without its library imported
        return
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for path, parent in list(model.named_modules()):
            for name, child in list(parent.named_children()):
                new = stand_in(child, f"{path}.{name}" if path else name)
                if new is not None:
                    if not swaps:
                        import_ops()
                    new.train(child.training)
                    swaps.append((parent, name, child))
                    setattr(parent, name, new)
        yield len(swaps)
    finally:
        for parent, name, child in reversed(swaps):
            setattr(parent, name, child)


# -- quantizing a base (the command line's --quantize) ---------------------------------------------

# task heads stay in float: a classifier is trained whole (modules_to_save), and transformers keeps the LM head
_HEADS = {"classifier", "score", "qa_outputs", "lm_head"}


def quantize_model(model: nn.Module, quantize: str, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Quantize ``model``'s nn.Linear layers in place (``QUANTIZE_CHOICES``), as transformers' loaders do.

    The output head (``get_output_embeddings()``) and task heads (``classifier``, ``score``, ``qa_outputs``) stay
    in float: transformers leaves the first unquantized, and a classifier head is trained whole. bitsandbytes layers
    are quantized on the CPU (``nf4``/``fp4``: blocksize 64, no double quantization; ``int8``: threshold 6.0).
    """
    if quantize not in QUANTIZE_CHOICES:
        raise GraphPeftError(f"unknown quantization {quantize!r}; use one of {', '.join(QUANTIZE_CHOICES)}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = {id(m) for name, m in model.named_modules() if name.rpartition(".")[2] in _HEADS} | {id(head)}
    keep = (lambda m: type(m) is nn.Linear and id(m) not in heads and m.weight.is_floating_point())
    if quantize == "torchao-int8":
        require("torchao")
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: keep(m))
        return model
    require("bitsandbytes")
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not keep(child):
                continue
            weight, bias = child.weight.detach().to("cpu"), child.bias
            if quantize == "int8":
                layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias is not None,
                                            has_fp16_weights=False, threshold=6.0, device="meta")
                layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            else:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias is not None,
                                          compute_dtype=compute_dtype, quant_type=quantize, device="meta")
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quantize, module=layer,
                                                 compress_statistics=False)     # as BitsAndBytesConfig's default
            if bias is not None:
                layer.bias = nn.Parameter(bias.detach().to("cpu"), requires_grad=False)
            layer.train(child.training)
            setattr(parent, name, layer.to("cpu"))      # bitsandbytes quantizes when the weight moves to a device
    return model


# -- loading a checkpoint quantized -----------------------------------------------------------------

def load_quantized(auto_class: Any, name: str, quantize: str, **kwargs: Any) -> nn.Module:
    """``auto_class.from_pretrained(name)`` with its linear layers quantized (``QUANTIZE_CHOICES``)."""
    if quantize not in QUANTIZE_CHOICES:
        raise GraphPeftError(f"unknown quantization {quantize!r}; use one of {', '.join(QUANTIZE_CHOICES)}")
    if quantize == "torchao-int8":
        require("torchao")
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        model = auto_class.from_pretrained(name, **kwargs)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: type(m) is nn.Linear and m is not head)
        return model
    require("bitsandbytes")
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize,
                                    bnb_4bit_compute_dtype=kwargs.get("dtype") or torch.float32)
    kwargs.setdefault("device_map", "cpu")
    return auto_class.from_pretrained(name, quantization_config=config, **kwargs)


# -- merging: dequantize, merge, re-quantize ------------------------------------------------------

def quantized_readers(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Weight attribute -> the quantized linear op of ``gm`` that reads it as its packed weight (args[1])."""
    from graphpeft.engine.match import QUANTIZED_LINEAR

    return {node.args[1].target: node for node in gm.graph.nodes
            if node.op == "call_function" and node.target in QUANTIZED_LINEAR
            and isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr"}


def _operands(gm: fx.GraphModule, node: fx.Node) -> list[Any]:
    return [get_attr_path(gm, a.target) if isinstance(a, fx.Node) and a.op == "get_attr" else a for a in node.args]


def dequantized(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The float32 weight [out, in] a quantized linear op computes with, dequantized as its library does."""
    args = _operands(gm, node)
    if "linear_4bit" in str(node.target):
        from graphpeft.engine.quantized_ops import dequantize_4bit

        _, weight, _, absmax, code, absmax_8bit, absmax_code, offset, _, dtype, blocksize, kind, fin, fout = args
        return dequantize_4bit(weight, absmax, code, absmax_8bit, absmax_code, offset, blocksize, kind, fin, fout,
                               dtype=dtype).float()
    _, weight, _, scale, scale_output, factor, fin, fout = args
    if scale_output:    # torchao: Int8Tensor.dequantize()
        from torchao.quantization.quant_primitives import dequantize_affine

        return dequantize_affine(weight, (1, fin), scale.reshape(-1, 1), None, torch.int8,
                                 output_dtype=scale.dtype).float()
    from bitsandbytes.functional import int8_vectorwise_dequant      # what PEFT's merge dequantizes with

    return int8_vectorwise_dequant(weight, scale).float()


def _requantized_operands(gm: fx.GraphModule, node: fx.Node, weight: torch.Tensor) -> dict[int, Any]:
    """Argument index -> new value of ``node``'s quantized operands for the float ``weight`` (as its library does)."""
    args = _operands(gm, node)
    if "linear_4bit" in str(node.target):
        from bitsandbytes.functional import quantize_4bit

        nested = args[5] is not None
        packed, state = quantize_4bit(weight, blocksize=args[10], compress_statistics=nested, quant_type=args[11],
                                      quant_storage=args[1].dtype)
        if not nested:
            return {1: packed, 3: state.absmax, 4: state.code, 9: weight.dtype}
        return {1: packed, 3: state.state2.absmax, 4: state.code, 5: state.absmax, 6: state.state2.code,
                7: torch.as_tensor(state.offset), 9: weight.dtype}
    if args[4]:
        qdata, scale = _torchao_int8(weight)
        return {1: qdata, 3: scale.flatten().to(args[3].dtype)}
    from bitsandbytes.functional import int8_vectorwise_quant      # Int8Params quantizes from float16

    cb, scb, _ = int8_vectorwise_quant(weight.to(torch.float16))
    return {1: cb, 3: scb}


def _torchao_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    layer = _torchao_requantized(weight)
    return layer.weight.qdata, layer.weight.scale


def _torchao_requantized(weight: torch.Tensor) -> nn.Linear:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    quantize_(layer, Int8WeightOnlyConfig())
    return layer


@contextlib.contextmanager
def dequantized_weights(gm: fx.GraphModule, attrs: Iterable[str]) -> Iterator[None]:
    """While the block runs, each quantized weight among ``attrs`` reads as its float32 weight (a rule's merge
    computes W + s B A on it). ``gm`` is restored afterwards."""
    readers = quantized_readers(gm)
    saved: list[tuple[dict, str, Any]] = []
    try:
        for attr in dict.fromkeys(a for a in attrs if a in readers):
            owner_path, _, leaf = attr.rpartition(".")
            owner = gm.get_submodule(owner_path)
            store = owner._parameters if leaf in owner._parameters else owner._buffers
            saved.append((store, leaf, store[leaf]))
            store[leaf] = nn.Parameter(dequantized(gm, readers[attr]), requires_grad=False)
        yield
    finally:
        for store, leaf, old in reversed(saved):
            store[leaf] = old


def store_requantized(gm: fx.GraphModule, attr: str, weight: torch.Tensor) -> bool:
    """Re-quantize the merged float ``weight`` into the quantized op of ``gm`` reading ``attr``; False when no
    quantized op reads it. The op's packed operands become new tensors of ``gm``'s own (the source keeps its own)."""
    node = quantized_readers(gm).get(attr)
    if node is None:
        return False
    for index, value in _requantized_operands(gm, node, weight).items():
        operand = node.args[index]
        if isinstance(operand, fx.Node):
            owner_path, _, leaf = operand.target.rpartition(".")
            owner = own_module(gm, owner_path)
            if leaf in owner._parameters:
                owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
            else:
                owner._buffers[leaf] = value
        else:
            node.update_arg(index, value)
    return True


def is_quantized(tensor: Any) -> bool:
    """A bitsandbytes (Params4bit, Int8Params) or torchao quantized parameter."""
    return type(tensor).__name__ in ("Params4bit", "Int8Params") or type(tensor).__module__.startswith("torchao")


def requantized_parameter(old: torch.Tensor, weight: torch.Tensor, owner: nn.Module) -> Optional[nn.Parameter]:
    """A new quantized parameter of ``old``'s kind (bitsandbytes Params4bit / Int8Params, torchao Int8Tensor)
    holding the merged float ``weight``, quantized as PEFT's merge does; None when ``old`` is not quantized.
    ``owner`` is the layer the parameter will belong to (bitsandbytes keeps its quantization state there)."""
    kind = type(old).__name__
    if not is_quantized(old):
        return None
    if kind == "Params4bit":
        import bitsandbytes as bnb

        options = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k != "data"}
        options.update(requires_grad=False, bnb_quantized=False, module=owner)
        return bnb.nn.Params4bit(weight.to("cpu"), **options).to(old.device)
    if kind == "Int8Params":
        import bitsandbytes as bnb

        new = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False,
                                has_fp16_weights=old.has_fp16_weights).to(old.device)
        if getattr(owner, "state", None) is not None:
            owner.state.reset_grads()       # the layer's cached int8 state belongs to the old weight
        return new
    return _torchao_requantized(weight.to(old.device)).weight
