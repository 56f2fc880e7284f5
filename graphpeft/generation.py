"""``GraphPeftModel.generate``: transformers' generation loop over rewritten graphs with a KV cache.

The training graph is captured with ``use_cache=False``; a decode step must not recompute the prompt.
Generation therefore captures the source model twice more, with transformers' ``DynamicCache`` (made a
pytree by ``transformers.integrations.executorch.register_dynamic_cache_export_support``), and runs the
adapter's own pass on both graphs, exactly as ``rewrite`` did on the training graph:

    prefill  (input_ids [B, N], attention_mask [B, N], position_ids [B, N])  -> logits [B, 1, V], cache (N positions)
    step     (input_ids [B, n], attention_mask [B, P+n], position_ids [B, n], cache (P positions))
                                                                              -> logits [B, n, V], cache (P+n positions)

    source model ─export(use_cache=True)─▶ prefill graph ─pass(config)─┐
                 ─export(cache=P)────────▶ step graph    ─pass(config)─┤─ every parameter and buffer rebound
    training graph (graph_module) ─────────────────────────────────────┘  to the graph module's own objects

The rewritten prefill and step graphs then read the very parameters of ``graph_module`` (base
weights, adapters, modules_to_save): training, ``load_adapter`` or ``.to(device)`` is seen at once,
and the adapter's sites are checked to be the same as in the training graph. Batch, prompt length and
cache length are dynamic dims, so a decode step costs the same whatever the prompt length (attention
over the cache aside) and nothing is recaptured while generating. Graphs are built on the first
``generate`` of each adapter (and of the base model, under ``disable_adapter``) and kept.

transformers' ``generate`` runs unchanged (greedy, sampling, beam search, logits processors,
streamers, ``return_dict_in_generate``...): it is called on a shallow copy of the source model whose
class is a subclass of the model's own with ``forward`` routed to the two graphs, so the model's own
``prepare_inputs_for_generation``, generation config and cache classes apply. The prefill graph keeps
only the last position's logits (``logits_to_keep=1``), as transformers' generate asks.
"""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from graphpeft import registry
from graphpeft.capture import CAPTURE_META, CaptureInfo, capture_info, is_hf_model, retarget_device, set_train_mode
from graphpeft.errors import GraphPeftError
from graphpeft.rewriter import EXTRA_INPUTS, get_attr_path

_STATE = "_graphpeft_generation"          # GraphPeftModel.__dict__ entry: {key: _Graphs}, plus the proxy
_BASE_KEY = "\0base"                      # the graphs without any adapter (disable_adapter)
_EXAMPLE_BATCH, _EXAMPLE_PROMPT, _EXAMPLE_PAST, _EXAMPLE_NEW = 2, 5, 3, 2
_REFUSED = ("output_attentions", "output_hidden_states")


@dataclass
class _Graphs:
    prefill: fx.GraphModule
    step: fx.GraphModule
    device: Optional[torch.device]
    positions: bool          # the graphs take position_ids (weight adapters) or compute their own (added tokens)


def generate(peft_model: Any, *args: Any, **kwargs: Any) -> Any:
    """``transformers.GenerationMixin.generate`` on ``peft_model``'s graphs (see the module docstring)."""
    from graphpeft.model import _extra_inputs

    source = _generation_source(peft_model)
    proxy = _proxy(peft_model, source)
    if peft_model._disabled:
        extras = {}
        for name in peft_model.graph_module.meta.get(EXTRA_INPUTS, {}):   # inputs only the adapters read
            kwargs.pop(name, None)
    else:
        extras = _extra_inputs(peft_model.graph_module, kwargs)          # e.g. task_ids, checked
    proxy.__dict__["_graphpeft_extras"] = extras
    try:
        return proxy.generate(*args, **kwargs)
    finally:
        proxy.__dict__["_graphpeft_extras"] = {}


def _generation_source(peft_model: Any) -> nn.Module:
    source = peft_model.__dict__.get("_source_model")
    if not is_hf_model(source):
        raise GraphPeftError("generate() needs a model rewritten from a transformers model (graphpeft.rewrite(model, "
                             "...) or graphpeft.from_pretrained(model, ...)); this one was given as a graph")
    if not source.can_generate():
        raise GraphPeftError(f"{type(source).__name__} cannot generate text (it has no language-model head); "
                             f"use a *ForCausalLM or *ForConditionalGeneration model")
    if getattr(source.config, "is_encoder_decoder", False):
        raise GraphPeftError(f"generate() on encoder-decoder models ({type(source).__name__}) is not supported yet; "
                             f"merge_and_unload() a LoRA, AdaLoRA or IA3 adapter and generate with the merged model")
    return source


