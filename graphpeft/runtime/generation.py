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
import itertools
import types
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from graphpeft.engine import registry
from graphpeft.engine.capture import CAPTURE_META, CaptureInfo, capture_info, is_hf_model, retarget_device, set_train_mode
from graphpeft.engine.errors import GraphPeftError, NoMatchError
from graphpeft.engine.rewriter import EXTRA_INPUTS, MODEL_HALF, copy_graph, extra_inputs, get_attr_path
from graphpeft.runtime.apply import apply_method
from graphpeft.runtime.hoist import flatten_attribute_reads, hoist_parameter_ops
from graphpeft.runtime.lean_calls import lean_calls

_STATE = "_graphpeft_generation"          # GraphPeftModel.__dict__ entry: {key: _Graphs}, plus the proxy
_BASE_KEY = "\0base"                      # the graphs without any adapter (disable_adapter)
_EXAMPLE_BATCH, _EXAMPLE_PROMPT, _EXAMPLE_PAST, _EXAMPLE_NEW = 2, 5, 3, 2
_REFUSED = ("output_attentions", "output_hidden_states")
_LEAVES = "graphpeft.generation.leaves"   # graph-module meta: (output type, path of each output leaf)


@dataclass
class _Graphs:
    prefill: fx.GraphModule
    step: fx.GraphModule
    device: Optional[torch.device]
    positions: bool          # the graphs take position_ids (weight adapters) or compute their own (added tokens)
    encoder: Optional[fx.GraphModule] = None      # encoder-decoders: what generate's get_encoder() runs
    config: Any = None       # the adapter config they were built for (an adapter deleted and added again differs)

    def all(self) -> list[fx.GraphModule]:
        return [gm for gm in (self.encoder, self.prefill, self.step) if gm is not None]


def generate(peft_model: Any, *args: Any, **kwargs: Any) -> Any:
    """``transformers.GenerationMixin.generate`` on ``peft_model``'s graphs (see the module docstring)."""
    source = _generation_source(peft_model)
    proxy = _proxy(peft_model, source)
    if peft_model._disabled:
        extras = {}
        for name in peft_model.graph_module.meta.get(EXTRA_INPUTS, {}):   # inputs only the adapters read
            kwargs.pop(name, None)
    else:
        extras = extra_inputs(peft_model.graph_module, kwargs)          # e.g. task_ids, checked
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

    def get_encoder(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        return _GraphEncoder(self.__dict__["_graphpeft_model"], self.__dict__.get("_graphpeft_extras", {}))

    return type(cls.__name__, (cls,), {"forward": forward, "device": property(device), "get_encoder": get_encoder,
                                       "__module__": cls.__module__, "__qualname__": cls.__qualname__})


def _forward(peft_model: Any, cls: type, args: tuple, kwargs: dict, extras: dict) -> Any:
    bound = _signature(cls).bind(None, *args, **kwargs).arguments
    bound.pop("self", None)
    extra = bound.pop("kwargs", {}) or {}
    values = {**bound, **extra}
    if "decoder_input_ids" in values or "encoder_outputs" in values:
        return _forward_seq2seq(peft_model, values, extras)
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
        out = _run_graph(graphs.prefill, cache, **inputs, **_prefill_constants(cls),
                         **_for_graph(graphs.prefill, extras, batch))
        _write_cache_prefix(peft_model, out["cache"])
    else:
        out = _run_graph(graphs.step, cache, **inputs, cache=cache, use_cache=True)
    if use_cache is False:
        out["cache"] = None
    return out


def _forward_seq2seq(peft_model: Any, values: dict, extras: dict) -> Any:
    """A decoder step of an encoder-decoder: the prefill graph on the first call, the step graph after."""
    from transformers.modeling_outputs import BaseModelOutput

    ids, encoded = values.pop("decoder_input_ids", None), values.pop("encoder_outputs", None)
    mask, cache, use_cache = values.pop("attention_mask", None), values.pop("cache", None), values.pop("use_cache", None)
    decoder_mask = values.pop("decoder_attention_mask", None)
    for name in ("return_dict", "logits_to_keep", "input_ids", "inputs_embeds"):
        values.pop(name, None)
    for name in _REFUSED:
        if values.pop(name, None):
            raise GraphPeftError(f"{name} is not part of graphpeft's generation graphs; generate without it")
    given = sorted(k for k, v in values.items() if v is not None)
    if decoder_mask is not None and not bool(decoder_mask.all()):
        given.insert(0, "a decoder_attention_mask with padding")
    if given or ids is None or encoded is None:
        raise GraphPeftError(f"generate() on encoder-decoders takes input_ids and attention_mask with graphpeft; "
                             f"{given[0] if given else 'the encoder output'} is not supported")
    graphs = _graphs(peft_model)
    hidden = encoded[0] if not hasattr(encoded, "last_hidden_state") else encoded.last_hidden_state
    batch = ids.shape[0]
    inputs = dict(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), decoder_input_ids=ids)
    if _main_input(peft_model.__dict__["_source_model"]) == "input_ids":   # Whisper's decoder reads every frame
        if mask is None:
            mask = torch.ones(batch, hidden.shape[1], dtype=torch.long, device=ids.device)
        if mask.shape[1] < hidden.shape[1]:      # virtual tokens the encoder graph put in front of the input
            mask = torch.cat([mask.new_ones(batch, hidden.shape[1] - mask.shape[1]), mask], dim=1)
        inputs["attention_mask"] = mask
    past = cache.get_seq_length() if cache is not None else 0
    if past == 0:
        out = _run_graph(graphs.prefill, cache, **inputs, use_cache=True, **_for_graph(graphs.prefill, extras, batch))
        _write_cache_prefix(peft_model, out["cache"])
    else:
        if ids.shape[1] != 1:
            raise GraphPeftError("an encoder-decoder step with a cache takes one new decoder token; pass the "
                                 "decoder_input_ids without a cache")
        out = _run_graph(graphs.step, cache, **inputs, cache=cache, use_cache=True)
    if use_cache is False:
        out["cache"] = None
    return out


