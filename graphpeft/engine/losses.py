"""The loss a model's own transformers class computes, from the captured graph's outputs.

The graph is captured without targets (labels change from batch to batch and the loss is cheap), so
the loss is added after the graph runs, as the model's ``forward`` adds it. Which loss is read off
the model's class name in transformers' auto mappings (a class in several: the first kind below):

    kind              mapping (MODEL_FOR_..._MAPPING_NAMES)     targets                       loss
    seq2seq           SEQ_TO_SEQ_CAUSAL_LM, SPEECH_SEQ_2_SEQ    labels [B, T]                 CE(logits, labels), no shift
    causal            CAUSAL_LM                                 labels [B, L]                 CE(logits[:, :-1], labels[:, 1:])
    masked            MASKED_LM                                 labels [B, L]                 CE(logits, labels)
    sequence          SEQUENCE_CLASSIFICATION, IMAGE_, VIDEO_   labels [B] or [B, C]          by config.problem_type:
                                                                                              MSE / CE / BCE-with-logits
    audio             AUDIO_CLASSIFICATION                      labels [B]                    CE(logits, labels)
    token             TOKEN_CLASSIFICATION                      labels [B, L]                 CE(logits, labels)
    question          QUESTION_ANSWERING                        start_positions, end_positions  (CE(start) + CE(end)) / 2,
                                                                                              positions >= L ignored
    multiple_choice   MULTIPLE_CHOICE                           labels [B]                    CE(logits [B, choices], labels)
    ctc               CTC                                       labels [B, S], -100 padded    CTC(log_softmax(logits) [F, B, V],
                                                                                              labels >= 0, frames from
                                                                                              attention_mask, blank = pad)

CE ignores label -100. Where the class's ``forward`` calls ``self.loss_function``, that function
(transformers' ``LOSS_MAPPING[model.loss_type]``) is called, with the loss options Trainer passes
(``num_items_in_batch``); elsewhere the formula the class writes out. A class none of the mappings
name (a subclass of one's own) falls back on its ``loss_type``.

Tokens a pass prepended inside the graph (virtual tokens) make sequence outputs longer than the
input: those positions are never targets (labels there are -100), and question-answering positions
move by the number of prepended tokens, so they still point at the same input token.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Optional

import torch
from torch import nn

from graphpeft.engine.errors import GraphPeftError

TARGETS = ("labels", "start_positions", "end_positions")     # inputs that only the loss reads

_KINDS = (
    ("seq2seq", ("SEQ_TO_SEQ_CAUSAL_LM", "SPEECH_SEQ_2_SEQ")),
    ("causal", ("CAUSAL_LM",)),
    ("masked", ("MASKED_LM",)),
    ("sequence", ("SEQUENCE_CLASSIFICATION", "IMAGE_CLASSIFICATION", "VIDEO_CLASSIFICATION")),
    ("audio", ("AUDIO_CLASSIFICATION",)),
    ("token", ("TOKEN_CLASSIFICATION",)),
    ("question", ("QUESTION_ANSWERING",)),
    ("multiple_choice", ("MULTIPLE_CHOICE",)),
    ("ctc", ("CTC",)),
)
# a class no mapping names: its loss_type (transformers reads it off the class name)
_BY_LOSS_TYPE = {
    "ForCausalLM": "causal", "ForMaskedLM": "masked", "ForSequenceClassification": "sequence",
    "ForImageClassification": "sequence", "ForVideoClassification": "sequence", "ForAudioClassification": "sequence",
    "ForTokenClassification": "token", "ForQuestionAnswering": "question", "ForCTC": "ctc",
}
_TOKEN_LEVEL = ("seq2seq", "causal", "masked", "token")     # labels laid out like the sequence


@functools.lru_cache(maxsize=None)
def _class_kinds() -> dict[str, str]:
    from transformers.models.auto import modeling_auto

    kinds: dict[str, str] = {}
    for kind, mappings in _KINDS:
        for mapping in mappings:
            for names in getattr(modeling_auto, f"MODEL_FOR_{mapping}_MAPPING_NAMES", {}).values():
                for name in (names,) if isinstance(names, str) else names:
                    kinds.setdefault(name, kind)
    return kinds


def head_kind(model_class: str, loss_type: Optional[str], is_encoder_decoder: bool = False) -> Optional[str]:
    """Which loss the class computes (a kind of the table above), or None when it has none graphpeft knows."""
    kind = _class_kinds().get(model_class)
    if kind is None and loss_type == "ForConditionalGeneration":
        kind = "seq2seq" if is_encoder_decoder else "causal"
    return kind or _BY_LOSS_TYPE.get(loss_type or "")


@functools.lru_cache(maxsize=None)
def _calls_loss_function(model_class: str) -> bool:
    """Whether the transformers class's forward computes its loss with ``self.loss_function``."""
    import transformers

    try:
        return "self.loss_function" in inspect.getsource(getattr(transformers, model_class).forward)
    except (AttributeError, OSError, TypeError, ImportError):
        return False


