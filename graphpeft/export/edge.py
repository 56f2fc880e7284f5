"""On-device training with the ONNX Runtime training API, from the artifacts ``export_training`` wrote.

    trainer = EdgeTrainer("artifacts")                  # CheckpointState, Module, Optimizer
    loss = trainer.step(batch)                          # batch: {input name: numpy array}, labels included
    history = trainer.train(batches, epochs=3, lr=1e-3) # LinearLRScheduler, a progress bar
    trainer.save_adapter("adapter")                     # PEFT's format: loads into graphpeft and into PEFT

Only numpy and onnxruntime-training are needed to train; writing the adapter uses safetensors. The
trained values are read from the checkpoint state by parameter name and written under the PEFT keys
``edge.json`` lists, over the adapter as it was exported (``adapter_model.safetensors`` in the folder).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np

from graphpeft.engine.errors import GraphPeftError
from graphpeft.export.extra import require
from graphpeft.export.training import FORMAT_VERSION, MANIFEST

_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint", MANIFEST,
          "adapter_config.json", "adapter_model.safetensors")


@dataclass
class EdgeHistory:
    """Losses seen while training on the device: one per step, and the mean of each epoch."""

    step_losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """edge.json of an artifacts folder, after checking that every artifact is there."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GraphPeftError(f"artifacts folder {folder} does not exist; write it with "
                             f"'graphpeft export ADAPTER --onnx-training'")
    missing = [f for f in _FILES if not (folder / f).exists()]
    if missing:
        raise GraphPeftError(f"{folder} is not an ONNX training artifacts folder ({missing[0]} is missing); "
                             f"write it with 'graphpeft export ADAPTER --onnx-training'")
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GraphPeftError(f"{folder / MANIFEST} is not valid JSON ({exc}); export the artifacts again") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise GraphPeftError(f"{folder / MANIFEST} has format {manifest.get('format')!r}, this graphpeft reads "
                             f"{FORMAT_VERSION}; export the artifacts again")
    return manifest