class _GraphEncoder(nn.Module):
    """What ``get_encoder()`` gives transformers' generate on an encoder-decoder: the rewritten encoder graph."""

    def __init__(self, peft_model: Any, extras: dict):
        super().__init__()
        self.__dict__["_graphpeft_model"], self.__dict__["_graphpeft_extras"] = peft_model, extras

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                **kwargs: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutput

        for name in _REFUSED:
            if kwargs.pop(name, None):
                raise GraphPeftError(f"{name} is not part of graphpeft's generation graphs; generate without it")
        peft_model = self.__dict__["_graphpeft_model"]
        main = _main_input(peft_model.__dict__["_source_model"])
        if main == "input_ids":
            if input_ids is None or kwargs.get("inputs_embeds") is not None:
                raise GraphPeftError("generate() on encoder-decoders takes input_ids with graphpeft (not inputs_embeds)")
            inputs = dict(input_ids=input_ids, attention_mask=attention_mask if attention_mask is not None
                          else torch.ones_like(input_ids))
        else:
            if kwargs.get(main) is None:
                raise GraphPeftError(f"generate() on this model takes {main} with graphpeft")
            inputs = {main: kwargs[main]}
        encoder = _graphs(peft_model).encoder
        extras = _for_graph(encoder, self.__dict__["_graphpeft_extras"], next(iter(inputs.values())).shape[0])
        return BaseModelOutput(last_hidden_state=encoder(**inputs, **extras))


def _main_input(source: nn.Module) -> str:
    """What the encoder reads: token ids (T5, BART) or features (Whisper's log-mel ``input_features``)."""
    return getattr(source, "main_input_name", "input_ids")


def _for_graph(gm: fx.GraphModule, extras: dict, batch: int) -> dict:
    """The extra inputs (task ids) that ``gm`` itself takes, repeated for beams."""
    wanted = gm.meta.get(EXTRA_INPUTS, {})
    return _batched({k: v for k, v in extras.items() if k in wanted}, batch)


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
                target = getattr(cache, "self_attention_cache", cache).layers[layer]
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
    config = peft_model.peft_config.get(key)
    if graphs is None or graphs.config is not config:
        cuda = [device.index or 0] if device is not None and device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):   # the passes' initialisers must not move the user's seed
            graphs = state[key] = _build(peft_model, None if key == _BASE_KEY else key)
        graphs.config = config
    if graphs.device != device and device is not None:
        for gm in graphs.all():
            retarget_device(gm.graph, device)
            gm.recompile()
        graphs.device = device
    return graphs


