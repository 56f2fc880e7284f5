"""A small, method-agnostic training loop: AdamW over the trainable parameters, ``model(**batch).loss``.

    history = train(peft_model, loader, epochs=3, lr=1e-3)
    history.epoch_losses        # mean loss of each epoch
    evaluate(peft_model, test_loader)["accuracy"]

It knows nothing about adapters: whatever has ``requires_grad`` is trained (graphpeft freezes the base
model when it rewrites it), everything else is left bit-identical. A model with ``update_and_allocate(step)``
(GraphPeftModel) has it called after every optimizer step, and its ``progress()`` shown beside the
progress bar (rich, on stderr, only when stderr is a terminal; see graphpeft.progress).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from graphpeft import progress as _progress
from graphpeft.errors import GraphPeftError


@dataclass
class History:
    """Losses seen while training: one per step, and the mean of each epoch."""

    step_losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)


def model_inputs(model: nn.Module, batch: dict) -> dict:
    """The part of ``batch`` the model takes: a captured graph takes only the inputs it was captured with.

    (Tokenizers return extras such as token_type_ids; ``labels`` is always kept, it feeds the loss, and
    so are inputs a pass added to the graph, such as task ids.)
    """
    from graphpeft.rewriter import EXTRA_INPUTS

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


def train(model: nn.Module, batches: Iterable[dict], epochs: int = 3, lr: float = 1e-3, weight_decay: float = 0.0,
          max_grad_norm: Optional[float] = 1.0, progress: bool = True,
          on_epoch: Optional[Callable[[int, float], None]] = None) -> History:
    """Train the parameters that require grad for ``epochs`` passes over ``batches``; returns the losses.

    Each batch is a dict of tensors with ``labels``; the model must return an output with ``.loss``.
    ``on_epoch(epoch_index, mean_loss)`` is called after each epoch. The model is left in eval mode.
    """
    if not isinstance(epochs, int) or epochs <= 0:
        raise GraphPeftError(f"epochs must be a positive integer, got {epochs!r}")
    if not lr > 0:
        raise GraphPeftError(f"learning rate must be positive, got {lr!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise GraphPeftError("the model has no trainable parameters; rewrite it with an adapter first")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    history = History()
    model.train()
    for epoch in range(epochs):
        losses = []
        total = len(batches) if hasattr(batches, "__len__") else None
        with _progress.bar(total, f"epoch {epoch + 1}/{epochs}", show=progress) as advance:
            for batch in batches:
                loss = _loss_of(model(**model_inputs(model, batch)))
                if loss is None:
                    raise GraphPeftError("the model returned no loss; the batches need 'labels'")
                if not math.isfinite(loss.item()):
                    raise GraphPeftError(f"loss became {loss.item()} at step {len(history.step_losses) + 1}; "
                                         f"lower the learning rate")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                if hasattr(model, "update_and_allocate"):   # methods that change the adapter as it trains
                    model.update_and_allocate(len(history.step_losses))
                losses.append(loss.item())
                history.step_losses.append(loss.item())
                status = model.progress() if hasattr(model, "progress") else {}
                advance(loss=f"{loss.item():.4f}", **status)
        if not losses:
            raise GraphPeftError("no training batches: the data set is empty")
        history.epoch_losses.append(sum(losses) / len(losses))
        if on_epoch is not None:
            on_epoch(epoch, history.epoch_losses[-1])
    model.eval()
    return history


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
