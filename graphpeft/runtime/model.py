"""GraphPeftModel: the rewritten graph behind the original model's call signature.

``CapturedModel`` calls a captured graph with the original model's arguments and returns the same
output type (for Hugging Face models a ModelOutput, with ``.loss`` when ``labels`` are given: the
loss is computed outside the graph as the model's own transformers class computes it: graphpeft.engine.losses).
``GraphPeftModel`` adds what an adapter needs: trainable-parameter report, save, merge, disable.

Several adapters, as PEFT has them (``add_adapter``, ``set_adapter``, ``load_adapter``): each adapter
has its own rewritten graph, the base graph plus that adapter's pass, and all of them read the
parameters of one graph module. The active adapter's graph is ``graph_module.graph``; the others
are parked beside it and swapped in by ``set_adapter``, so an inactive adapter's branches are not
in the graph at all (they contribute nothing and cost nothing):

    base graph ─┬─ pass(config "default") ─▶ graph "default"  ◀─ graph_module.graph (active)
                └─ pass(config "other")   ─▶ graph "other"     (parked)
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator, Optional

import torch
import torch.fx as fx
from torch import nn

from graphpeft.engine import losses, registry
from graphpeft.engine.capture import CAPTURE_META, CaptureInfo, capture_info, is_hf_model, retarget_device, set_train_mode
from graphpeft.engine.errors import GraphPeftError
from graphpeft.engine.match import leads_to
from graphpeft.engine.result import Rewrite
from graphpeft.engine.rewriter import (EXTRA_INPUT_CHECKS, EXTRA_INPUTS, copy_graph, ensure_module, extra_inputs,
                                       get_attr_path, own_module)
from graphpeft.runtime.apply import rewrite_graph

_IGNORED_ARGS = ("return_dict", "use_cache", "cache_position", "logits_to_keep")
# loss options transformers' Trainer passes to models whose forward takes **kwargs; causal-LM losses use them
_LOSS_KWARGS = ("num_items_in_batch",)
_REFUSED_FLAGS = ("output_attentions", "output_hidden_states", "past_key_values")
_GRAPH_META = (EXTRA_INPUTS, EXTRA_INPUT_CHECKS)   # graph-module meta that belongs to one adapter's graph


class CapturedModel(nn.Module):
    """A captured graph that takes the original model's arguments and returns its output type."""

    def __init__(self, graph_module: fx.GraphModule):
        nn.Module.__init__(self)      # not super(): a presented class may have PreTrainedModel after this one
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

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "CapturedModel":
        """``.to(device)`` / ``.cuda()`` also move the device constants the graph recorded at capture."""
        super()._apply(fn, *args, **kwargs)
        device = next((t.device for t in [*self.parameters(), *self.buffers()]), None)
        if device is not None:
            if retarget_device(self.graph_module.graph, device):
                self.graph_module.recompile()
            for graph in self._other_graphs():
                retarget_device(graph, device)
        return self

    def _other_graphs(self) -> list[fx.Graph]:
        """Graphs kept beside the running one (a base graph, inactive adapters) that must move too."""
        return []

    def _call(self, gm: fx.GraphModule, args: tuple, kwargs: dict) -> Any:
        info = capture_info(gm)
        loss_kwargs = {name: kwargs.pop(name) for name in _LOSS_KWARGS if name in kwargs}
        extras = extra_inputs(gm, kwargs)
        if info is None or info.mode != "export" or info.signature is None:
            return gm(*args, **kwargs, **extras)
        values = _bind(info, args, kwargs)
        targets = {name: values.pop(name) for name in losses.TARGETS
                   if name not in info.input_names and values.get(name) is not None}
        if targets:
            losses.check_targets(targets, info)
        labels = targets.get("labels")
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
        if labels is not None and losses.is_encoder_decoder(info) and "decoder_input_ids" in info.input_names \
                and values.get("decoder_input_ids") is None and values.get("decoder_inputs_embeds") is None:
            values["decoder_input_ids"] = losses.decoder_inputs_from_labels(labels, info)
        for name in info.input_names:
            if name not in values:
                values[name] = _default_input(name, values, info.input_names)
        ordered = [values[n] for n in info.input_names]
        positional, named = ordered[:info.positional], dict(zip(info.input_names[info.positional:], ordered[info.positional:]))
        try:
            out = gm(*positional, **named, **info.constants, **extras)
        except AssertionError as exc:  # torch.export's shape guards
            if not str(exc).startswith("Guard failed"):
                raise
            raise GraphPeftError(f"inputs do not fit the shapes the graph was captured for ({exc}); "
                                 f"rewrite with example_inputs of the shapes you need") from None
        if targets:
            main = values.get(info.main_input_name, values.get("inputs_embeds"))
            length = main.shape[1] if isinstance(main, torch.Tensor) and main.dim() >= 2 else None
            out = losses.with_loss(out, targets, info, length, loss_kwargs, values)
        return out


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


