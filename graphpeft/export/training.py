"""ONNX Runtime training artifacts for the rewritten graph: only the adapter trains on the device.

    result = export_training(peft_model, "artifacts", optimizer="adamw", nominal_checkpoint=True)

writes into an existing, empty folder:

    training_model.onnx   forward + loss + gradients of the adapter parameters
    eval_model.onnx       forward + loss
    optimizer_model.onnx  AdamW (Hugging Face's formula, as ONNX Runtime implements it) or SGD,
                          with gradient-norm clipping (``max_grad_norm``, 0 turns it off)
    checkpoint            every weight: the adapter's trainable, the base model's frozen
    nominal_checkpoint    (``nominal_checkpoint=True``) the same names and shapes, no values
    adapter_config.json, adapter_model.safetensors   the adapter as exported (PEFT's format)
    edge.json             inputs, outputs, task, and which checkpoint parameter is saved under which PEFT key

An adapter whose method defines an export form (``graphpeft.export.form``; AdaLoRA: plain LoRA of its
allocated ranks) is exported, and saved beside the artifacts, in that form; edge.json's ``exported_as``
says so. The trainable parameters are exactly the graph's adapter parameters (the Rewrite records'
``params`` that require grad); every other weight of the model is frozen. The loss is the model's own transformers
loss, exported inside the graph: causal LM, cross-entropy of the next token with -100 ignored;
sequence classification, cross-entropy over the labels. It is the first output; sequence classifiers
also return ``logits``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from graphpeft.engine.errors import GraphPeftError
from graphpeft.export.extra import require
from graphpeft.export.onnx import TWO_GB, save_onnx, train_mode, weight_bytes

OPTIMIZERS = ("adamw", "sgd")
MANIFEST = "edge.json"
FORMAT_VERSION = 1
ADAMW_EPS = 1e-8           # torch.optim.AdamW's default, as `graphpeft train` uses
_NO_GRADIENT = re.compile(r"gradient builder has not been registered: (\S+) for node (\S+)")


class NoGradientError(GraphPeftError):
    """An op between the adapter and the loss has no gradient in ONNX Runtime training."""


@dataclass
class TrainingExport:
    """What export_training wrote."""

    folder: Path
    task: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    dynamic_statement: str
    optimizer: str
    nominal_checkpoint: bool
    notes: tuple[str, ...] = ()
    exported_as: Optional[dict[str, Any]] = None   # the adapter's replacement (graphpeft.export.form), if any
    statement: Optional[str] = None                # one line saying so


def adapter_parameters(model: Any) -> list[str]:
    """Graph attribute names of the adapter's trainable parameters, from the Rewrite records."""
    from graphpeft.engine.rewriter import get_attr_path

    names: list[str] = []
    for rec in model.records:
        for name in rec.params:
            param = get_attr_path(model.graph_module, name)
            if name not in names and isinstance(param, torch.nn.Parameter) and param.requires_grad:
                names.append(name)
    return names


def _training_notes(model: Any) -> tuple[str, ...]:
    """What PyTorch training does that the edge does not: methods with a per-step update hook."""
    from graphpeft.engine import registry

    notes = []
    for adapter, config in model.peft_config.items():
        method = registry.method_for_config(config)
        if getattr(method.pass_cls, "update_and_allocate", None) is not None:
            notes.append(f"{method.name} ({adapter}): its per-step update (update_and_allocate) does not run in ONNX "
                         f"Runtime; the edge trains the adapter as exported")
    return tuple(notes)


def _optimizer_block(name: str, max_grad_norm: float) -> Any:
    from onnxruntime.training import onnxblock

    clip = onnxblock.optim.ClipGradNorm(max_grad_norm) if max_grad_norm else None
    if name == "adamw":
        return onnxblock.optim.AdamW(eps=ADAMW_EPS, weight_decay=0.0, clip_grad=clip)
    if name == "sgd":
        return onnxblock.optim.SGD(clip_grad=clip)
    raise GraphPeftError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")


@contextlib.contextmanager
def _stderr_to_file() -> Iterator[Path]:
    """ONNX Runtime's C++ log lines (graph transformer chatter) go to a file, not the terminal."""
    fd, name = tempfile.mkstemp(prefix="graphpeft-ort-", suffix=".log")
    saved = os.dup(2)
    try:
        os.dup2(fd, 2)
        yield Path(name)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
        os.unlink(name)


def _gradient_error(exc: Exception, nodes: dict[str, Any]) -> Exception:
    """A one-line error naming the op without a gradient and its module path, when that is the failure."""
    from graphpeft.export.fixes import module_path

    match = _NO_GRADIENT.search(str(exc))
    if match is None:
        reason = " ".join(str(exc).split())[-300:]
        return GraphPeftError(f"ONNX Runtime could not build the training graph: {reason}")
    op, node_name = match.groups()
    node = nodes.get(node_name)
    path = module_path(dict(node.metadata_props)) if node is not None else None
    where = f"in module {path!r}" if path else "at the model's top level" if path == "" else "(module unknown)"
    return NoGradientError(f"op {op} {where} (ONNX node {node_name}) has no gradient in ONNX Runtime training, and "
                           f"the gradient from the loss to the adapter passes through it; use a model without this "
                           f"op on that path, or train in PyTorch (graphpeft train)")


def _stopped_gradient(gm: Any, trainable: set[str]) -> Optional[str]:
    """The first trainable parameter a ``detach`` node in the graph reads through (a held-constant value), or None.

    The ONNX exporter writes detach as Identity, so ONNX Runtime's gradient builder would differentiate through it.
    """
    detach = (torch.ops.aten.detach.default, torch.Tensor.detach)
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in detach:
            continue
        seen, frontier = set(), list(node.all_input_nodes)
        while frontier:
            current = frontier.pop()
            if current in seen:
                continue
            seen.add(current)
            if current.op == "get_attr" and str(current.target) in trainable:
                return str(current.target)
            frontier.extend(current.all_input_nodes)
    return None