def _build(peft_model: Any, adapter_name: Optional[str]) -> _Graphs:
    _register_cache_pytrees()
    source = peft_model.__dict__["_source_model"]
    where = _device(peft_model.graph_module)
    on = next((p.device for p in source.parameters()), torch.device("cpu"))
    example = on if on.type != "meta" else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    vocab = int(source.config.get_text_config().vocab_size)
    ids = torch.randint(0, vocab, (_EXAMPLE_BATCH, _EXAMPLE_PROMPT), generator=gen)
    new = torch.randint(0, vocab, (_EXAMPLE_BATCH, _EXAMPLE_NEW), generator=gen)
    adds = _adds_positions(peft_model, adapter_name)
    covered: set = set()

    def rewritten(gm: fx.GraphModule, may_skip: bool, rewrite: bool = True) -> fx.GraphModule:
        bound, keys = _rewritten(peft_model, adapter_name if rewrite else None, gm, may_skip)
        covered.update(keys)
        if where is not None:
            retarget_device(bound.graph, where)
            bound.recompile()
        hoist_parameter_ops(bound)         # e.g. the fused cat(A_q, A_k, A_v): once, not once per token
        flatten_attribute_reads(bound)     # one attribute read per weight per call, not one per module level
        lean_calls(bound)                  # torch's own bindings, not the dispatcher's objects: less Python per op
        return bound

    def run(gm: fx.GraphModule, **inputs: Any) -> Any:
        extras = {name: _example_extra(gm, name) for name in gm.meta.get(EXTRA_INPUTS, {})}
        with torch.no_grad():
            return _run_graph(gm, None, **_on(inputs, where), **_on(extras, where))

    if getattr(source.config, "is_encoder_decoder", False):
        graphs = _build_seq2seq(source, ids, new, example, adds, rewritten, run)
    else:
        prompt = dict(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=_positions(ids.shape[1], 0))
        if adds:      # the model's own positions, as the rule needs (and PEFT does: it ignores position_ids)
            del prompt["position_ids"]
        constants = _prefill_constants(type(source))
        prefill = rewritten(_export(source, _on(prompt, example), constants, "Prefill"), may_skip=False)
        cache = _cache_on(run(prefill, **prompt, **constants)["cache"], example)   # the step graph's example cache
        past = cache.get_seq_length()
        stepping = dict(input_ids=new, attention_mask=torch.ones(_EXAMPLE_BATCH, past + _EXAMPLE_NEW, dtype=torch.long),
                        position_ids=_positions(_EXAMPLE_NEW, past))
        if adds:
            del stepping["position_ids"]
        # a rule that adds positions did its work in the prefill: the steps read them from the cache
        step = rewritten(_export(source, {**_on(stepping, example), "cache": cache}, {"use_cache": True}, "Step"),
                         may_skip=False, rewrite=not adds)
        graphs = _Graphs(prefill, step, where, not adds)
    if adapter_name is not None:
        have = {_site_key(r) for r in peft_model.records if r.adapter == adapter_name}
        if covered != have:
            missing = sorted(have - covered) or sorted(covered - have)
            raise GraphPeftError(f"the generation graphs do not rewrite the model's site {missing[0][1]!r} as its "
                                 f"training graph does; generate with the merged model (merge_and_unload())")
    return graphs