def _default_input(name: str, values: dict, expected: tuple[str, ...]) -> torch.Tensor:
    ref = values.get("input_ids") if not name.startswith("decoder_") else values.get("decoder_input_ids")
    if ref is not None and name.endswith("attention_mask"):
        return torch.ones_like(ref)
    if ref is not None and name == "token_type_ids":
        return torch.zeros_like(ref)
    given = ", ".join(sorted(values)) or "none"
    raise GraphPeftError(f"missing input {name!r}: the graph was captured with inputs {', '.join(expected)} "
                         f"(given: {given}); pass {name}=... (in a data set, a column named {name})")


class GraphPeftModel(CapturedModel):
    """A rewritten graph with adapters: train it, save the adapter, merge it, or switch it off.

    ``GraphPeftModel(...)`` gives an instance of a subclass made for the captured model (see
    ``presented_class``): its ``forward`` shows the captured model's signature, which is what
    transformers' Trainer reads to keep dataset columns and find the labels.
    """

    supports_gradient_checkpointing = True

    def __new__(cls, graph_module: Optional[fx.GraphModule] = None, *args: Any, **kwargs: Any) -> "GraphPeftModel":
        if cls is GraphPeftModel and graph_module is not None:
            cls = presented_class(capture_info(graph_module), tuple(graph_module.meta.get(EXTRA_INPUTS, {})))
        return super().__new__(cls)

    def __init__(self, graph_module: fx.GraphModule, configs: dict[str, Any], records: tuple[Rewrite, ...],
                 base_graph: fx.Graph):
        super().__init__(graph_module)
        info = capture_info(graph_module)
        if info is not None and info.hf_config is not None:   # what transformers and TRL read off a model
            self.config = info.hf_config
            self.name_or_path = info.name_or_path or ""
            self.main_input_name = info.main_input_name
            self.generation_config = info.generation_config
            self.loss_type = info.loss_type          # Trainer counts shifted labels for "ForCausalLM"
            self.warnings_issued: dict[str, bool] = {}
        self._checkpointing: Optional[dict[str, Any]] = None   # activation checkpointing options, when on
        self.peft_config = dict(configs)
        self.records = tuple(records)
        self.active_adapter = next(iter(self.peft_config), "default")
        self._base_graph = base_graph
        self._disabled = False
        self._base_cache: dict[str, fx.GraphModule] = {}   # a plain dict: not registered as a submodule
        self.method_state: dict[str, dict] = {}   # per adapter: what a method keeps between training steps
        self._parked: dict[str, tuple[fx.Graph, dict]] = {}   # inactive adapters: (graph, its graph-module meta)
        self._trainable = {name: {p for rec in self.records if rec.adapter == name for p in rec.params
                                  if get_attr_path(graph_module, p).requires_grad} for name in self.peft_config}

    # -- running --------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "GraphPeftModel":
        super().train(mode)
        self._base_cache.clear()      # the base graph is rebuilt in the new mode when next needed
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._with_loss_terms(self._forward(args, kwargs))

    def _forward(self, args: tuple, kwargs: dict) -> Any:
        if not self._disabled:
            return self._call(self._running_module(), args, kwargs)
        for name in self.graph_module.meta.get(EXTRA_INPUTS, {}):   # inputs only the adapters read
            kwargs.pop(name, None)
        return self._call(self._base_module(), args, kwargs)

    # -- method hooks: a pass class may define loss_term, update_and_allocate, progress ------------
    def _method_hooks(self, hook: str) -> Iterator[tuple[str, Any, Any]]:
        """(adapter name, config, pass_cls.<hook>) for the active adapter, if its method defines ``hook``."""
        adapter_name = self.active_adapter       # as in PEFT, only the active adapter trains
        config = self.peft_config.get(adapter_name)
        fn = getattr(registry.method_for_config(config).pass_cls, hook, None) if config is not None else None
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

    def _other_graphs(self) -> list[fx.Graph]:
        self._base_cache.clear()
        return [self._base_graph, *(graph for graph, _ in self._parked.values())]

    def _base_module(self) -> fx.GraphModule:
        if "base" not in self._base_cache:
            base = fx.GraphModule(self.graph_module, copy_graph(self._base_graph), class_name="BaseGraph")
            base.meta[CAPTURE_META] = capture_info(self.graph_module)
            self._base_cache["base"] = base
            set_train_mode(base, self.training)
        return self._base_cache["base"]

    # -- activation checkpointing (transformers' names and options) --------------------------------
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute each layer's activations in the backward pass instead of keeping them (training only).

        As transformers: ``activation_checkpointing_kwargs`` go to ``torch.utils.checkpoint.checkpoint``
        (default ``use_reentrant=False``), every ``every_n_layers``-th layer is checkpointed, ``offload``
        keeps the saved layer inputs in host memory. The graph is cut at its layers (graphpeft.runtime.checkpointing).
        """
        if not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise GraphPeftError(f"every_n_layers must be a positive integer, got {every_n_layers!r}")
        options = dict(activation_checkpointing_kwargs or {"use_reentrant": False})
        self._checkpointing = {"options": options, "every_n_layers": every_n_layers, "offload": bool(offload)}
        self._base_cache.clear()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None, **kwargs: Any) -> None:
        """The older name of ``activation_checkpointing_enable`` (PEFT and TRL call this one)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        self._checkpointing = None
        self._base_cache.clear()

    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self._checkpointing is not None

    def _running_module(self) -> fx.GraphModule:
        """The active adapter's graph, or, while training with checkpointing on, its checkpointed form."""
        return self._checkpointed("checkpointed", self.graph_module)

    def _checkpointed(self, key: str, gm: fx.GraphModule) -> fx.GraphModule:
        if self._checkpointing is None or not self.training:
            return gm
        if key not in self._base_cache:
            from graphpeft.runtime.checkpointing import checkpoint_function, checkpointed

            options = self._checkpointing
            self._base_cache[key] = checkpointed(gm, checkpoint_function(options["options"], options["offload"]),
                                                 options["every_n_layers"],
                                                 inputs_need_grad=bool(options["options"].get("use_reentrant")))
        return self._base_cache[key]

    # -- the model without its head, as transformers names it (TRL's fused LM-head loss uses both) ----
    @property
    def base_model(self) -> Any:
        """Calls the running graph up to the output head; returns ``last_hidden_state`` (graphpeft.runtime.backbone)."""
        from graphpeft.runtime.backbone import Backbone

        return Backbone(self)

    def get_output_embeddings(self) -> nn.Module:
        """The output head's weight and bias (the parameters themselves; frozen unless an adapter trains them)."""
        from graphpeft.runtime.backbone import output_head_view

        return output_head_view(self.graph_module)

    def _backbone_module(self) -> fx.GraphModule:
        key = "backbone-disabled" if self._disabled else "backbone"
        if key not in self._base_cache:
            from graphpeft.runtime.backbone import backbone_module

            self._base_cache[key] = backbone_module(self._base_module() if self._disabled else self.graph_module)
        return self._checkpointed(f"{key}-checkpointed", self._base_cache[key])

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes the base model's outputs (adapters and modules_to_save off)."""
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = False
            self._base_cache.clear()

    # -- several adapters ---------------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    def add_adapter(self, adapter_name: str, peft_config: Any, optimize: bool = True) -> None:
        """Add an adapter: the base graph rewritten by ``peft_config``'s pass, with parameters named after it.

        As in PEFT, the new adapter is neither active nor trainable until ``set_adapter(adapter_name)``.
        """
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise GraphPeftError(f"adapter name {adapter_name!r} is not usable; pass a non-empty name without dots")
        if adapter_name in self.peft_config:
            raise GraphPeftError(f"adapter {adapter_name!r} already exists; choose another name or delete_adapter it")
        gm = self.graph_module
        scratch = fx.GraphModule(gm, copy_graph(self._base_graph), class_name="AdapterGraph")
        scratch.meta[CAPTURE_META] = capture_info(gm)
        fresh, records = rewrite_graph(scratch, peft_config, adapter_name, optimize)
        trainable = {p for rec in records for p in rec.params if get_attr_path(fresh, p).requires_grad}
        _adopt_attributes(gm, fresh, {p for rec in records for p in rec.params})
        for attr in trainable:
            get_attr_path(gm, attr).requires_grad_(False)
        self._trainable[adapter_name] = trainable
        fresh.graph.owning_module = gm       # parked, the graph reads this module's attributes (as it will when active)
        self._parked[adapter_name] = (fresh.graph, {k: fresh.meta[k] for k in _GRAPH_META if k in fresh.meta})
        self.records = self.records + tuple(records)
        self.peft_config[adapter_name] = peft_config

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the only active adapter; it trains (unless ``inference_mode``), the others are frozen."""
        self._check_adapter(adapter_name)
        if adapter_name != self.active_adapter:
            self._park()
            self._unpark(adapter_name)
            self.active_adapter = adapter_name
        for name, attrs in self._trainable.items():
            for attr in attrs:
                get_attr_path(self.graph_module, attr).requires_grad_(name == adapter_name and not inference_mode)

    def load_adapter(self, adapter_dir: str, adapter_name: str, is_trainable: bool = False) -> None:
        """Add the adapter saved in ``adapter_dir`` (by graphpeft or PEFT) as ``adapter_name``; not made active.

        As in PEFT, it is frozen and the model put in eval mode unless ``is_trainable``; an adapter of that
        name that exists already gets the saved weights (its config stays).
        """
        from graphpeft.runtime.io import load_adapter_state, read_adapter_config

        config, tensors = read_adapter_config(adapter_dir, is_trainable)
        added = adapter_name not in self.peft_config
        if added:
            self.add_adapter(adapter_name, config.for_loading())
            self.peft_config[adapter_name] = config
        try:
            load_adapter_state(self, tensors, adapter_name)
        except GraphPeftError:
            if added:
                self.delete_adapter(adapter_name)
            raise
        if is_trainable:
            for attr in self._trainable[adapter_name]:
                get_attr_path(self.graph_module, attr).requires_grad_(True)
        else:
            self.eval()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter, its graph and its parameters; the active one cannot go while it is the only one."""
        self._check_adapter(adapter_name)
        if adapter_name == self.active_adapter:
            others = [n for n in self.peft_config if n != adapter_name]
            if not others:
                raise GraphPeftError(f"adapter {adapter_name!r} is the only adapter; keep it or start from the base model")
            self.set_adapter(others[0])
        gm = self.graph_module
        for attr in sorted({p for rec in self.records if rec.adapter == adapter_name for p in rec.params}):
            owner_path, _, leaf = attr.rpartition(".")
            owner = get_attr_path(gm, owner_path) if owner_path else gm
            if leaf in owner._parameters:
                delattr(owner, leaf)
        self.records = tuple(r for r in self.records if r.adapter != adapter_name)
        for table in (self.peft_config, self._parked, self._trainable, self.method_state):
            table.pop(adapter_name, None)

    def _check_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise GraphPeftError(f"no adapter named {adapter_name!r}; adapters: {', '.join(self.peft_config)}")

    def _park(self) -> None:
        """Put the active adapter's graph (and its graph-module meta) aside."""
        gm = self.graph_module
        self._parked[self.active_adapter] = (gm.graph, {k: gm.meta.pop(k) for k in _GRAPH_META if k in gm.meta})

    def _unpark(self, adapter_name: str) -> None:
        self._base_cache.clear()      # graphs derived from the active one are rebuilt when next needed
        graph, meta = self._parked.pop(adapter_name)
        self.graph_module.graph = graph          # recompiles
        self.graph_module.meta.update(meta)
        set_train_mode(self.graph_module, self.training)

    # -- parameters -------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # -- the source model: merging into its class, generation (graphpeft.runtime.hf_merge, graphpeft.runtime.generation) --
    def keep_source_model(self, model: nn.Module) -> None:
        """Remember the model the graph was captured from, as a plain attribute (not a submodule)."""
        self.__dict__["_source_model"] = model

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``generate`` with the active adapter, on graphs captured with a KV cache."""
        from graphpeft.runtime.generation import generate
        return generate(self, *args, **kwargs)

    # -- saving and merging ------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, selected_adapters: Optional[list[str]] = None,
                        path_initial_model_for_weight_conversion: Optional[str] = None,
                        state_dict: Optional[dict] = None, is_main_process: Optional[bool] = None, **kwargs: Any) -> None:
        """Save each adapter (default: all) as PEFT does: "default" in ``save_directory``, others in ``<dir>/<name>``.

        ``path_initial_model_for_weight_conversion``: as PEFT, save a PiSSA/OLoRA adapter converted to plain
        LoRA against the initial adapter saved in that folder right after rewriting.

        Only adapter weights are ever written. Called as transformers' Trainer calls it (with
        ``is_main_process``), it writes nothing on other processes, and on the main one also writes
        ``model.safetensors.index.json`` naming the active adapter's file: that index is how Trainer
        resumes a model that is not a ``PeftModel`` (it hands the file to ``load_state_dict``, which takes
        an adapter's PEFT-keyed tensors). ``state_dict`` (a full state dict) is not needed and is ignored.
        """
        from graphpeft.runtime.io import save_adapter, write_resume_index

        if is_main_process is False:
            return
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:
            self._check_adapter(name)
        for name in names:
            save_adapter(self, save_directory if name == "default" else f"{save_directory}/{name}", name,
                         initial=path_initial_model_for_weight_conversion)
        if is_main_process is not None and self.active_adapter in names:
            write_resume_index(save_directory, self.active_adapter, self._adapter_state_keys(self.active_adapter))

    def _adapter_state_keys(self, adapter_name: str) -> list[str]:
        """This module's state-dict names of what an adapter's file holds."""
        return [f"graph_module.{attr}" for rec in self.records if rec.adapter == adapter_name for attr in rec.saved_keys]

    @property
    def _keys_to_ignore_on_save(self) -> list[str]:
        """What ``save_pretrained`` never writes: every state-dict entry but the active adapter's (transformers' name)."""
        saved = set(self._adapter_state_keys(self.active_adapter))
        return [key for key in self.state_dict(keep_vars=True) if key not in saved]

    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to do: weights the base model ties are one parameter in the captured graph."""

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """A module state dict, or the tensors of the active adapter as saved (PEFT's keys, from its file)."""
        own = set(self.state_dict(keep_vars=True))
        if state_dict and not own.intersection(state_dict):
            from graphpeft.runtime.io import load_adapter_state

            load_adapter_state(self, dict(state_dict), self.active_adapter)
            return nn.modules.module._IncompatibleKeys([], [])
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def merge_and_unload(self) -> nn.Module:
        """The model with the active adapter merged into the weights: no adapter nodes, same outputs.

        For a Hugging Face model, an instance of its own class (e.g. ``LlamaForCausalLM``) that saves,
        loads and generates as any; otherwise a plain module running the merged graph. The model's own
        weights are not changed: merged weights are new tensors in the returned module.
        """
        source = self.__dict__.get("_source_model")
        if is_hf_model(source):
            from graphpeft.runtime.hf_merge import merged_hf_model
            return merged_hf_model(self, source, self._merged_weights())
        return self.merged_graph()

    def _mergeable_records(self) -> list[Rewrite]:
        records = [r for r in self.records if r.adapter == self.active_adapter]
        unmergeable = sorted({r.rule for r in records if not registry.rule(r.rule).mergeable})
        if unmergeable:
            raise GraphPeftError(f"{unmergeable[0]} adds tokens, not a weight update: it cannot be merged into "
                                 f"the weights; keep the adapter model as it is")
        return records

    def _merged_weights(self) -> list[tuple[Rewrite, dict[str, torch.Tensor]]]:
        """The active adapter's records, each with its merged weights (each rule's ``merged_weights``).

        A quantized base weight is dequantized first, as its library does (graphpeft/quantized.py), so the merged
        value is the float W + s B A that PEFT re-quantizes.
        """
        from graphpeft.engine.quantized import dequantized_weights

        records = self._mergeable_records()
        gm = self.graph_module
        with torch.no_grad(), dequantized_weights(gm, [r.info.get("weight") for r in records if r.info]):
            return [(rec, registry.rule(rec.rule).merged_weights(gm, rec)) for rec in records]

    def merged_graph(self) -> CapturedModel:
        """The base graph with the active adapter merged into its weights, behind the model's call signature."""
        from graphpeft.engine.quantized import store_requantized

        graph = copy_graph(self._base_graph)
        merged = fx.GraphModule(self.graph_module, graph, class_name="MergedGraph")
        merged.meta[CAPTURE_META] = capture_info(self.graph_module)
        nodes = {n.name: n for n in graph.nodes}
        with torch.no_grad():
            for rec, weights in self._merged_weights():
                for attr, value in weights.items():
                    if not store_requantized(merged, attr, value):      # a quantized base: re-quantized, as PEFT
                        _set_weight(merged, attr, value, nodes.get(rec.anchor) if rec.kind != "module" else None)
        graph.eliminate_dead_code()
        merged.recompile()
        merged.delete_all_unused_submodules()
        set_train_mode(merged, self.training)
        return CapturedModel(merged)