def export_training(model: Any, folder: str | os.PathLike, optimizer: str = "adamw",
                    nominal_checkpoint: bool = False, max_grad_norm: float = 1.0,
                    example_inputs: Optional[dict[str, torch.Tensor]] = None,
                    external_threshold: int = TWO_GB, adapter_name: Optional[str] = None) -> TrainingExport:
    """Write ONNX Runtime training artifacts for ``model`` (a GraphPeftModel) into ``folder`` (created if absent)."""
    require("ONNX Runtime training export")
    import onnx
    import onnx_ir as ir
    from onnxruntime.training import artifacts

    from graphpeft.export.form import ExportForm, export_form
    from graphpeft.export.graph import to_onnx
    from graphpeft.export.inputs import example_inputs as make_inputs
    from graphpeft.export.inputs import task_of
    from graphpeft.runtime.io import save_adapter

    if optimizer not in OPTIMIZERS:
        raise GraphPeftError(f"unknown optimizer {optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    # the active adapter in the form its method exports (e.g. allocated ranks as plain low-rank pairs)
    form = export_form(model) if adapter_name in (None, model.active_adapter) else ExportForm(model)
    model = form.model
    task = task_of(model)
    if task is None:
        info = model.capture_info
        raise GraphPeftError(f"{getattr(info, 'model_class', 'the model')} has no training loss graphpeft can export "
                             f"(causal LM or sequence classification); export an adapter written by 'graphpeft "
                             f"train', which adds the task head, or rewrite a model that has one")
    trainable = adapter_parameters(model)
    if not trainable:
        raise GraphPeftError("the model has no trainable adapter parameters; load the adapter with is_trainable=True")
    stopped = _stopped_gradient(model.graph_module, set(trainable))
    if stopped is not None:
        raise GraphPeftError(f"ONNX Runtime training cannot hold a value constant: the graph detaches a value computed "
                             f"from trainable {stopped} (the method stops its gradient), which ORT would differentiate; "
                             f"train this adapter in PyTorch (inference export works)")
    inputs = dict(example_inputs) if example_inputs is not None else make_inputs(model, labels=task)
    outputs = ("loss", "logits") if task == "seq-cls" else ("loss",)
    with train_mode(model, True):
        graph = to_onnx(model, inputs, outputs)
    onnx_model = graph.model
    names = set(onnx_model.graph.initializers)
    lost = [n for n in trainable if n not in names]
    if lost:
        raise GraphPeftError(f"the exported graph lost adapter parameter {lost[0]} (folded into a constant); "
                             f"this is a bug, please report it")
    parameters = {n for n, _ in model.graph_module.named_parameters(remove_duplicate=False)}
    frozen = sorted(n for n in names if n in parameters and n not in trainable)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)      # generate_artifacts does not create it
    nodes = {n.name: n for n in onnx_model.graph}
    with tempfile.TemporaryDirectory(prefix="graphpeft-onnx-") as tmp:
        base: Any
        if weight_bytes(onnx_model) > external_threshold:
            base = str(Path(tmp) / "base.onnx")
            save_onnx(onnx_model, Path(base), external_threshold)
        else:
            base = ir.serde.serialize_model(onnx_model)
        try:
            with _stderr_to_file():
                artifacts.generate_artifacts(
                    base, requires_grad=trainable, frozen_params=frozen, loss=None,
                    optimizer=_optimizer_block(optimizer, max_grad_norm), artifact_directory=str(folder),
                    nominal_checkpoint=nominal_checkpoint)
        except GraphPeftError:
            raise
        except Exception as exc:  # ORT raises RuntimeError / Fail with a C++ message
            raise _gradient_error(exc, nodes) from None
    for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
        _clamp_file(folder / name, onnx)

    adapter = adapter_name or model.active_adapter
    save_adapter(model, folder, adapter)
    keys = {attr: key for rec in model.records if rec.adapter == adapter for attr, key in rec.saved_keys.items()}
    manifest = {
        "format": FORMAT_VERSION,
        "task": task,
        "inputs": list(graph.input_names),
        "outputs": list(graph.output_names),
        "input_shapes": {k: list(v) for k, v in graph.input_shapes.items()},
        "optimizer": optimizer,
        "max_grad_norm": max_grad_norm,
        "adamw_eps": ADAMW_EPS if optimizer == "adamw" else None,
        "trainable": {name: keys.get(name) for name in trainable},
        "frozen_count": len(frozen),
        "nominal_checkpoint": nominal_checkpoint,
        "adapter_name": adapter,
        "num_labels": int(getattr(model.capture_info.hf_config, "num_labels", 0) or 0) if task == "seq-cls" else 0,
        "max_length": getattr(model.capture_info.hf_config, "max_position_embeddings", None),
        "model": getattr(model.capture_info, "name_or_path", None),
        "model_class": getattr(model.capture_info, "model_class", None),
        "exported_as": form.replaced,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return TrainingExport(folder, task, graph.input_names, graph.output_names, tuple(trainable), tuple(frozen),
                          graph.dynamic_statement(), optimizer, nominal_checkpoint, _training_notes(model),
                          form.replaced, form.statement)


def _clamp_file(path: Path, onnx: Any) -> None:
    """Clamp a written model's IR version to what ONNX Runtime training 1.19.2 loads (a no-op with onnx 1.17)."""
    from graphpeft.export.fixes import MAX_IR_VERSION

    if not path.is_file():
        return
    proto = onnx.load(str(path), load_external_data=False)
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
        onnx.save(proto, str(path))
