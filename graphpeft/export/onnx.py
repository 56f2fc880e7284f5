"""Inference export: the rewritten graph as one ONNX model, adapters merged or kept as named initializers.

    result = export_onnx(peft_model, "out/model.onnx")                 # merged (merge_and_unload)
    result = export_onnx(peft_model, "out/model.onnx", merged=False)   # lora_A / lora_B ... as initializers
    print(result.dynamic_statement)

The model's inputs are the ones it was captured with (``input_ids``, ``attention_mask``, ...), batch and
sequence dims dynamic where the model allows; its outputs are the tensor fields of the model's output
(``logits``; ``last_hidden_state`` and ``pooler_output`` for a base model). Weights are named after their
graph attributes; an adapter whose method defines an export form (``graphpeft.export.form``) is written in
that form (``result.exported_as``). Above 2 GB of weights the file is written with external data
(``model.onnx.data``).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from graphpeft.engine import registry
from graphpeft.engine.errors import GraphPeftError
from graphpeft.export.extra import require

TWO_GB = 2 ** 31


@dataclass
class OnnxExport:
    """What export_onnx wrote."""

    path: Path
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_statement: str
    merged: bool
    external_data: Optional[Path] = None
    initializers: tuple[str, ...] = field(default=())
    adapter_initializers: tuple[str, ...] = field(default=())   # initializers that are adapter parameters
    exported_as: Optional[dict[str, Any]] = None   # the adapter's replacement (graphpeft.export.form), if any
    statement: Optional[str] = None                # one line saying so


def unmergeable_rules(model: Any) -> list[str]:
    """Rules among the model's records whose change is not a weight update (prompt or prefix tokens)."""
    return sorted({r.rule for r in model.records if not getattr(registry.rule(r.rule), "mergeable", True)})


@contextlib.contextmanager
def train_mode(model: Any, mode: bool):
    """Switch ``model`` to train/eval for the block, then back."""
    was = model.training
    model.train(mode)
    try:
        yield model
    finally:
        model.train(was)


def weight_bytes(onnx_model: Any) -> int:
    return sum(v.const_value.nbytes for v in onnx_model.graph.initializers.values() if v.const_value is not None)


def save_onnx(onnx_model: Any, path: Path, external_threshold: int = TWO_GB) -> Optional[Path]:
    """Save an onnx_ir model; weights above ``external_threshold`` bytes go to ``<name>.data`` beside it."""
    import onnx_ir as ir

    if weight_bytes(onnx_model) > external_threshold:
        data = path.with_name(path.name + ".data")
        ir.save(onnx_model, path, external_data=data.name)
        return data
    ir.save(onnx_model, path)
    return None


def export_onnx(model: Any, path: str | os.PathLike, merged: bool = True,
                example_inputs: Optional[dict[str, torch.Tensor]] = None,
                external_threshold: int = TWO_GB) -> OnnxExport:
    """Write ``model`` (a GraphPeftModel) as an ONNX inference model at ``path``; the model is left as it was."""
    require("ONNX export", training=False)
    from graphpeft.export.form import export_form
    from graphpeft.export.graph import named_outputs, to_onnx
    from graphpeft.export.inputs import example_inputs as make_inputs

    form = export_form(model)          # e.g. an allocated adapter as plain low-rank pairs of its kept ranks
    model = form.model
    if merged:
        refused = unmergeable_rules(model)
        if refused:
            raise GraphPeftError(f"{', '.join(refused)} adapters cannot be merged into the weights; "
                                 f"export with --unmerged (merged=False)")
    inputs = dict(example_inputs) if example_inputs is not None else make_inputs(model)
    target = model.merged_graph() if merged else model
    with train_mode(target, False), torch.no_grad():
        outputs = tuple(named_outputs(target(**inputs)))
        graph = to_onnx(target, inputs, outputs)
    path = Path(path)
    data = save_onnx(graph.model, path, external_threshold)
    initializers = tuple(graph.model.graph.initializers)
    adapter = {n for rec in model.records for n in rec.params}
    return OnnxExport(path, graph.input_names, graph.output_names, graph.dynamic_statement(), merged, data,
                      initializers, tuple(n for n in initializers if n in adapter), form.replaced, form.statement)