def _build_seq2seq(source: nn.Module, ids: torch.Tensor, new: torch.Tensor, example: torch.device, adds: bool,
                   rewritten: Any, run: Any) -> _Graphs:
    """Encoder-decoders: an encoder graph (what generate's ``get_encoder()`` runs), then the decoder's prefill
    and step graphs, which read the encoder's output and cache the cross-attention keys and values once."""
    from transformers.modeling_outputs import BaseModelOutput

    from graphpeft.engine.capture import synthesize_inputs

    main = _main_input(source)
    if main == "input_ids":
        given, forward = dict(input_ids=ids, attention_mask=torch.ones_like(ids)), _encoder_forward
    elif main == "input_features":
        given, forward = {main: synthesize_inputs(source, batch=_EXAMPLE_BATCH)[main]}, _features_encoder_forward
    else:
        raise GraphPeftError(f"generate() on {type(source).__name__} (input {main!r}) is not supported; text "
                             f"(T5, BART) and speech (Whisper) encoder-decoders are")
    encoder = _export(source, _on(given, example), {}, "Encoder", forward=forward)
    encoder.meta[MODEL_HALF] = "encoder"      # the halves: a rule may give each its own share
    encoder = rewritten(encoder, may_skip=True)
    hidden = run(encoder, **given).to(example)
    start = getattr(source.config, "decoder_start_token_id", None) or 0
    decoder = torch.cat([torch.full((_EXAMPLE_BATCH, 1), start, dtype=torch.long), new[:, :1]], dim=1)
    context: dict[str, Any] = dict(encoder_outputs=BaseModelOutput(last_hidden_state=hidden))
    if main == "input_ids":      # Whisper's decoder reads every encoder position (it takes no encoder mask)
        context["attention_mask"] = torch.ones(_EXAMPLE_BATCH, hidden.shape[1], dtype=torch.long).to(example)
    prefill = _export(source, {**context, "decoder_input_ids": _on({"d": decoder}, example)["d"]},
                      {"use_cache": True}, "Prefill")
    if main == "input_ids":
        prefill.meta[MODEL_HALF] = "decoder"
    prefill = rewritten(prefill, may_skip=True)
    cache = _cache_on(run(prefill, **context, decoder_input_ids=decoder, use_cache=True)["cache"], example)
    step = rewritten(_export(source, {**context, "decoder_input_ids": new[:, :1].to(example), "cache": cache},
                             {"use_cache": True}, "Step"), may_skip=True, rewrite=not adds)
    return _Graphs(prefill, step, _device(prefill), False, encoder)