def _adopt_attributes(gm: fx.GraphModule, fresh: fx.GraphModule, params: set[str]) -> None:
    """Register in ``gm`` what ``fresh`` (a graph module built over ``gm``) added: its new parameters and modules."""
    targets = {str(n.target) for n in fresh.graph.nodes if n.op in ("get_attr", "call_module")} | params
    for target in sorted(targets):
        value = get_attr_path(fresh, target)
        try:
            existing = get_attr_path(gm, target)
        except AttributeError:
            existing = None
        if existing is value:
            continue
        if existing is not None:
            raise GraphPeftError(f"the new adapter's {target} already exists in the model; choose another adapter name")
        owner_path, _, leaf = target.rpartition(".")
        owner = ensure_module(gm, owner_path)
        if isinstance(value, nn.Parameter):
            owner.register_parameter(leaf, value)
        elif isinstance(value, nn.Module):
            owner.add_module(leaf, value)
        elif isinstance(value, torch.Tensor):
            owner.register_buffer(leaf, value)
        else:
            setattr(owner, leaf, value)


def _set_weight(gm: fx.GraphModule, attr: str, value: torch.Tensor, anchor: Optional[fx.Node]) -> None:
    """Give ``anchor`` (or every reader when None) the weight ``value`` in place of ``attr``."""
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == attr]
    users = {u for n in readers for u in n.users}
    param = nn.Parameter(value.clone(), requires_grad=False)
    owner_path, _, leaf = attr.rpartition(".")
    if anchor is None or all(leads_to(u, anchor) for u in users):
        setattr(own_module(gm, owner_path), leaf, param)
        return
    # the weight is shared (tied embeddings): only this site reads the merged copy
    new_attr = f"{owner_path}.{leaf}_merged_{anchor.name}" if owner_path else f"{leaf}_merged_{anchor.name}"
    ensure_module(gm, owner_path).register_parameter(new_attr.rpartition(".")[2], param)
    old = next(n for n in readers if any(leads_to(u, anchor) for u in n.users))
    user = next(u for u in old.users if leads_to(u, anchor))      # the anchor, or a transpose/cast on its way
    with gm.graph.inserting_before(user):
        node = gm.graph.get_attr(new_attr)
    user.replace_input_with(old, node)


