"""Model (+ example inputs) -> torch.fx.GraphModule.

Hugging Face models and any model given example inputs are captured with
``torch.export.export(..., strict=False)`` with dynamic batch and sequence dimensions, so the graph
runs on other shapes than the example; ``nn_module_stack`` metadata gives each op its module path.
A plain ``nn.Module`` without example inputs is traced with ``torch.fx`` symbolically, with no
leaf modules, so its linear layers show up as ops too.

The graph is captured in train mode (dropout and attention-dropout probabilities are then visible
in the graph) and switched to the model's own mode with ``set_train_mode``, a small graph pass.
What the caller needs to call the graph later is kept in ``gm.meta["graphpeft.capture"]``.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from graphpeft.engine.errors import CaptureError
from graphpeft.engine.quantized import capturable

aten = torch.ops.aten
CAPTURE_META = "graphpeft.capture"
_EXAMPLE_BATCH, _EXAMPLE_SEQ = 2, 8


@dataclass
class CaptureInfo:
    """How to call a captured graph with the original model's arguments."""

    mode: str                                    # "export" or "symbolic_trace"
    input_names: tuple[str, ...]                 # tensor inputs, in the graph's order
    constants: dict[str, Any] = field(default_factory=dict)   # non-tensor kwargs fixed at capture
    positional: int = 0                          # how many leading inputs were passed positionally
    signature: Optional[inspect.Signature] = None  # the original forward's signature
    model_class: str = ""
    hf_config: Any = None                        # transformers PretrainedConfig, when a HF model
    loss_type: Optional[str] = None              # transformers loss_type ("ForCausalLM", ...)
    name_or_path: Optional[str] = None
    main_input_name: str = "input_ids"          # what the model calls its main input (pixel_values, ...)
    generation_config: Any = None                # transformers GenerationConfig of a model that generates


def is_hf_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def capture(model: nn.Module, example_inputs: Any = None, *, dynamic: bool = True) -> fx.GraphModule:
    """Capture ``model`` as a GraphModule that takes the model's arguments.

    example_inputs: a dict of keyword arguments, a tuple of positional arguments, a single tensor,
    or None (Hugging Face models: synthesized from the config; other modules: symbolic trace).
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected a torch.nn.Module to capture, got {type(model).__name__}")
    if isinstance(model, fx.GraphModule):
        return model
    hf = is_hf_model(model)
    if example_inputs is None and not hf:
        with capturable(model):
            return _symbolic_trace(model)
    args, kwargs = _split_inputs(example_inputs if example_inputs is not None else synthesize_inputs(model))
    if hf:
        kwargs = {**_hf_constants(model), **kwargs}
    with capturable(model):     # quantized layers (bitsandbytes, torchao) become one custom op each
        gm = _export(model, args, kwargs, dynamic)
    if any(p.is_meta for p in model.parameters()):
        # built without weights: non-persistent buffers (rotary inv_freq) are in no file, compute them now
        from graphpeft.engine.meta_buffers import fill_meta_buffers
        fill_meta_buffers(model, gm)
    signature = _signature(model)
    constants = {k: v for k, v in kwargs.items() if _is_constant(v)}
    info = CaptureInfo(
        mode="export",
        input_names=tuple(n.target for n in gm.graph.nodes if n.op == "placeholder" and n.target not in constants),
        constants=constants,
        positional=len(args),
        signature=signature,
        model_class=type(model).__name__,
        hf_config=getattr(model, "config", None) if hf else None,
        loss_type=(getattr(model, "loss_type", None) or _causal_lm_loss_type(model)) if hf else None,
        name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        main_input_name=getattr(model, "main_input_name", "input_ids"),
        generation_config=getattr(model, "generation_config", None) if hf else None,
    )
    gm.meta[CAPTURE_META] = info
    set_train_mode(gm, model.training)
    return gm


def _causal_lm_loss_type(model: nn.Module) -> Optional[str]:
    """transformers computes a causal-LM loss when the class name gives no loss_type (GPT2LMHeadModel)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return "ForCausalLM" if type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() else None


def capture_info(gm: fx.GraphModule) -> Optional[CaptureInfo]:
    return getattr(gm, "meta", {}).get(CAPTURE_META)


# -- torch.export -----------------------------------------------------------------------------