def _adds_positions(peft_model: Any, adapter_name: Optional[str]) -> bool:
    """A rule that cannot merge into the weights adds positions (virtual tokens, a prefix) to the sequence."""
    return adapter_name is not None and any(not registry.rule(r.rule).mergeable for r in peft_model.records
                                            if r.adapter == adapter_name)


# -- the proxy: the model's own class, forward routed to the graphs ----------------------------------

def _proxy(peft_model: Any, source: nn.Module) -> nn.Module:
    state = peft_model.__dict__.setdefault(_STATE, {})
    proxy = state.get("proxy")
    if proxy is None or proxy.__dict__.get("_graphpeft_source") is not source:
        proxy = copy.copy(source)                     # shares modules, config and generation config
        proxy.__class__ = _proxy_class(type(source))
        proxy.__dict__["_graphpeft_model"] = peft_model
        proxy.__dict__["_graphpeft_source"] = source
        state["proxy"] = proxy
    return proxy


@functools.lru_cache(maxsize=None)
def _proxy_class(cls: type) -> type:
    @functools.wraps(cls.forward)           # transformers reads forward's signature (position_ids, cache, ...)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _forward(self.__dict__["_graphpeft_model"], cls, args, kwargs, self.__dict__.get("_graphpeft_extras", {}))

    def device(self: nn.Module) -> torch.device:
        return _device(self.__dict__["_graphpeft_model"].graph_module) or torch.device("cpu")

    return type(cls.__name__, (cls,), {"forward": forward, "device": property(device),
                                       "__module__": cls.__module__, "__qualname__": cls.__qualname__})


def _forward(peft_model: Any, cls: type, args: tuple, kwargs: dict, extras: dict) -> Any:
    bound = inspect.signature(cls.forward).bind(None, *args, **kwargs).arguments
    bound.pop("self", None)
    extra = bound.pop("kwargs", {}) or {}
    values = {**bound, **extra}
    ids, mask, positions = values.pop("input_ids", None), values.pop("attention_mask", None), values.pop("position_ids", None)
    cache, use_cache = values.pop("cache", None), values.pop("use_cache", None)
    values.pop("logits_to_keep", None), values.pop("return_dict", None)
    for name in _REFUSED:
        if values.pop(name, None):
            raise GraphPeftError(f"{name} is not part of graphpeft's generation graphs; generate without it")
    given = sorted(k for k, v in values.items() if v is not None)
    if given or ids is None:
        raise GraphPeftError(f"generate() takes input_ids (and attention_mask, position_ids) with graphpeft; "
                             f"{given[0] if given else 'input_ids'} {'is not supported' if given else 'is missing'}")
    graphs = _graphs(peft_model)
    past = cache.get_seq_length() if cache is not None else 0
    batch, new = ids.shape
    if mask is None:
        mask = torch.ones(batch, past + new, dtype=torch.long, device=ids.device)
    if mask.shape[1] < past + new:
        # positions the prefill graph put in front of the sequence (virtual tokens) are in the cache, attended
        mask = torch.cat([mask.new_ones(batch, past + new - mask.shape[1]), mask], dim=1)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if graphs.positions:
        inputs["position_ids"] = positions if positions is not None else \
            (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new:]
    if past == 0:
        out = graphs.prefill(**inputs, **_prefill_constants(cls), **_batched(extras, batch))
        _write_cache_prefix(peft_model, out["cache"])
        if cache is not None:
            for i, layer in enumerate(out["cache"].layers):
                cache.update(layer.keys, layer.values, i)
            out["cache"] = cache
    else:
        out = graphs.step(**inputs, cache=cache, use_cache=True)
        for old, layer in zip(cache.layers, out["cache"].layers):
            old.keys, old.values = layer.keys, layer.values
        out["cache"] = cache
    if use_cache is False:
        out["cache"] = None
    return out