def is_encoder_decoder(info: Any) -> bool:
    return bool(getattr(info.hf_config, "is_encoder_decoder", False))


def decoder_inputs_from_labels(labels: torch.Tensor, info: Any) -> torch.Tensor:
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


def check_targets(targets: dict, info: Any) -> None:
    """Targets were given: the model must have a loss graphpeft knows, and all of its targets."""
    kind = head_kind(info.model_class, info.loss_type, is_encoder_decoder(info))
    if kind is None:
        raise GraphPeftError(f"{', '.join(targets)} were given, but graphpeft knows no loss for {info.model_class}; "
                             f"call without them and compute the loss from the outputs")
    wanted = ("start_positions", "end_positions") if kind == "question" else ("labels",)
    if set(targets) != set(wanted):
        raise GraphPeftError(f"{info.model_class} computes its loss from {' and '.join(wanted)}; "
                             f"got {', '.join(sorted(targets))}")


def with_loss(out: Any, targets: dict, info: Any, input_length: Optional[int], loss_kwargs: Optional[dict] = None,
              inputs: Optional[dict] = None) -> Any:
    """``out`` with ``.loss`` as the model's own class computes it from these outputs and targets.

    ``input_length``: the sequence length of the main input as given (before any prepended tokens);
    ``inputs``: the inputs the graph ran on (a CTC loss counts each clip's frames from its attention mask).
    ``loss_kwargs`` (``num_items_in_batch`` from Trainer) reach the loss where the class passes its
    ``**kwargs`` to ``self.loss_function``. The caller has checked the targets (``check_targets``) before
    running the graph.
    """
    kind = head_kind(info.model_class, info.loss_type, is_encoder_decoder(info))
    fn = _mapped_loss(info, kind)
    kw = dict(loss_kwargs or {}) if fn is not None else {}
    if kind == "question":
        start_logits, end_logits = (out["start_logits"], out["end_logits"]) if isinstance(out, dict) else out[:2]
        shift = start_logits.shape[1] - input_length if input_length is not None else 0
        start, end = (targets[k] if shift <= 0 else targets[k] + shift for k in ("start_positions", "end_positions"))
        from transformers.loss.loss_utils import ForQuestionAnsweringLoss
        return _replace_loss(out, (fn or ForQuestionAnsweringLoss)(start_logits, end_logits, start, end, **kw))
    logits = out["logits"] if isinstance(out, dict) else out[0]
    labels = targets["labels"].to(logits.device)
    if kind == "ctc":
        return _replace_loss(out, ctc_loss(logits, labels, info, inputs or {}))
    if kind in _TOKEN_LEVEL:
        labels = _pad_prepended(labels, logits)
    return _replace_loss(out, _loss(kind, fn, logits, labels, info.hf_config, kw))