def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool) -> fx.GraphModule:
    dynamic_shapes = None
    if dynamic:
        dynamic_shapes = (tuple(_dims(a) for a in args), {k: _dims(v) for k, v in kwargs.items()})
        if not args:
            dynamic_shapes = dynamic_shapes[1]
        elif not kwargs:
            dynamic_shapes = dynamic_shapes[0]
    was_training = model.training
    with _train_mode(model, _can_capture_in_train(model)):
        try:
            ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes)
        except Exception as exc:  # torch raises many types; the reason is what matters to the user
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            main = getattr(model, "main_input_name", None)
            hint = ("pass example inputs that the model accepts (example_inputs=dict of keyword arguments"
                    + (f", with its main input {main!r})" if main else ")"))
            if getattr(getattr(model, "config", None), "_experts_implementation", None) == "eager" \
                    and any(name.endswith("experts") for name, _ in model.named_modules()):
                # transformers' eager MoE loops over the experts a batch hits: a data-dependent loop
                hint = ("load the model with experts_implementation='batched_mm' (its eager mixture-of-experts "
                        "loop is data-dependent), or " + hint)
            config = getattr(model, "config", None)
            if (getattr(config, "layerdrop", 0) or 0) > 0 or (getattr(config, "apply_spec_augment", False)
                                                            and (getattr(config, "mask_time_prob", 0) or 0) > 0):
                # wav2vec2-like: a random number drawn in train mode decides which layers and frames run
                hint = ("load the model with layerdrop=0.0 and apply_spec_augment=False (LayerDrop and SpecAugment "
                        "draw random numbers in train mode that steer the model's Python code), or " + hint)
            raise CaptureError(
                f"could not capture {type(model).__name__} with torch.export: {type(exc).__name__}: {reason[:300]} "
                f"-- {hint}"
            ) from None
    gm = ep.module()
    # ep.module() refuses .train()/.eval(); a plain GraphModule over the same graph and the same
    # parameter objects (no weight is copied) behaves like any module, and set_train_mode switches it.
    gm = fx.GraphModule(gm, gm.graph, class_name=type(model).__name__ + "Graph")
    gm.training = was_training
    return gm


def _dims(value: Any) -> Any:
    """Dim 0 (batch) and dim 1 (sequence, for ids, masks and [batch, seq, hidden] floats) are dynamic.

    ``Dim.AUTO`` lets torch.export keep a dim static where the model fixes it (image channels,
    mel bins), instead of failing.
    """
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return None
    return {d: torch.export.Dim.AUTO for d in range(min(value.dim(), 2))}


def _is_constant(value: Any) -> bool:
    return not isinstance(value, torch.Tensor)


def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise CaptureError(f"example_inputs must be a dict, a tuple or a tensor, got {type(example_inputs).__name__}")


def _can_capture_in_train(model: nn.Module) -> bool:
    # Train-mode batch norm updates running stats; a flag flip cannot turn that graph into eval.
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@contextlib.contextmanager
def _train_mode(model: nn.Module, train: bool):
    was = model.training
    model.train(train if train else was)
    try:
        yield
    finally:
        model.train(was)


def _signature(model: nn.Module) -> Optional[inspect.Signature]:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


# -- Hugging Face example inputs ----------------------------------------------------------------

def _hf_constants(model: nn.Module) -> dict:
    params = _signature(model).parameters if _signature(model) else {}
    constants = {}
    if "use_cache" in params:
        constants["use_cache"] = False
    return constants


def synthesize_inputs(model: nn.Module, batch: int = _EXAMPLE_BATCH, seq: int = _EXAMPLE_SEQ) -> dict:
    """Example inputs for a Hugging Face model, read off its config and forward signature.

    By the model's main input: token ids [batch, seq] (multiple-choice heads: [batch, 2, seq]) with the
    attention mask and token types its forward takes; ``pixel_values`` [batch, channels, size, size];
    ``input_values`` (raw audio, wav2vec2 / HuBERT) long enough for ``seq`` frames after the feature
    encoder's convolutions; ``input_features`` as Whisper ([batch, mel, 2 * max_source_positions]) or
    Speech2Text ([batch, 4 * seq, features]) take them; encoder-decoders also get ``decoder_input_ids``.
    """
    config = getattr(model, "config", None)
    params = _signature(model).parameters if _signature(model) else {}
    main = getattr(model, "main_input_name", "input_ids")
    gen = torch.Generator().manual_seed(0)
    inputs: dict[str, torch.Tensor] = {}
    if main == "input_ids":
        vocab = _text_config_value(config, "vocab_size") or 2
        shape = (batch, 2, seq) if _is_multiple_choice(model) else (batch, seq)
        inputs["input_ids"] = torch.randint(0, int(vocab), shape, generator=gen)
        if "attention_mask" in params:
            inputs["attention_mask"] = torch.ones(shape, dtype=torch.long)
        if "token_type_ids" in params and (_text_config_value(config, "type_vocab_size") or 0) > 0:
            inputs["token_type_ids"] = torch.zeros(shape, dtype=torch.long)  # tokenizers return them
    elif main == "pixel_values":
        size = _as_pair(getattr(config, "image_size", 224))
        channels = getattr(config, "num_channels", 3)
        inputs["pixel_values"] = torch.randn(batch, channels, *size, generator=gen)
    elif main == "input_values":
        inputs["input_values"] = torch.randn(batch, _audio_samples(config, seq), generator=gen)
    elif main == "input_features" and getattr(config, "num_mel_bins", None):
        mel = config.num_mel_bins
        frames = 2 * getattr(config, "max_source_positions", 1500)
        inputs["input_features"] = torch.randn(batch, mel, frames, generator=gen)
    elif main == "input_features" and getattr(config, "input_feat_per_channel", None):
        features = config.input_feat_per_channel * getattr(config, "input_channels", 1)
        inputs["input_features"] = torch.randn(batch, 4 * seq, features, generator=gen)
        if "attention_mask" in params:
            inputs["attention_mask"] = torch.ones(batch, 4 * seq, dtype=torch.long)
    else:
        raise CaptureError(f"cannot synthesize example inputs for {type(model).__name__} (main input "
                           f"{main!r}); pass example_inputs=dict of keyword arguments")
    if "decoder_input_ids" in params and getattr(config, "is_encoder_decoder", False):
        vocab = _text_config_value(config, "vocab_size") or 2
        inputs["decoder_input_ids"] = torch.randint(0, int(vocab), (batch, seq), generator=gen)
    device = next((p.device for p in model.parameters()), None)
    if device is not None and device.type != "meta":      # capture where the model lives (cuda:N, ...)
        inputs = {k: v.to(device) for k, v in inputs.items()}
    return inputs