def _write_cache_prefix(peft_model: Any, cache: Any) -> None:
    """A rule whose keys and values are replaced at the attention sites (a learned prefix) says, through
    ``rule.cache_prefix(graph_module, records)``, what the first positions of each layer's cache hold."""
    if peft_model._disabled:
        return
    records = [r for r in peft_model.records if r.adapter == peft_model.active_adapter]
    for name in sorted({r.rule for r in records}):
        hook = getattr(registry.rule(name), "cache_prefix", None)
        if hook is None:
            continue
        with torch.no_grad():
            for layer, (key, value) in hook(peft_model.graph_module, [r for r in records if r.rule == name]).items():
                target = cache.layers[layer]
                target.keys[:, :, :key.shape[1]] = key.to(target.keys.dtype)
                target.values[:, :, :value.shape[1]] = value.to(target.values.dtype)


def _batched(extras: dict, batch: int) -> dict:
    """Extra inputs given per prompt, repeated for the beams and return sequences generate made of each."""
    out = {}
    for name, value in extras.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] != batch and batch % value.shape[0] == 0:
            value = value.repeat_interleave(batch // value.shape[0], dim=0)
        out[name] = value
    return out


# -- capturing and rewriting the prefill and step graphs ---------------------------------------------

def _graphs(peft_model: Any) -> _Graphs:
    state = peft_model.__dict__.setdefault(_STATE, {})
    key = _BASE_KEY if peft_model._disabled else peft_model.active_adapter
    graphs = state.get(key)
    device = _device(peft_model.graph_module)
    if graphs is None:
        cuda = [device.index or 0] if device is not None and device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):   # the passes' initialisers must not move the user's seed
            graphs = state[key] = _build(peft_model, None if key == _BASE_KEY else key)
    if graphs.device != device and device is not None:
        for gm in (graphs.prefill, graphs.step):
            retarget_device(gm.graph, device)
            gm.recompile()
        graphs.device = device
    return graphs


def _build(peft_model: Any, adapter_name: Optional[str]) -> _Graphs:
    from transformers.integrations.executorch import register_dynamic_cache_export_support

    register_dynamic_cache_export_support()
    source = peft_model.__dict__["_source_model"]
    main = peft_model.graph_module
    where = _device(main)
    on = next((p.device for p in source.parameters()), torch.device("cpu"))
    example = on if on.type != "meta" else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    vocab = int(source.config.get_text_config().vocab_size)
    ids = torch.randint(0, vocab, (_EXAMPLE_BATCH, _EXAMPLE_PROMPT), generator=gen)
    positions = not _adds_positions(peft_model, adapter_name)
    prompt = dict(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=_positions(ids.shape[1], 0))
    constants = _prefill_constants(type(source))
    if not positions:     # the model's own positions, as the rule needs (and PEFT does: it ignores position_ids)
        del prompt["position_ids"]
    prefill = _rewritten(peft_model, adapter_name, _export(source, _on(prompt, example), constants, past=False))
    extras = {name: _example_extra(prefill, name) for name in prefill.meta.get(EXTRA_INPUTS, {})}
    with torch.no_grad():     # the step graph is captured on a real cache, as the prefill graph makes it
        cache = prefill(**_on(prompt, where), **constants, **_on(extras, where))["cache"]
        cache = _cache_on(cache, example)
    past = cache.get_seq_length()
    new = torch.randint(0, vocab, (_EXAMPLE_BATCH, _EXAMPLE_NEW), generator=gen)
    stepping = dict(input_ids=new, attention_mask=torch.ones(_EXAMPLE_BATCH, past + _EXAMPLE_NEW, dtype=torch.long),
                    position_ids=_positions(_EXAMPLE_NEW, past))
    if not positions:
        del stepping["position_ids"]
    # a rule that adds positions did its work in the prefill: the steps read them from the cache
    step = _rewritten(peft_model, adapter_name if positions else None,
                      _export(source, {**_on(stepping, example), "cache": cache}, {"use_cache": True}, past=True))
    for gm in (prefill, step):
        if where is not None:
            retarget_device(gm.graph, where)
            gm.recompile()
    return _Graphs(prefill, step, where, positions)


