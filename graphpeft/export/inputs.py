"""Example inputs for exporting a captured model, read off its graph and its Hugging Face config.

    example_inputs(model)                     {name: tensor} in the graph's input order, batch 2, sequence 8
    example_inputs(model, labels="causal-lm") the same plus labels (ids; for seq-cls, class ids)

Sizes 2 and 8 are distinct and above 1, so the exporter keeps the batch and sequence dims symbolic; a
dim the captured graph holds static keeps its captured size.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from graphpeft.engine.errors import GraphPeftError

BATCH, SEQ = 2, 8
CAUSAL_LM, SEQ_CLS = "causal-lm", "seq-cls"
LOSS_TASKS = {"ForCausalLM": CAUSAL_LM, "ForSequenceClassification": SEQ_CLS}


def task_of(model: Any) -> Optional[str]:
    """"causal-lm" or "seq-cls" from the captured model's transformers loss type, else None."""
    info = model.capture_info
    return LOSS_TASKS.get(getattr(info, "loss_type", None) or "")


def _placeholder_values(model: Any) -> dict[str, Any]:
    return {n.target: n.meta.get("val") for n in model.graph_module.graph.nodes if n.op == "placeholder"}


def _config_value(config: Any, name: str) -> Any:
    value = getattr(config, name, None)
    if value is None and hasattr(config, "get_text_config"):
        value = getattr(config.get_text_config(), name, None)
    return value


def example_inputs(model: Any, labels: Optional[str] = None, batch: int = BATCH, seq: int = SEQ,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs the captured graph takes (``capture_info.input_names``), plus ``labels`` for a task."""
    info = model.capture_info
    if info is None or not info.input_names:
        raise GraphPeftError("the model was not captured with graphpeft.capture; pass example_inputs")
    vals = _placeholder_values(model)
    config = info.hf_config
    vocab = int(_config_value(config, "vocab_size") or 2)
    gen = torch.Generator().manual_seed(seed)
    inputs: dict[str, torch.Tensor] = {}
    for name in info.input_names:
        val = vals.get(name)
        if not isinstance(val, torch.Tensor):
            raise GraphPeftError(f"cannot make an example for input {name!r} (no shape recorded); pass example_inputs")
        sizes = [(batch if d == 0 else seq) if isinstance(s, torch.SymInt) else int(s) for d, s in enumerate(val.shape)]
        if val.dtype.is_floating_point:
            inputs[name] = torch.randn(*sizes, generator=gen, dtype=val.dtype)
        elif name.endswith("attention_mask"):
            inputs[name] = torch.ones(*sizes, dtype=val.dtype)
        elif name.endswith("input_ids"):
            inputs[name] = torch.randint(0, vocab, sizes, generator=gen, dtype=val.dtype)
        else:
            inputs[name] = torch.zeros(*sizes, dtype=val.dtype)
    if labels == CAUSAL_LM:
        ids = inputs.get("input_ids")
        if ids is None:
            raise GraphPeftError("a causal-LM loss needs an input_ids input")
        inputs["labels"] = ids.clone()
    elif labels == SEQ_CLS:
        first = next(iter(inputs.values()))
        num_labels = int(getattr(config, "num_labels", 2) or 2)
        inputs["labels"] = torch.randint(0, num_labels, (first.shape[0],), generator=gen)
    return inputs
