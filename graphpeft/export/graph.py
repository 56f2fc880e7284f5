"""The rewritten graph as an ONNX model: a positional-tensor wrapper and the torch.onnx (dynamo) export.

``GraphCall`` wraps a CapturedModel / GraphPeftModel so that it takes tensors in a fixed order and
returns a tuple of named outputs (``loss`` first when ``labels`` is an input: the loss is the model's own
transformers loss, computed as in PyTorch training). The graph is run through ``torch.fx.Interpreter``
under ``preserve_node_meta``, so every re-traced op keeps its ``nn_module_stack``: the ONNX nodes carry
the module path of the op they came from (``pkg.torch.onnx.name_scopes``), which error messages use.

``to_onnx`` exports with ``torch.onnx.export(dynamo=True, optimize=False)`` (the optimizer can fold or
merge zero-initialised adapter weights), dims 0 and 1 of every input dynamic where the model allows,
then applies ``fixes.apply_all`` and names every initializer after its graph attribute
(``model.layers.0.self_attn.q_proj.lora_A.default.weight``), the names Rewrite records use.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.fx as fx
from torch import nn

from graphpeft.engine.errors import GraphPeftError
from graphpeft.export import fixes
from graphpeft.runtime.attention_masks import boolean_attention_masks

WRAPPED = "model"                      # attribute of GraphCall holding the model
PREFIX = f"{WRAPPED}.graph_module."    # what torch.onnx puts before every graph attribute name


class _Interpreted:
    """Calls a GraphModule through fx.Interpreter, so tracing it again keeps each node's meta."""

    def __init__(self, gm: fx.GraphModule):
        self.gm, self.meta = gm, gm.meta

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        gm = self.gm
        bound = inspect.signature(gm.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        flat = [bound.arguments[name] for name in placeholders]
        with fx.traceback.preserve_node_meta():
            return fx.Interpreter(gm).run(*flat)     # unflattens the outputs as the graph's own code does


def named_outputs(out: Any) -> dict[str, torch.Tensor]:
    """A model's outputs by name: a ModelOutput's tensor fields, or ``output`` / ``output_<i>``."""
    if isinstance(out, torch.Tensor):
        return {"output": out}
    if isinstance(out, dict):
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    if isinstance(out, (tuple, list)):
        return {f"output_{i}": v for i, v in enumerate(out) if isinstance(v, torch.Tensor)}
    raise GraphPeftError(f"cannot export a model whose output is a {type(out).__name__}; it must return tensors")


class GraphCall(nn.Module):
    """``forward(*tensors)`` in ``input_names`` order -> tuple of the outputs in ``output_names`` order."""

    def __init__(self, model: nn.Module, input_names: Sequence[str], output_names: Sequence[str]):
        super().__init__()
        setattr(self, WRAPPED, model)
        self.input_names, self.output_names = tuple(input_names), tuple(output_names)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = getattr(self, WRAPPED)
        out = model._call(_Interpreted(model.graph_module), (), dict(zip(self.input_names, tensors)))
        add_terms = getattr(model, "_with_loss_terms", None)    # a method's extra loss terms, as forward adds them
        if add_terms is not None:
            out = add_terms(out)
        out = named_outputs(out)
        return tuple(out[name] for name in self.output_names)


def axis_names(gm: fx.GraphModule, name: str, tensor: torch.Tensor) -> dict[int, Any]:
    """Dynamic dims of an input, named: 0 is the batch, 1 the sequence.

    An export-captured graph knows which of its input dims stayed symbolic (capture asks for dims 0 and 1
    and keeps a dim static where the model fixes it: image channels, mel bins); only those are named.
    A labels input follows the ids it comes with. Other graphs let torch.export decide (Dim.AUTO).
    """
    prefix = "decoder_" if name.startswith("decoder_") else ""
    names = {0: "batch", 1: f"{prefix}sequence"}
    wanted = range(min(tensor.dim(), 2))
    vals = {n.target: n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"}
    if name == "labels" and "labels" not in vals:
        source = vals.get(f"{prefix}input_ids")
        val = source if source is not None and tensor.dim() == source.dim() else None
        return {d: names[d] for d in wanted if d == 0 or val is not None and _symbolic(val, d)}
    val = vals.get(name)
    if not isinstance(val, torch.Tensor):
        return {d: torch.export.Dim.AUTO for d in wanted}
    return {d: names[d] for d in wanted if _symbolic(val, d)}


def _symbolic(val: torch.Tensor, dim: int) -> bool:
    return dim < val.dim() and isinstance(val.shape[dim], torch.SymInt)


@dataclass
class OnnxGraph:
    """An exported model (onnx_ir.Model) and what a caller needs to feed it."""

    model: Any
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    input_shapes: dict[str, tuple]      # per input: ints for static dims, names for dynamic ones

    def dynamic_statement(self) -> str:
        """One line saying which axes are dynamic and which stayed fixed at the export shape."""
        shapes, static = [], []
        for name, shape in self.input_shapes.items():
            shapes.append(f"{name}[{', '.join(map(str, shape))}]")
            fixed = [i for i, d in enumerate(shape) if not isinstance(d, str) and i < 2]
            if fixed:
                static.append(f"{name} dim {', '.join(map(str, fixed))}")
        line = "input shapes: " + "; ".join(shapes)
        if static:
            line += (f" -- static (fixed at the export shape, the model does not allow them to vary): "
                     f"{'; '.join(static)}")
        return line


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch.onnx's progress lines and warnings stay out of the command's output."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def to_onnx(model: nn.Module, inputs: dict[str, torch.Tensor], output_names: Sequence[str],
            opset: Optional[int] = None) -> OnnxGraph:
    """Export ``model`` (a CapturedModel) called with ``inputs`` (in that order) to an ONNX graph."""
    names = tuple(inputs)
    call = GraphCall(model, names, output_names)
    dynamic = [axis_names(model.graph_module, n, t) for n, t in inputs.items()]
    for (name, tensor), dims in zip(inputs.items(), dynamic):
        small = [d for d, axis in dims.items() if isinstance(axis, str) and tensor.shape[d] < 2]
        if small:   # torch.export fixes a dim of size 0 or 1 to that size
            raise GraphPeftError(f"example input {name} has size {tensor.shape[small[0]]} in dim {small[0]} "
                                 f"({dims[small[0]]}); give sizes of at least 2 so the dim stays dynamic")
    args = tuple(inputs.values())
    with _quiet_exporter(), boolean_attention_masks(model.graph_module):
        try:
            program = torch.onnx.export(call, args, dynamo=True, optimize=False, verbose=False, report=False,
                                        input_names=list(names), output_names=list(output_names),
                                        dynamic_shapes=(tuple(dynamic),),   # one entry: forward(*tensors)
                                        opset_version=opset)
        except Exception as exc:  # torch raises many types; the reason is what the user can act on
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GraphPeftError(f"torch.onnx could not export the rewritten graph: {type(exc).__name__}: "
                                 f"{reason[:300]}") from None
    onnx_model = program.model
    fixes.rename_initializers(onnx_model, PREFIX)
    fixes.apply_all(onnx_model, training=bool(getattr(model, "training", False)))
    shapes = {v.name: tuple(d if isinstance(d, int) else str(d) for d in v.shape) for v in onnx_model.graph.inputs}
    return OnnxGraph(onnx_model, names, tuple(output_names), shapes)
