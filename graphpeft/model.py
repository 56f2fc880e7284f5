"""GraphPeftModel: the rewritten graph behind the original model's call signature.

``CapturedModel`` calls a captured graph with the original model's arguments and returns the same
output type (for Hugging Face models a ModelOutput, with ``.loss`` when ``labels`` are given: the
loss is computed outside the graph with the model's own transformers loss function).
``GraphPeftModel`` adds what an adapter needs: trainable-parameter report, save, merge, disable.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Any, Iterator, Optional

import torch
import torch.fx as fx
from torch import nn

from graphpeft import registry
from graphpeft.capture import CAPTURE_META, CaptureInfo, capture_info, set_train_mode
from graphpeft.errors import GraphPeftError
from graphpeft.result import Rewrite
from graphpeft.rewriter import EXTRA_INPUT_CHECKS, EXTRA_INPUTS, copy_graph, ensure_module

_IGNORED_ARGS = ("return_dict", "use_cache", "cache_position", "logits_to_keep")
_REFUSED_FLAGS = ("output_attentions", "output_hidden_states", "past_key_values")


class CapturedModel(nn.Module):
    """A captured graph that takes the original model's arguments and returns its output type."""

    def __init__(self, graph_module: fx.GraphModule):
        super().__init__()
        self.graph_module = graph_module
        self.training = graph_module.training

    @property
    def capture_info(self) -> Optional[CaptureInfo]:
        return capture_info(self.graph_module)

    def train(self, mode: bool = True) -> "CapturedModel":
        super().train(mode)
        set_train_mode(self.graph_module, mode)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(self.graph_module, args, kwargs)

    def _call(self, gm: fx.GraphModule, args: tuple, kwargs: dict) -> Any:
        info = capture_info(gm)
        extras = _extra_inputs(gm, kwargs)
        if info is None or info.mode != "export" or info.signature is None:
            return gm(*args, **kwargs, **extras)
        values = _bind(info, args, kwargs)
        labels = values.pop("labels", None) if "labels" not in info.input_names else None
        if labels is not None and not info.loss_type:
            raise GraphPeftError(f"labels were given, but graphpeft knows no loss for {info.model_class}; "
                                 f"call without labels and compute the loss from the outputs")
        for name in _IGNORED_ARGS:
            values.pop(name, None)
        for name in _REFUSED_FLAGS:
            if values.pop(name, None):
                raise GraphPeftError(f"{name} was not part of the captured graph; capture with it in example_inputs")
        values = {k: v for k, v in values.items() if v is not None}
        unknown = sorted(set(values) - set(info.input_names))
        if unknown:
            raise GraphPeftError(f"argument {unknown[0]!r} was not part of the captured graph (inputs: "
                                 f"{', '.join(info.input_names)}); pass it in example_inputs when rewriting")
        if labels is not None and _is_encoder_decoder(info) and "decoder_input_ids" in info.input_names \
                and values.get("decoder_input_ids") is None and values.get("decoder_inputs_embeds") is None:
            values["decoder_input_ids"] = _decoder_inputs_from_labels(labels, info)
        for name in info.input_names:
            if name not in values:
                values[name] = _default_input(name, values)
        ordered = [values[n] for n in info.input_names]
        positional, named = ordered[:info.positional], dict(zip(info.input_names[info.positional:], ordered[info.positional:]))
        try:
            out = gm(*positional, **named, **info.constants, **extras)
        except AssertionError as exc:  # torch.export's shape guards
            if not str(exc).startswith("Guard failed"):
                raise
            raise GraphPeftError(f"inputs do not fit the shapes the graph was captured for ({exc}); "
                                 f"rewrite with example_inputs of the shapes you need") from None
        if labels is not None:
            out = _with_loss(out, labels, info)
        return out


def _extra_inputs(gm: fx.GraphModule, kwargs: dict) -> dict:
    """Inputs a pass added to the graph (e.g. task ids), taken out of ``kwargs``; each is required."""
    wanted, checks = gm.meta.get(EXTRA_INPUTS, {}), gm.meta.get(EXTRA_INPUT_CHECKS, {})
    extras = {name: kwargs.pop(name) for name in list(kwargs) if name in wanted}
    for name, missing_hint in wanted.items():
        if extras.get(name) is None:
            raise GraphPeftError(missing_hint)
        problem = checks[name](extras[name]) if name in checks else None
        if problem:
            raise GraphPeftError(problem)
    return extras


def _bind(info: CaptureInfo, args: tuple, kwargs: dict) -> dict:
    try:
        bound = info.signature.bind_partial(*args, **kwargs)
    except TypeError as exc:
        raise GraphPeftError(f"arguments do not fit {info.model_class}.forward: {exc}") from None
    values = {}
    for name, value in bound.arguments.items():
        if info.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            values.update(value)
        else:
            values[name] = value
    return values


