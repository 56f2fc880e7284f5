"""Merging an adapter back into the model's own Hugging Face class.

``GraphPeftModel.merge_and_unload()`` on a model captured from a transformers ``PreTrainedModel``
returns an instance of that class (``LlamaForCausalLM``, ``T5ForConditionalGeneration``, ...) whose
weights are the merged ones, so it saves with ``save_pretrained``, loads with ``from_pretrained`` and
generates like any transformers model:

    W' = W + s * B A   (LoRA, AdaLoRA: from each rule's ``merged_weights``)      W' = W * l   ((IA)^3)

The new model is a structural copy of the source model that shares every tensor the merge does not
change (as PEFT's ``merge_and_unload`` returns the base model itself, no weight is copied); a merged
weight is a new tensor, so the user's model and the GraphPeftModel keep their weights. Tensors are
taken from the graph module (where ``.to(device)`` moved them), by the parameter's own name. A tied
weight (GPT-2's ``wte`` / ``lm_head``) whose merged value differs from its partner is untied: the
partner keeps the old tensor and ``tie_word_embeddings`` becomes False, so the saved model keeps both.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import nn

from graphpeft.engine.errors import GraphPeftError
from graphpeft.engine.quantized import is_quantized, requantized_parameter
from graphpeft.engine.result import Rewrite
from graphpeft.engine.rewriter import get_attr_path


def merged_hf_model(peft_model: Any, source: nn.Module,
                    merged_weights: Iterable[tuple[Rewrite, dict[str, torch.Tensor]]]) -> nn.Module:
    """An instance of ``type(source)`` with the merged weights (each record's, by graph attribute) in place of its
    own; ``source`` is not changed."""
    gm = peft_model.graph_module
    tensors = [*source.parameters(), *source.buffers()]
    model = copy.deepcopy(source, memo={id(t): t for t in tensors})    # modules and config copied, tensors shared
    names = _tensor_names(model)
    for group in {id(g): g for g in _aliases(model).values()}.values():
        # the graph module's current tensors (device moves, loaded weights), one per group of tied names
        current = next((t for t in map(lambda n: _attr_or_none(gm, n), group) if isinstance(t, torch.Tensor)), None)
        own = _attr_or_none(model, group[0])
        if is_quantized(own):
            continue        # the graph holds the packed data of the model's own quantized parameter
        if current is not None and current is not own:
            for name in group:
                _assign(model, name, current)
    merged: dict[str, torch.Tensor] = {}
    for rec, weights in merged_weights:
        for attr, value in weights.items():
            merged[_hf_name(model, rec, attr)] = value
    aliases = _aliases(model)
    untie = False
    for name, value in merged.items():
        if name not in names:
            raise GraphPeftError(f"merged weight {name!r} has no place in {type(source).__name__}; "
                                 f"use graphpeft.merge_for_inference(model) for the merged graph instead")
        others = [n for n in aliases.get(name, ()) if n != name and n not in merged]
        untie |= bool(others)
        old = _attr_or_none(model, name)
        owner_path, _, leaf = name.rpartition(".")
        quantized = requantized_parameter(old, value.detach(), model.get_submodule(owner_path))
        if quantized is not None:       # a quantized base layer: dequantized, merged and re-quantized, as PEFT does
            _assign(model, name, quantized, parameter=True)
            continue
        _assign(model, name, value.detach().clone().requires_grad_(False) if isinstance(old, nn.Parameter)
                else value.detach().clone(), parameter=isinstance(old, nn.Parameter))
    if untie:
        for config in {id(c): c for c in (model.config, _text_config(model.config))}.values():
            if hasattr(config, "tie_word_embeddings"):
                config.tie_word_embeddings = False
    model.train(peft_model.training)
    return model


def _hf_name(model: nn.Module, rec: Rewrite, attr: str) -> str:
    """The model's own name for a merged graph attribute: the site's module path + the attribute's leaf.

    A tied embedding's graph attribute is named after the head (``lm_head.weight``) while its site is
    ``transformer.wte``: the site's path decides.
    """
    leaf = attr.rpartition(".")[2]
    candidate = f"{rec.module_path}.{leaf}" if rec.module_path else leaf
    return candidate if _attr_or_none(model, candidate) is not None else attr


def _tensor_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters(remove_duplicate=False)] + \
           [n for n, _ in model.named_buffers(remove_duplicate=False)]


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """name -> every name of the same tensor (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for name in _tensor_names(model):
        by_id.setdefault(id(_attr_or_none(model, name)), []).append(name)
    return {name: group for group in by_id.values() for name in group}


def _attr_or_none(root: nn.Module, path: str) -> Any:
    try:
        return get_attr_path(root, path)
    except AttributeError:
        return None


def _assign(model: nn.Module, name: str, value: torch.Tensor, parameter: bool | None = None) -> None:
    owner_path, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    if leaf in owner._parameters if parameter is None else parameter:
        owner._parameters[leaf] = value if isinstance(value, nn.Parameter) else \
            nn.Parameter(value, requires_grad=value.requires_grad)
    else:
        owner._buffers[leaf] = value


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config