def _is_multiple_choice(model: nn.Module) -> bool:
    from graphpeft.engine.losses import head_kind

    return head_kind(type(model).__name__, getattr(model, "loss_type", None)) == "multiple_choice"


def _audio_samples(config: Any, frames: int) -> int:
    """Raw-audio length whose feature-encoder convolutions (kernel k, stride s each) give ``frames`` frames."""
    length = frames
    for kernel, stride in reversed(list(zip(getattr(config, "conv_kernel", ()), getattr(config, "conv_stride", ())))):
        length = (length - 1) * stride + kernel
    return length


def _text_config_value(config: Any, name: str) -> Any:
    if config is None:
        return None
    value = getattr(config, name, None)
    if value is None and hasattr(config, "get_text_config"):
        value = getattr(config.get_text_config(), name, None)
    return value


def _as_pair(value: Any) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value), int(value))


# -- torch.fx symbolic trace --------------------------------------------------------------------

class _OpLevelTracer(fx.Tracer):
    """Traces into every module, so nn.Linear becomes an F.linear op on a get_attr weight."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return False


def _symbolic_trace(model: nn.Module) -> fx.GraphModule:
    try:
        graph = _OpLevelTracer().trace(model)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(f"could not trace {type(model).__name__} with torch.fx: {reason[:300]} "
                           f"-- pass example inputs so graphpeft can use torch.export instead") from None
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__ + "Graph")
    gm.training = model.training
    gm.meta[CAPTURE_META] = CaptureInfo(
        mode="symbolic_trace",
        input_names=tuple(n.target for n in graph.nodes if n.op == "placeholder"),
        positional=sum(1 for n in graph.nodes if n.op == "placeholder"),
        signature=_signature(model),
        model_class=type(model).__name__,
    )
    set_train_mode(gm, model.training)
    return gm


# -- train / eval switch ------------------------------------------------------------------------

_TRAIN_P = "graphpeft.train_p"

def retarget_device(graph: fx.Graph, device: torch.device) -> int:
    """Device constants recorded at capture (``arange(..., device=cpu)``, ``to(mask, cpu)``) now name
    ``device``; returns how many nodes changed. The graph then runs where its weights were moved."""
    def swap(value: Any) -> Any:
        if isinstance(value, torch.device) and value != device:
            return device
        if isinstance(value, (list, tuple)):
            return type(value)(swap(v) for v in value)
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        return value

    changed = 0
    for node in graph.nodes:
        if node.op == "call_function":
            args, kwargs = swap(node.args), swap(node.kwargs)
            if args != node.args or kwargs != node.kwargs:
                node.args, node.kwargs = args, kwargs
                changed += 1
    return changed



def set_train_mode(gm: fx.GraphModule, train: bool) -> bool:
    """Switch dropout and SDPA attention dropout in a captured graph; returns True if it changed.

    before (train):  dropout(x, p, True)    sdpa(q, k, v, mask, p_attn)
    after  (eval):   dropout(x, p, False)   sdpa(q, k, v, mask, 0.0)    (p_attn kept in node.meta)
    """
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default):
            if len(node.args) >= 3 and bool(node.args[2]) != train:
                node.args = (node.args[0], node.args[1], train, *node.args[3:])
                changed = True
        elif node.target is torch.nn.functional.dropout:
            if node.kwargs.get("training", True) != train:
                node.kwargs = {**node.kwargs, "training": train}
                changed = True
        elif node.target is aten.scaled_dot_product_attention.default:
            changed |= _set_sdpa_dropout(node, train)
    if changed:
        gm.recompile()
    gm.training = train
    return changed


def _set_sdpa_dropout(node: fx.Node, train: bool) -> bool:
    args = list(node.args)
    current = args[4] if len(args) > 4 else node.kwargs.get("dropout_p", 0.0)
    train_p = node.meta.setdefault(_TRAIN_P, current)
    wanted = train_p if train else 0.0
    if current == wanted:
        return False
    if len(args) > 4:
        args[4] = wanted
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, "dropout_p": wanted}
    return True