def _default_input(name: str, values: dict) -> torch.Tensor:
    ref = values.get("input_ids") if not name.startswith("decoder_") else values.get("decoder_input_ids")
    if ref is not None and name.endswith("attention_mask"):
        return torch.ones_like(ref)
    if ref is not None and name == "token_type_ids":
        return torch.zeros_like(ref)
    raise GraphPeftError(f"missing input {name!r}: the graph was captured with it; pass {name}=...")


def _with_loss(out: Any, labels: torch.Tensor, info: CaptureInfo) -> Any:
    from transformers.loss.loss_utils import LOSS_MAPPING

    logits = out["logits"] if isinstance(out, dict) else out[0]
    fn, config = LOSS_MAPPING.get(info.loss_type), info.hf_config
    if info.loss_type != "ForSequenceClassification" and logits.dim() == 3 and logits.shape[1] > labels.shape[1]:
        # tokens were prepended inside the graph (virtual tokens): they are never predicted
        pad = labels.new_full((labels.shape[0], logits.shape[1] - labels.shape[1]), -100)
        labels = torch.cat([pad, labels], dim=1)
    if _is_encoder_decoder(info) and logits.dim() == 3:
        # T5, BART, Whisper: labels are the decoder's targets at the same positions (no shift)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten().to(logits.device),
                                           ignore_index=-100)
        return _replace_loss(out, loss)
    if fn is None:
        raise GraphPeftError(f"no loss for {info.model_class} (loss_type {info.loss_type!r}); compute it from .logits")
    if info.loss_type == "ForSequenceClassification":
        loss = fn(labels, logits, config)
    elif info.loss_type in ("ForTokenClassification",):
        loss = fn(logits, labels, config)
    else:
        vocab = getattr(config, "vocab_size", None) or config.get_text_config().vocab_size
        loss = fn(logits=logits, labels=labels, vocab_size=vocab)
    return _replace_loss(out, loss)


def _replace_loss(out: Any, loss: torch.Tensor) -> Any:
    if isinstance(out, dict):
        return type(out)(loss=loss, **{k: v for k, v in out.items() if k != "loss"})
    return (loss, *out)


def _is_encoder_decoder(info: CaptureInfo) -> bool:
    return bool(getattr(info.hf_config, "is_encoder_decoder", False))


def _decoder_inputs_from_labels(labels: torch.Tensor, info: CaptureInfo) -> torch.Tensor:
    """What T5 and BART do when only labels are given: shift right, start token first, -100 -> pad."""
    config = info.hf_config
    start = getattr(config, "decoder_start_token_id", None)
    pad = getattr(config, "pad_token_id", None)
    if start is None or pad is None:
        raise GraphPeftError(f"{info.model_class} has no decoder_start_token_id/pad_token_id in its config; "
                             f"pass decoder_input_ids with the labels")
    shifted = labels.new_full(labels.shape, start)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, pad)


