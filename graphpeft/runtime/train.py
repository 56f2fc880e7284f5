"""Training with transformers' Trainer, as ``graphpeft train`` does it: method-agnostic, with graphpeft's display.

    history = train(peft_model, rows, collate, epochs=3, lr=1e-3, batch_size=8)
    history.epoch_losses        # mean loss of each epoch
    evaluate(peft_model, test_loader)["accuracy"]

``rows`` is any sequence the ``collate`` function turns into batches (graphpeft.runtime.data's examples and
Collator). Whatever has ``requires_grad`` is trained (graphpeft freezes the base model when it rewrites
it), by Trainer's AdamW with its schedule, gradient accumulation, clipping, checkpoints and resume;
everything else is left bit-identical. Trainer's own printing and tqdm bars are replaced by callbacks:
``AdapterStepCallback`` calls ``update_and_allocate(step)`` after every optimizer step (a rank budget;
add it to your own Trainer for AdaLoRA) and ``RichProgressCallback`` draws a rich bar per epoch on
stderr (only on a terminal) with the loss and the model's ``progress()`` fields.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn
from transformers import TrainerCallback

from graphpeft.engine.errors import GraphPeftError
from graphpeft.runtime import progress as _progress

LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial",
                 "inverse_sqrt")


@dataclass
class History:
    """Losses seen while training: one per optimizer step, the mean of each epoch, and each evaluation."""

    step_losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    evaluations: list[dict[str, float]] = field(default_factory=list)


def model_inputs(model: nn.Module, batch: dict) -> dict:
    """The part of ``batch`` the model takes: a captured graph takes only the inputs it was captured with.

    (Tokenizers return extras such as token_type_ids; ``labels`` is always kept, it feeds the loss, and
    so are inputs a pass added to the graph, such as task ids.)
    """
    from graphpeft.engine.rewriter import EXTRA_INPUTS

    info = getattr(model, "capture_info", None)
    names = getattr(info, "input_names", None)
    if not names:
        return dict(batch)
    added = getattr(getattr(model, "graph_module", None), "meta", {}).get(EXTRA_INPUTS, {})
    return {k: v for k, v in batch.items() if k in names or k == "labels" or k in added}


def _loss_of(output: Any) -> Optional[torch.Tensor]:
    if isinstance(output, dict) or hasattr(output, "loss"):
        return output.get("loss") if isinstance(output, dict) else output.loss
    return None


class AdapterStepCallback(TrainerCallback):
    """After every optimizer step (gradients still there), ``model.update_and_allocate(step)``; step counts from 0.

    AdaLoRA's rank allocator needs this call; models without the method are left alone. Also refuses a
    loss that stopped being finite, naming the step.
    """

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None and hasattr(model, "update_and_allocate"):
            model.update_and_allocate(state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict] = None, **kwargs: Any) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise GraphPeftError(f"loss became {loss} at step {state.global_step}; lower the learning rate")


class RichProgressCallback(TrainerCallback):
    """One rich bar per epoch on stderr (graphpeft.runtime.progress), and the losses collected into a History."""

    def __init__(self, history: History, show: bool = True,
                 on_epoch: Optional[Callable[[int, float], None]] = None):
        self.history, self.show, self.on_epoch = history, show, on_epoch
        self._bar: Optional[contextlib.ExitStack] = None
        self._advance: Callable[..., None] = lambda **fields: None
        self._epoch_losses: list[float] = []
        self._epoch = 0

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        epochs = math.ceil(args.num_train_epochs)
        total = math.ceil(state.max_steps / epochs) if state.max_steps else None
        self._bar = contextlib.ExitStack()
        self._advance = self._bar.enter_context(_progress.bar(total, f"epoch {self._epoch + 1}/{epochs}", self.show))
        self._epoch_losses = []

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict] = None, model: Any = None,
               **kwargs: Any) -> None:
        logs = logs or {}
        if "loss" in logs:
            self.history.step_losses.append(float(logs["loss"]))
            self._epoch_losses.append(float(logs["loss"]))
            status = model.progress() if model is not None and hasattr(model, "progress") else {}
            self._advance(loss=f"{logs['loss']:.4f}", **status)
        if "eval_loss" in logs:
            self.history.evaluations.append({k[len("eval_"):]: v for k, v in logs.items() if k.startswith("eval_")})

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._epoch_losses:
            self.history.epoch_losses.append(sum(self._epoch_losses) / len(self._epoch_losses))
            if self.on_epoch is not None:
                self.on_epoch(self._epoch, self.history.epoch_losses[-1])
        self._epoch += 1

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _classifies(model: nn.Module) -> bool:
    """A sequence classifier: its evaluation reports accuracy (other heads' logits are not gathered)."""
    return getattr(getattr(model, "capture_info", None), "loss_type", None) == "ForSequenceClassification"


def _accuracy(prediction: Any) -> dict[str, float]:
    logits, labels = prediction.predictions, prediction.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    if getattr(logits, "ndim", 0) != 2 or getattr(labels, "ndim", 0) != 1:
        return {}
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def train(model: nn.Module, rows: Sequence[Any], collate: Optional[Callable[[list], dict]] = None, *, epochs: int = 3,
          lr: float = 1e-3, batch_size: int = 8, grad_accum: int = 1, weight_decay: float = 0.0,
          max_grad_norm: Optional[float] = 1.0, lr_scheduler: str = "constant", warmup_ratio: float = 0.0,
          gradient_checkpointing: bool = False, eval_rows: Optional[Sequence[Any]] = None,
          save_steps: Optional[int] = None, checkpoint_dir: Optional[str] = None, resume: Optional[str] = None,
          seed: int = 0, progress: bool = True, on_epoch: Optional[Callable[[int, float], None]] = None) -> History:
    """Train the parameters that require grad with transformers' Trainer; returns the losses.

    ``collate`` turns a list of rows into a batch with ``labels``; without it each row is a ready batch
    (a dict of tensors) and ``batch_size`` is 1. Inputs the captured graph does not take are dropped.
    ``save_steps`` writes a checkpoint (the adapter in PEFT's format, optimizer, scheduler and random
    state) every that many optimizer steps to ``checkpoint_dir``; ``resume`` continues from such a
    checkpoint. With ``eval_rows`` the loss (and accuracy, for class labels) is evaluated after each epoch.
    ``on_epoch(epoch_index, mean_loss)`` is called after each epoch. The model is left in eval mode.
    """
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    _check(model, epochs, lr, rows, lr_scheduler, warmup_ratio, save_steps, checkpoint_dir)
    if collate is None:                         # rows are batches already
        collate, batch_size = (lambda items: items[0]), 1
    scratch = None if save_steps else tempfile.mkdtemp(prefix="graphpeft-trainer-")   # Trainer wants a folder
    history = History()
    try:
        args = TrainingArguments(
            output_dir=checkpoint_dir if save_steps else scratch, num_train_epochs=epochs, learning_rate=lr,
            per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
            gradient_accumulation_steps=grad_accum, weight_decay=weight_decay, max_grad_norm=max_grad_norm or 0.0,
            lr_scheduler_type=lr_scheduler, warmup_steps=float(warmup_ratio),   # a float below 1: a ratio
            gradient_checkpointing=gradient_checkpointing,
            logging_strategy="steps", logging_steps=1, logging_nan_inf_filter=False,
            eval_strategy="epoch" if eval_rows else "no", save_strategy="steps" if save_steps else "no",
            save_steps=save_steps or 500, seed=seed, data_seed=seed, report_to=[], disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=list(rows), eval_dataset=list(eval_rows or []) or None,
                          data_collator=lambda batch: model_inputs(model, collate(batch)),
                          compute_metrics=_accuracy if eval_rows and _classifies(model) else None,
                          callbacks=[AdapterStepCallback(), RichProgressCallback(history, progress, on_epoch)])
        for quiet in (PrinterCallback, ProgressCallback):     # graphpeft prints its own lines and bars
            trainer.remove_callback(quiet)
        trainer.train(resume_from_checkpoint=resume)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    model.eval()
    return history


def _check(model: nn.Module, epochs: int, lr: float, rows: Sequence[Any], lr_scheduler: str, warmup_ratio: float,
           save_steps: Optional[int], checkpoint_dir: Optional[str]) -> None:
    if not isinstance(epochs, int) or epochs <= 0:
        raise GraphPeftError(f"epochs must be a positive integer, got {epochs!r}")
    if not lr > 0:
        raise GraphPeftError(f"learning rate must be positive, got {lr!r}")
    if not any(p.requires_grad for p in model.parameters()):
        raise GraphPeftError("the model has no trainable parameters; rewrite it with an adapter first")
    if not len(rows):
        raise GraphPeftError("no training rows: the data set is empty")
    if lr_scheduler not in LR_SCHEDULERS:
        raise GraphPeftError(f"unknown learning-rate schedule {lr_scheduler!r}; choose one of {', '.join(LR_SCHEDULERS)}")
    if not 0 <= warmup_ratio < 1:
        raise GraphPeftError(f"warmup ratio must be at least 0 and below 1, got {warmup_ratio!r}")
    if save_steps and not checkpoint_dir:
        raise GraphPeftError("save_steps needs a checkpoint_dir to write the checkpoints to")


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict]) -> dict[str, float]:
    """Mean loss over ``batches``, and accuracy when the labels are class ids (sequence classification)."""
    was_training = model.training
    model.eval()
    total_loss, steps, correct, seen = 0.0, 0, 0, 0
    for batch in batches:
        out = model(**model_inputs(model, batch))
        loss = _loss_of(out)
        if loss is not None:
            total_loss, steps = total_loss + loss.item(), steps + 1
        logits = out["logits"] if isinstance(out, dict) else getattr(out, "logits", None)
        labels = batch.get("labels")
        if logits is not None and labels is not None and labels.dim() == 1 and logits.dim() == 2:
            correct += int((logits.argmax(-1) == labels).sum())
            seen += labels.numel()
    model.train(was_training)
    result = {"loss": total_loss / steps if steps else float("nan")}
    if seen:
        result["accuracy"] = correct / seen
    return result