def _export(source: nn.Module, tensors: dict, constants: dict, past: bool) -> fx.GraphModule:
    auto = torch.export.Dim.AUTO
    seq = auto if past else torch.export.Dim("prompt_length")   # one prompt length: a pass extends them together
    shapes: dict[str, Any] = {k: {0: auto, 1: seq} for k in ("input_ids", "attention_mask", "position_ids")
                              if k in tensors}
    if past:
        shapes["attention_mask"] = {0: auto, 1: auto}
    if past:
        layers = len(tensors["cache"].layers)
        shapes["cache"] = [[{0: auto, 2: auto}] * layers, [{0: auto, 2: auto}] * layers]
    shapes.update({k: None for k in constants})
    was = source.training
    source.eval()
    try:
        ep = torch.export.export(source, (), {**tensors, **constants}, strict=False, dynamic_shapes=shapes)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GraphPeftError(f"could not capture {type(source).__name__} with a KV cache for generation: "
                             f"{type(exc).__name__}: {reason[:300]}") from None
    finally:
        source.train(was)
    gm = ep.module()
    gm = fx.GraphModule(gm, gm.graph, class_name=type(source).__name__ + ("StepGraph" if past else "PrefillGraph"))
    gm.training = False
    gm.meta[CAPTURE_META] = CaptureInfo(
        mode="export", input_names=tuple(n.target for n in gm.graph.nodes if n.op == "placeholder"),
        constants=dict(constants), signature=inspect.signature(source.forward), model_class=type(source).__name__,
        hf_config=source.config, loss_type=None, name_or_path=getattr(source.config, "_name_or_path", None) or None)
    return gm


def _rewritten(peft_model: Any, adapter_name: Optional[str], gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` rewritten by the adapter's pass, every parameter and buffer bound to the graph module's own."""
    from graphpeft.api import apply_method   # api builds GraphPeftModels: imported here, not at the top

    main = peft_model.graph_module
    wanted: set[str] = set()
    if adapter_name is not None:
        config = peft_model.peft_config[adapter_name]
        gm, records = apply_method(gm, config.for_loading(), adapter_name)
        wanted = {p for rec in records for p in rec.params}
        have = {p for rec in peft_model.records if rec.adapter == adapter_name for p in rec.params}
        if wanted != have:
            missing = sorted(wanted ^ have)
            raise GraphPeftError(f"the generation graph's adapter sites differ from the model's ({missing[0]}); "
                                 f"generate with the merged model (merge_and_unload())")
    source = peft_model.__dict__["_source_model"]
    shared = wanted | {n for n, _ in source.named_parameters(remove_duplicate=False)} | \
        {n for n, _ in source.named_buffers(remove_duplicate=False)}
    attrs: dict[str, Any] = {}
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            target = str(node.target)
            mine = _attr_or_none(main, target)
            if node.op == "get_attr" and target not in shared:
                mine = None            # a constant of this capture (a lifted tensor), not the training graph's
            if node.op == "call_module" and not (isinstance(mine, nn.Module) and any(True for _ in mine.parameters())):
                mine = None            # a module without weights (torch.export's guards) stays this capture's
            attrs[target] = mine if mine is not None else get_attr_path(gm, target)
    bound = fx.GraphModule(attrs, gm.graph, class_name=type(gm).__name__)
    for name in wanted:                # every adapter parameter is the training graph's own object
        if _attr_or_none(bound, name) is not _attr_or_none(main, name):
            raise GraphPeftError(f"the generation graph does not read the model's {name}; generate with the "
                                 f"merged model (merge_and_unload()) instead")
    bound.meta.update(gm.meta)
    set_train_mode(bound, False)
    for p in bound.parameters():
        if p.requires_grad and not any(p is q for q in main.parameters()):
            p.requires_grad_(False)
    return bound


# -- small helpers --------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _prefill_constants(cls: type) -> dict:
    params = inspect.signature(cls.forward).parameters
    return {"use_cache": True, **({"logits_to_keep": 1} if "logits_to_keep" in params else {})}


def _example_extra(gm: fx.GraphModule, name: str) -> Any:
    """An example value for an input a pass added (task ids: zeros, one per row)."""
    node = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == name)
    val = node.meta.get("val")
    dtype = getattr(val, "dtype", torch.long)
    return torch.zeros(_EXAMPLE_BATCH, dtype=dtype)


def _positions(new: int, past: int) -> torch.Tensor:
    return torch.arange(past, past + new).expand(_EXAMPLE_BATCH, new).contiguous()


def _on(tensors: dict, device: Optional[torch.device]) -> dict:
    return {k: v.to(device) if device is not None else v for k, v in tensors.items()}


def _cache_on(cache: Any, device: torch.device) -> Any:
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.to(device), layer.values.to(device)
    return cache


def _device(gm: nn.Module) -> Optional[torch.device]:
    return next((t.device for t in [*gm.parameters(), *gm.buffers()]), None)


def _attr_or_none(root: nn.Module, path: str) -> Any:
    try:
        return get_attr_path(root, path)
    except AttributeError:
        return None