class GraphPeftModel(CapturedModel):
    """A rewritten graph with adapters: train it, save the adapter, merge it, or switch it off."""

    def __init__(self, graph_module: fx.GraphModule, configs: dict[str, Any], records: tuple[Rewrite, ...],
                 base_graph: fx.Graph):
        super().__init__(graph_module)
        self.peft_config = dict(configs)
        self.records = tuple(records)
        self.active_adapter = next(iter(self.peft_config), "default")
        self._base_graph = base_graph
        self._disabled = False
        self._base_cache: dict[str, fx.GraphModule] = {}   # a plain dict: not registered as a submodule
        self.method_state: dict[str, dict] = {}   # per adapter: what a method keeps between training steps

    # -- running --------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "GraphPeftModel":
        super().train(mode)
        self._base_cache.clear()      # the base graph is rebuilt in the new mode when next needed
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._with_loss_terms(self._forward(args, kwargs))

    def _forward(self, args: tuple, kwargs: dict) -> Any:
        if not self._disabled:
            return self._call(self.graph_module, args, kwargs)
        for name in self.graph_module.meta.get(EXTRA_INPUTS, {}):   # inputs only the adapters read
            kwargs.pop(name, None)
        return self._call(self._base_module(), args, kwargs)

    # -- method hooks: a pass class may define loss_term, update_and_allocate, progress ------------
    def _method_hooks(self, hook: str) -> Iterator[tuple[str, Any, Any]]:
        """(adapter name, config, pass_cls.<hook>) for every adapter whose method defines ``hook``."""
        for adapter_name, config in self.peft_config.items():
            fn = getattr(registry.method_for_config(config).pass_cls, hook, None)
            if fn is not None:
                yield adapter_name, config, fn

    def _with_loss_terms(self, out: Any) -> Any:
        """``.loss`` plus every ``pass_cls.loss_term(model, adapter_name, config)`` that returns a tensor."""
        loss = out.get("loss") if isinstance(out, dict) else None
        if not isinstance(loss, torch.Tensor):
            return out
        for adapter_name, config, fn in self._method_hooks("loss_term"):
            term = fn(self, adapter_name, config)
            if isinstance(term, torch.Tensor):
                loss = loss + term
        out["loss"] = loss
        return out

    def update_and_allocate(self, step: int) -> None:
        """Call after ``loss.backward()`` (and the optimizer step), before ``zero_grad()``, with the step index.

        Methods whose adapter changes during training (a rank budget) update here; others ignore it.
        """
        for adapter_name, config, fn in self._method_hooks("update_and_allocate"):
            fn(self, adapter_name, config, step)

    def progress(self) -> dict[str, Any]:
        """Per-method training status for a progress bar (e.g. a current budget); empty for most methods."""
        status: dict[str, Any] = {}
        for adapter_name, config, fn in self._method_hooks("progress"):
            status.update(fn(self, adapter_name, config) or {})
        return status

    def _base_module(self) -> fx.GraphModule:
        if "base" not in self._base_cache:
            base = fx.GraphModule(self.graph_module, copy_graph(self._base_graph), class_name="BaseGraph")
            base.meta[CAPTURE_META] = capture_info(self.graph_module)
            self._base_cache["base"] = base
            set_train_mode(base, self.training)
        return self._base_cache["base"]

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes the base model's outputs (adapters and modules_to_save off)."""
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = False
            self._base_cache.clear()

    # -- parameters -------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # -- saving and merging ------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, adapter_name: Optional[str] = None) -> None:
        from graphpeft.io import save_adapter

        save_adapter(self, save_directory, adapter_name or self.active_adapter)

    def merge_and_unload(self) -> CapturedModel:
        """A plain module with the adapters merged into the weights: no adapter nodes, same outputs.

        The model's own weights are not changed: merged weights are new tensors in the returned module.
        """
        unmergeable = sorted({r.rule for r in self.records if not registry.rule(r.rule).mergeable})
        if unmergeable:
            raise GraphPeftError(f"{unmergeable[0]} adds tokens, not a weight update: it cannot be merged into "
                                 f"the weights; keep the adapter model as it is")
        graph = copy_graph(self._base_graph)
        merged = fx.GraphModule(self.graph_module, graph, class_name="MergedGraph")
        merged.meta[CAPTURE_META] = capture_info(self.graph_module)
        nodes = {n.name: n for n in graph.nodes}
        with torch.no_grad():
            for rec in self.records:
                weights = registry.rule(rec.rule).merged_weights(self.graph_module, rec)
                for attr, value in weights.items():
                    _set_weight(merged, attr, value, nodes.get(rec.anchor) if rec.kind != "module" else None)
        graph.eliminate_dead_code()
        merged.recompile()
        merged.delete_all_unused_submodules()
        set_train_mode(merged, self.training)
        return CapturedModel(merged)


def _own_module(gm: fx.GraphModule, path: str) -> nn.Module:
    """The module at ``path`` in ``gm``, first replaced by a shallow copy of its own.

    A GraphModule built over another one shares its call_module submodules (an nn.Linear of a
    symbolically traced model); setting a merged weight on a shared module would change the original.
    """
    module = ensure_module(gm, path)
    if not path:
        return module
    own = copy.copy(module)
    own._parameters, own._buffers, own._modules = dict(module._parameters), dict(module._buffers), dict(module._modules)
    parent_path, _, name = path.rpartition(".")
    setattr(ensure_module(gm, parent_path), name, own)
    return own


def _set_weight(gm: fx.GraphModule, attr: str, value: torch.Tensor, anchor: Optional[fx.Node]) -> None:
    """Give ``anchor`` (or every reader when None) the weight ``value`` in place of ``attr``."""
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == attr]
    users = {u for n in readers for u in n.users}
    param = nn.Parameter(value.clone(), requires_grad=False)
    owner_path, _, leaf = attr.rpartition(".")
    if anchor is None or users <= {anchor}:
        setattr(_own_module(gm, owner_path), leaf, param)
        return
    # the weight is shared (tied embeddings): only this site reads the merged copy
    new_attr = f"{owner_path}.{leaf}_merged_{anchor.name}" if owner_path else f"{leaf}_merged_{anchor.name}"
    ensure_module(gm, owner_path).register_parameter(new_attr.rpartition(".")[2], param)
    old = next(n for n in readers if anchor in n.users)
    with gm.graph.inserting_before(anchor):
        node = gm.graph.get_attr(new_attr)
    anchor.replace_input_with(old, node)