_PRESENTED: dict[tuple, type] = {}


def presented_class(info: Optional[CaptureInfo], extra_inputs: tuple[str, ...] = ()) -> type:
    """The GraphPeftModel subclass for models captured as ``info``: ``GraphPeft<ModelClass>``.

    Its ``forward`` carries the captured model's signature (plus inputs a pass added, such as
    ``task_ids``), because transformers' Trainer reads the class's ``forward`` to choose dataset columns,
    label names and whether the model takes loss kwargs. For a Hugging Face model it is also a
    ``PreTrainedModel``, so Trainer saves checkpoints through ``save_pretrained`` (the adapter only)
    instead of writing the full state dict. One class per signature, made once.
    """
    signature = info.signature if info is not None else None
    hf = info is not None and info.hf_config is not None
    key = (info.model_class if info else "", str(signature), extra_inputs, hf)
    if key not in _PRESENTED:
        def forward(self: GraphPeftModel, *args: Any, **kwargs: Any) -> Any:
            return GraphPeftModel.forward(self, *args, **kwargs)

        forward.__signature__ = _with_self(signature, extra_inputs)
        bases: tuple[type, ...] = (GraphPeftModel,)
        if hf:
            from transformers import PreTrainedModel
            bases += (PreTrainedModel,)
        name = f"GraphPeft{info.model_class if info else 'Model'}"
        _PRESENTED[key] = type(name, bases, {"forward": forward, "__module__": __name__, "__doc__": GraphPeftModel.__doc__})
    return _PRESENTED[key]


def _with_self(signature: Optional[inspect.Signature], extra_inputs: tuple[str, ...]) -> inspect.Signature:
    """``signature`` as a method's (``self`` first), pass-added inputs as keyword arguments before ``**kwargs``."""
    P = inspect.Parameter
    params = list(signature.parameters.values()) if signature is not None else \
        [P("args", P.VAR_POSITIONAL), P("kwargs", P.VAR_KEYWORD)]
    var_kw = [p for p in params if p.kind is P.VAR_KEYWORD]
    params = [p for p in params if p.kind is not P.VAR_KEYWORD]
    params += [P(name, P.KEYWORD_ONLY, default=None) for name in extra_inputs if name not in {p.name for p in params}]
    return inspect.Signature([P("self", P.POSITIONAL_OR_KEYWORD), *params, *var_kw])