def _encoder_forward(self: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """What the encoder graph captures: the model's own encoder, under the model's module paths."""
    return self.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state


def _features_encoder_forward(self: nn.Module, input_features: torch.Tensor) -> torch.Tensor:
    """The same for a speech encoder: log-mel features of the model's fixed frame count."""
    return self.get_encoder()(input_features=input_features, return_dict=True).last_hidden_state


def _export(source: nn.Module, tensors: dict, constants: dict, kind: str, forward: Any = None) -> fx.GraphModule:
    """torch.export of ``source`` (its ``forward``, or ``forward`` bound to it: module paths stay the model's)."""
    auto = torch.export.Dim.AUTO
    shapes: dict[str, Any] = {}
    length = torch.export.Dim("input_length")      # one prompt length: a pass extends these inputs together
    for name in ("input_ids", "attention_mask", "position_ids"):
        if name in tensors:
            shapes[name] = {0: auto, 1: length if kind in ("Prefill", "Encoder") else auto}
    if "input_features" in tensors:        # the frame count is the model's own (its positions are fixed)
        shapes["input_features"] = {0: auto}
    if "encoder_outputs" in tensors:
        shapes["encoder_outputs"] = [{0: auto, 1: length}]
        if "attention_mask" in tensors:
            shapes["attention_mask"] = {0: auto, 1: length}
    if "decoder_input_ids" in tensors:      # the step takes one token (the prefill: the start and any given)
        shapes["decoder_input_ids"] = {0: auto} if kind == "Step" else {0: auto, 1: auto}
    if "cache" in tensors:
        shapes["cache"] = _cache_shapes(tensors["cache"], length if "encoder_outputs" in tensors else None)
    shapes.update({k: None for k in constants})
    was = source.training
    source.eval()
    if forward is not None:
        source.forward = types.MethodType(forward, source)    # an instance attribute, deleted below
    try:
        from graphpeft.engine.quantized import capturable

        with capturable(source):      # quantized layers (bitsandbytes, torchao) as one custom op each
            ep = torch.export.export(source, (), {**tensors, **constants}, strict=False, dynamic_shapes=shapes)
        signature = inspect.signature(source.forward)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GraphPeftError(f"could not capture {type(source).__name__} with a KV cache for generation: "
                             f"{type(exc).__name__}: {reason[:300]}") from None
    finally:
        if forward is not None:
            del source.forward
        source.train(was)
    gm = ep.module()
    gm = fx.GraphModule(gm, gm.graph, class_name=f"{type(source).__name__}{kind}Graph")
    gm.training = False
    gm.meta[CAPTURE_META] = CaptureInfo(
        mode="export", input_names=tuple(n.target for n in gm.graph.nodes if n.op == "placeholder"),
        constants=dict(constants), signature=signature, model_class=type(source).__name__,
        hf_config=source.config, loss_type=None, name_or_path=getattr(source.config, "_name_or_path", None) or None)
    return gm


def _cache_shapes(cache: Any, cross_length: Any) -> Any:
    auto = torch.export.Dim.AUTO
    if hasattr(cache, "self_attention_cache"):
        own = _cache_shapes(cache.self_attention_cache, None)
        cross = [[{0: auto, 2: cross_length}] * len(cache.cross_attention_cache.layers)] * 2
        return [own, cross]
    return [[{0: auto, 2: auto}] * len(cache.layers)] * 2


def _rewritten(peft_model: Any, adapter_name: Optional[str], gm: fx.GraphModule,
               may_skip: bool) -> tuple[fx.GraphModule, set]:
    """``gm`` rewritten by the adapter's pass, every parameter and buffer bound to the graph module's own;
    with the sites it rewrote, as (rule, module path, kind).

    ``may_skip``: a graph with none of the adapter's sites (an encoder, for a decoder-only adapter), or
    with sites the training graph does not have (a prefix would land on the encoder's self-attention),
    stays as captured; the caller checks that the graphs together cover the training graph's sites.
    """


    main = peft_model.graph_module
    wanted: set[str] = set()
    keys: set = set()
    if adapter_name is not None:
        config = peft_model.peft_config[adapter_name]
        captured, info = copy_graph(gm.graph), capture_info(gm)
        have = {_site_key(r) for r in peft_model.records if r.adapter == adapter_name}
        try:
            gm, records = apply_method(gm, config.for_loading(), adapter_name, inference=True)
        except NoMatchError:
            if not may_skip:
                raise
            records = []
        keys = {_site_key(r) for r in records}
        if gm.meta.get(MODEL_HALF) == "decoder":     # the decoder's share of a site anchored in the encoder
            keys = {k if k in have else next((h for h in sorted(have) if (h[0], h[2]) == (k[0], k[2])), k)
                    for k in keys}
        if not keys <= have:
            if not may_skip:
                raise GraphPeftError(f"the generation graph rewrites {sorted(keys - have)[0][1]!r}, which the "
                                     f"model's training graph does not; generate with the merged model")
            gm, records, keys = fx.GraphModule(gm, captured, class_name=type(gm).__name__), [], set()
            gm.meta[CAPTURE_META] = info
        wanted = {p for rec in records for p in rec.params}
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
    _flatten_outputs(bound)
    set_train_mode(bound, False)
    for p in bound.parameters():
        if p.requires_grad and not any(p is q for q in main.parameters()):
            p.requires_grad_(False)
    return bound, keys


def _flatten_outputs(gm: fx.GraphModule) -> None:
    """The graph returns its output leaves as a flat tuple; ``_run_graph`` puts them into the caller's cache.

    torch.export's codegen would rebuild a ModelOutput with a new DynamicCache on every call, and
    DynamicCache's pytree unflatten copies every layer (it updates an empty cache): a second copy of the
    whole cache per decode step.
    """
    import torch.utils._pytree as pytree

    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None or info.out_spec is None or info.out_spec.is_leaf():
        return
    paths = _leaf_paths(info.out_spec, ())
    gm.meta[_LEAVES] = (info.out_spec.type, paths)
    gm.graph._codegen.pytree_info = info._replace(out_spec=pytree.tree_structure(tuple(range(len(paths)))))
    gm.recompile()


def _leaf_paths(spec: Any, path: tuple) -> list[tuple]:
    from transformers import DynamicCache, EncoderDecoderCache

    if spec.is_leaf():
        return [path]
    children = list(spec.children())
    if spec.type is DynamicCache:
        names: Any = ("keys", "values")
    elif spec.type is EncoderDecoderCache:
        names = ("self", "cross")
    elif isinstance(spec.context, (list, tuple)) and len(spec.context) == len(children):
        names = spec.context              # a ModelOutput's (or dict's) keys
    else:
        names = range(len(children))
    return [leaf for name, child in zip(names, children) for leaf in _leaf_paths(child, (*path, name))]


def _run_graph(gm: fx.GraphModule, into: Any, **inputs: Any) -> Any:
    """Call a prefill or step graph; its keys and values go into the cache ``into`` (a new one when None):
    appended to an empty cache, replacing the layers of a filled one (the graph returns them concatenated)."""
    from transformers import DynamicCache, EncoderDecoderCache

    leaves = gm(**inputs)
    if _LEAVES not in gm.meta:
        return leaves
    kind, paths = gm.meta[_LEAVES]
    values = dict(zip(paths, leaves))
    fields = {p[0]: v for p, v in values.items() if len(p) == 1}

    def layers(prefix: tuple) -> list[tuple[torch.Tensor, torch.Tensor]]:
        count = sum(1 for p in paths if p[:-1] == (*prefix, "keys"))
        return [(values[(*prefix, "keys", i)], values[(*prefix, "values", i)]) for i in range(count)]

    if any(p[:2] == ("cache", "self") for p in paths):
        cache = into if into is not None else EncoderDecoderCache(DynamicCache(), DynamicCache())
        _fill(cache.self_attention_cache, layers(("cache", "self")))
        _fill(cache.cross_attention_cache, layers(("cache", "cross")))
        cache.is_updated = {i: True for i in range(len(cache.cross_attention_cache.layers))}
    else:
        cache = into if into is not None else DynamicCache()
        _fill(cache, layers(("cache",)))
    return kind(**fields, cache=cache)


def _fill(cache: Any, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    if cache.get_seq_length() == 0:
        for i, (key, value) in enumerate(layers):
            cache.update(key, value, i)
    else:
        for layer, (key, value) in zip(cache.layers, layers):
            layer.keys, layer.values = key, value


def _site_key(rec: Any) -> tuple:
    return (rec.rule, rec.module_path, rec.kind)


def _register_cache_pytrees() -> None:
    """DynamicCache (transformers' own registration) and EncoderDecoderCache as pytrees, for torch.export."""
    import torch.utils._pytree as pytree
    from transformers import EncoderDecoderCache
    from transformers.integrations.executorch import register_dynamic_cache_export_support

    register_dynamic_cache_export_support()
    if EncoderDecoderCache in pytree.SUPPORTED_NODES:
        return
    pytree.register_pytree_node(
        EncoderDecoderCache,
        lambda c: ([c.self_attention_cache, c.cross_attention_cache], None),
        lambda children, _: EncoderDecoderCache(*children),     # is_updated follows from the cross cache
        serialized_type_name="transformers.cache_utils.EncoderDecoderCache",
        flatten_with_keys_fn=lambda c: ([(pytree.GetAttrKey("self_attention_cache"), c.self_attention_cache),
                                         (pytree.GetAttrKey("cross_attention_cache"), c.cross_attention_cache)], None))


# -- small helpers --------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


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
    if device is None:
        return tensors
    return torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, tensors)


def _cache_on(cache: Any, device: torch.device) -> Any:
    if hasattr(cache, "self_attention_cache"):
        _cache_on(cache.self_attention_cache, device)
        _cache_on(cache.cross_attention_cache, device)
        return cache
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.to(device), layer.values.to(device)
    return cache


def _device(gm: nn.Module) -> Optional[torch.device]:
    first = next(itertools.chain(gm.parameters(), gm.buffers()), None)
    return first.device if first is not None else None


def _attr_or_none(root: nn.Module, path: str) -> Any:
    try:
        return get_attr_path(root, path)
    except AttributeError:
        return None