class EdgeTrainer:
    """ONNX Runtime training session over an artifacts folder: train, evaluate, save the adapter."""

    def __init__(self, folder: str | os.PathLike, checkpoint: str = "checkpoint"):
        require("edge training")
        import onnxruntime
        from onnxruntime.training.api import CheckpointState, Module, Optimizer

        onnxruntime.set_default_logger_severity(3)     # errors only: no shape-merge warnings on every load

        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.input_names: list[str] = list(self.manifest["inputs"])
        self.state = CheckpointState.load_checkpoint(str(self.folder / checkpoint))
        self.module = Module(str(self.folder / "training_model.onnx"), self.state,
                             str(self.folder / "eval_model.onnx"))
        self.optimizer = Optimizer(str(self.folder / "optimizer_model.onnx"), self.module)
        self.scheduler: Any = None

    # -- one batch ------------------------------------------------------------------------------
    def _feed(self, batch: dict[str, Any]) -> list[np.ndarray]:
        batch = dict(batch)
        ids = batch.get("input_ids")
        if ids is not None:   # inputs a tokenizer may leave out, with the defaults the model uses
            batch.setdefault("attention_mask", np.ones_like(_numpy(ids)))
            batch.setdefault("token_type_ids", np.zeros_like(_numpy(ids)))
        missing = [n for n in self.input_names if n not in batch]
        if missing:
            raise GraphPeftError(f"batch lacks input {missing[0]!r}; the artifacts take {', '.join(self.input_names)}")
        return [np.ascontiguousarray(_numpy(batch[n])) for n in self.input_names]

    def step(self, batch: dict[str, Any]) -> float:
        """Forward, backward and one optimizer step on ``batch``; returns the loss before the step."""
        self.module.train()
        outputs = self.module(*self._feed(batch))
        loss = float(np.asarray(outputs[0] if isinstance(outputs, (list, tuple)) else outputs))
        if not math.isfinite(loss):
            raise GraphPeftError(f"loss became {loss}; lower the learning rate")
        self.optimizer.step()
        self.module.lazy_reset_grad()
        if self.scheduler is not None:
            self.scheduler.step()
        return loss

    def set_learning_rate(self, lr: float) -> None:
        self.optimizer.set_learning_rate(float(lr))

    def evaluate(self, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Mean loss over ``batches`` (eval model: dropout off), and accuracy for sequence classification."""
        self.module.eval()
        total, steps, correct, seen = 0.0, 0, 0, 0
        for batch in batches:
            outputs = self.module(*self._feed(batch))
            outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            total, steps = total + float(np.asarray(outputs[0])), steps + 1
            if "logits" in self.manifest["outputs"]:
                logits = outputs[self.manifest["outputs"].index("logits")]
                labels = _numpy(batch["labels"])
                correct += int((logits.argmax(-1) == labels).sum())
                seen += labels.size
        self.module.train()
        result = {"loss": total / steps if steps else float("nan")}
        if seen:
            result["accuracy"] = correct / seen
        return result

    # -- a whole run ------------------------------------------------------------------------------
    def train(self, batches: Iterable[dict[str, Any]], epochs: int = 3, lr: float = 1e-3, warmup_steps: int = 0,
              progress: bool = True, on_epoch: Optional[Callable[[int, float], None]] = None) -> EdgeHistory:
        """``epochs`` passes over ``batches`` (re-iterated each epoch), learning rate decayed linearly to 0."""
        from onnxruntime.training.api import LinearLRScheduler
        from graphpeft.runtime import progress as _progress

        if not isinstance(epochs, int) or epochs <= 0:
            raise GraphPeftError(f"epochs must be a positive integer, got {epochs!r}")
        if not lr > 0:
            raise GraphPeftError(f"learning rate must be positive, got {lr!r}")
        steps_per_epoch = len(batches) if hasattr(batches, "__len__") else None
        if steps_per_epoch == 0:
            raise GraphPeftError("no training batches: the data set is empty")
        self.set_learning_rate(lr)
        if steps_per_epoch:
            self.scheduler = LinearLRScheduler(self.optimizer, warmup_steps, steps_per_epoch * epochs, lr)
        history = EdgeHistory()
        try:
            for epoch in range(epochs):
                losses = []
                with _progress.bar(steps_per_epoch, f"edge epoch {epoch + 1}/{epochs}", show=progress) as advance:
                    for batch in batches:
                        loss = self.step(batch)
                        losses.append(loss)
                        history.step_losses.append(loss)
                        advance(loss=f"{loss:.4f}")
                if not losses:
                    raise GraphPeftError("no training batches: the data set is empty")
                history.epoch_losses.append(sum(losses) / len(losses))
                if on_epoch is not None:
                    on_epoch(epoch, history.epoch_losses[-1])
        finally:
            self.scheduler = None
        return history

    # -- results ----------------------------------------------------------------------------------
    def parameter(self, name: str) -> np.ndarray:
        """The current value of a checkpoint parameter (by graph attribute name)."""
        return np.array(self.state.parameters[name].data, copy=True)

    def trained_tensors(self) -> dict[str, np.ndarray]:
        """{PEFT key: trained value} for every trainable parameter that the adapter file saves."""
        return {key: self.parameter(name) for name, key in self.manifest["trainable"].items() if key}

    def save_adapter(self, out: str | os.PathLike) -> Path:
        """Write the trained adapter in PEFT's format into folder ``out`` (created if absent)."""
        from safetensors.numpy import load_file, save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tensors = load_file(str(self.folder / "adapter_model.safetensors"))
        trained = self.trained_tensors()
        unknown = sorted(set(trained) - set(tensors))
        if unknown:
            raise GraphPeftError(f"trained parameter {unknown[0]} is not in the exported adapter file; "
                                 f"export the artifacts again")
        for key, value in trained.items():
            tensors[key] = np.ascontiguousarray(value.astype(tensors[key].dtype, copy=False))
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        shutil.copyfile(self.folder / "adapter_config.json", out / "adapter_config.json")
        return out


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):       # a torch tensor (the JSONL collator returns them)
        value = value.detach().cpu().numpy()
    return np.asarray(value)