def _loss(kind: str, fn: Any, logits: torch.Tensor, labels: torch.Tensor, config: Any, kw: dict) -> torch.Tensor:
    ce = nn.functional.cross_entropy
    if kind in ("seq2seq", "causal", "masked"):
        if fn is not None:
            return fn(logits=logits, labels=labels, vocab_size=logits.shape[-1], **kw)
        return ce(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)   # no shift
    if kind == "sequence":
        from transformers.loss.loss_utils import ForSequenceClassificationLoss
        return (fn or ForSequenceClassificationLoss)(labels, logits, config, **kw)
    if kind == "token" and fn is not None:
        return fn(logits, labels, config, **kw)
    if kind == "audio" and fn is not None:           # AST: the sequence-classification loss
        return fn(labels, logits, config, **kw)
    if kind in ("audio", "token"):
        return ce(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    if kind == "multiple_choice":
        return ce(logits, labels)
    raise GraphPeftError(f"no loss for head kind {kind!r}")     # pragma: no cover - every kind is handled above


def ctc_loss(logits: torch.Tensor, labels: torch.Tensor, info: Any, inputs: dict) -> torch.Tensor:
    """The CTC loss of transformers' ``*ForCTC`` heads (wav2vec2, HuBERT, ...), as their ``forward`` writes it.

    Each clip's frame count is the class's own ``_get_feat_extract_output_lengths`` of its attention mask's
    sum (all samples when there is no mask); targets are the labels >= 0; the blank is ``pad_token_id``.
    """
    import transformers

    config = info.hf_config
    if int(labels.max()) >= config.vocab_size:
        raise GraphPeftError(f"labels go up to {int(labels.max())}, but {info.model_class} has vocab_size "
                             f"{config.vocab_size}; CTC labels must be token ids below it (-100 for padding)")
    main = inputs.get(info.main_input_name)
    mask = inputs.get("attention_mask")
    mask = mask if mask is not None else torch.ones(main.shape[:2], dtype=torch.long, device=main.device)
    owner = type("_Config", (), {"config": config})()       # the method reads only self.config
    lengths = getattr(transformers, info.model_class)._get_feat_extract_output_lengths(owner, mask.sum(-1))
    valid = labels >= 0
    log_probs = nn.functional.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
    with torch.backends.cudnn.flags(enabled=False):
        return nn.functional.ctc_loss(log_probs, labels.masked_select(valid), lengths.to(torch.long), valid.sum(-1),
                                      blank=config.pad_token_id, reduction=config.ctc_loss_reduction,
                                      zero_infinity=config.ctc_zero_infinity)


def _mapped_loss(info: Any, kind: str) -> Any:
    """transformers' ``LOSS_MAPPING`` function where the class calls ``self.loss_function``, else None.

    Causal LMs all do (their loss is ``ForCausalLM``, transformers' fallback too). A class no mapping
    names is taken to use its ``loss_type``'s function, except an encoder-decoder (targets not shifted).
    """
    from transformers.loss.loss_utils import LOSS_MAPPING

    if kind == "causal":
        return LOSS_MAPPING["ForCausalLM"]
    if info.model_class in _class_kinds():
        return LOSS_MAPPING.get(info.loss_type or "", LOSS_MAPPING["ForCausalLM"]) if _calls_loss_function(info.model_class) else None
    return None if kind == "seq2seq" else LOSS_MAPPING.get(info.loss_type or "")


def _pad_prepended(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Labels for positions prepended inside the graph (virtual tokens): -100, never predicted."""
    if logits.dim() >= 3 and labels.dim() == 2 and logits.shape[1] > labels.shape[1]:
        pad = labels.new_full((labels.shape[0], logits.shape[1] - labels.shape[1]), -100)
        labels = torch.cat([pad, labels], dim=1)
    return labels


def _replace_loss(out: Any, loss: torch.Tensor) -> Any:
    if isinstance(out, dict):
        return type(out)(loss=loss, **{k: v for k, v in out.items() if k != "loss"})
    return (loss, *out)
