"""Tiny, seeded models of many architectures and task heads, for the loss tests and the method grid.

Every builder returns a freshly initialised model in eval mode, built from its transformers config with
tiny dimensions (hidden 32, 2 layers, 4 heads, vocabulary 100, as in ``tests.models``, whose builders
are reused) after ``torch.manual_seed(seed)``; keyword arguments go to the config. Nothing is downloaded.

    GRID_14      the 14 architectures of issue 14's grid
    GRID_MORE    more, across kinds: decoder-only dense and mixture-of-experts, encoder-only,
                 encoder-decoder, vision and speech
    ARCHS        name -> builder, both together
    HEADS        one builder per task head (token / question answering / multiple choice / masked LM ...)

``batch_for(model)`` gives seeded inputs, ``targets_for(model, batch)`` the targets its head's loss takes.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from tests import models as M
from tests.models import FFN, HEADS as NHEADS, HIDDEN, IMAGE, LAYERS, MAX_POS, VOCAB

AUDIO_FRAMES = 8


def _make(config_name: str, model_name: str, defaults: dict, seed: int, overrides: dict) -> nn.Module:
    import transformers

    attn = overrides.pop("attn_implementation", None)
    experts = overrides.pop("experts_implementation", None)
    config = getattr(transformers, config_name)(**{**defaults, **overrides})
    if attn is not None:
        config._attn_implementation = attn
    if experts is not None:
        config._experts_implementation = experts
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


def _builder(config_name: str, model_name: str, defaults: dict, doc: str) -> Callable[..., nn.Module]:
    def build(seed: int = 0, **config: Any) -> nn.Module:
        return _make(config_name, model_name, dict(defaults), seed, config)
    build.__doc__ = f"{model_name}: {doc}"
    build.__name__ = f"tiny_{model_name}"
    return build


_DEC = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=NHEADS, num_key_value_heads=NHEADS,
            intermediate_size=FFN, vocab_size=VOCAB, max_position_embeddings=MAX_POS, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
_ENC = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=NHEADS, intermediate_size=FFN,
            vocab_size=VOCAB, max_position_embeddings=MAX_POS, pad_token_id=0, num_labels=2)
_S2S = dict(d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=NHEADS,
            decoder_attention_heads=NHEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, vocab_size=VOCAB,
            max_position_embeddings=MAX_POS, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
_VISION = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=NHEADS, intermediate_size=FFN,
               image_size=IMAGE, patch_size=4, num_channels=3, num_labels=3)
_AUDIO = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=NHEADS, intermediate_size=FFN,
              conv_dim=(16, 16), conv_kernel=(4, 2), conv_stride=(4, 2), num_conv_pos_embeddings=4,
              num_conv_pos_embedding_groups=2, num_labels=3, vocab_size=VOCAB, classifier_proj_size=16,
              apply_spec_augment=False, layerdrop=0.0)   # both draw random numbers that steer Python code in train mode

tiny_mistral = _builder("MistralConfig", "MistralForCausalLM", {**_DEC, "num_key_value_heads": 2},
                        "grouped-query attention, sliding-window config")
tiny_gpt_neox = _builder("GPTNeoXConfig", "GPTNeoXForCausalLM", {**_DEC, "rotary_pct": 0.5},
                         "fused query_key_value, partial rotary")
tiny_opt = _builder("OPTConfig", "OPTForCausalLM", dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, ffn_dim=FFN,
                    num_attention_heads=NHEADS, vocab_size=VOCAB, max_position_embeddings=MAX_POS,
                    word_embed_proj_dim=HIDDEN, pad_token_id=1, bos_token_id=2, eos_token_id=2),
                    "learned positions with offset 2, fc1/fc2")
tiny_phi = _builder("PhiConfig", "PhiForCausalLM", {**_DEC, "partial_rotary_factor": 0.5}, "dense, parallel attention + MLP")
tiny_gemma2 = _builder("Gemma2Config", "Gemma2ForCausalLM", {**_DEC, "head_dim": HIDDEN // NHEADS, "num_key_value_heads": 2},
                       "soft-capped attention and logits, sliding-window layers")
tiny_falcon = _builder("FalconConfig", "FalconForCausalLM", dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                       num_attention_heads=NHEADS, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2),
                       "multi-query fused query_key_value, parallel attention")
tiny_bloom = _builder("BloomConfig", "BloomForCausalLM", dict(hidden_size=HIDDEN, n_layer=LAYERS, n_head=NHEADS,
                      vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2), "ALiBi attention bias")
tiny_qwen2_moe = _builder("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {**_DEC, "num_key_value_heads": 2,
                          "moe_intermediate_size": 24, "shared_expert_intermediate_size": 32, "num_experts": 4,
                          "num_experts_per_tok": 2, "experts_implementation": "batched_mm"},
                          "mixture of experts (batched_mm) with a shared expert")
tiny_electra = _builder("ElectraConfig", "ElectraForSequenceClassification", {**_ENC, "embedding_size": 16},
                        "embeddings projected 16 -> 32")
tiny_deberta_v2 = _builder("DebertaV2Config", "DebertaV2ForSequenceClassification",
                           {**_ENC, "relative_attention": True, "pos_att_type": ["p2c", "c2p"], "max_relative_positions": 16},
                           "disentangled relative attention")
tiny_albert = _builder("AlbertConfig", "AlbertForSequenceClassification", {**_ENC, "embedding_size": 16},
                       "one shared layer, factorised embeddings")
tiny_xlm_roberta = _builder("XLMRobertaConfig", "XLMRobertaForSequenceClassification",
                            {**_ENC, "max_position_embeddings": MAX_POS + 2, "pad_token_id": 1}, "RoBERTa layout")
tiny_mt5 = _builder("MT5Config", "MT5ForConditionalGeneration", dict(d_model=HIDDEN, d_kv=HIDDEN // NHEADS, d_ff=FFN,
                    num_layers=LAYERS, num_heads=NHEADS, vocab_size=VOCAB, pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0), "gated-GELU T5, untied head")
tiny_pegasus = _builder("PegasusConfig", "PegasusForConditionalGeneration", {**_S2S, "pad_token_id": 0,
                        "decoder_start_token_id": 0}, "sinusoidal positions, pre-norm")
tiny_marian = _builder("MarianConfig", "MarianMTModel", {**_S2S, "pad_token_id": 0, "decoder_start_token_id": 0,
                       "decoder_vocab_size": VOCAB}, "sinusoidal positions, post-norm")
tiny_deit = _builder("DeiTConfig", "DeiTForImageClassification", _VISION, "class token + distillation token")
tiny_swin = _builder("SwinConfig", "SwinForImageClassification", dict(image_size=IMAGE, patch_size=2, num_channels=3,
                     embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4, num_labels=3,
                     drop_path_rate=0.0),   # stochastic depth's draw stays in a captured graph in eval mode
                     "shifted windows, patch merging")
tiny_wav2vec2 = _builder("Wav2Vec2Config", "Wav2Vec2ForSequenceClassification", _AUDIO,
                         "raw audio, convolutional feature encoder")
tiny_hubert = _builder("HubertConfig", "HubertForSequenceClassification", _AUDIO, "raw audio, wav2vec2 layout")
tiny_wav2vec2_ctc = _builder("Wav2Vec2Config", "Wav2Vec2ForCTC", _AUDIO, "raw audio, CTC head over the frames")
tiny_speech_to_text = _builder("Speech2TextConfig", "Speech2TextForConditionalGeneration", dict(
    d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=NHEADS,
    decoder_attention_heads=NHEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, vocab_size=VOCAB,
    max_source_positions=MAX_POS, max_target_positions=MAX_POS, input_feat_per_channel=8, input_channels=1,
    conv_channels=16, num_conv_layers=2, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2),
    "filter-bank features through two strided convolutions")

# task heads beyond the grid's (the loss tests)
tiny_bert_token = _builder("BertConfig", "BertForTokenClassification", {**_ENC, "num_labels": 5}, "token classification")
tiny_bert_qa = _builder("BertConfig", "BertForQuestionAnswering", _ENC, "start/end logits")
tiny_bert_choice = _builder("BertConfig", "BertForMultipleChoice", _ENC, "input_ids [batch, choices, seq]")
tiny_bert_mlm = _builder("BertConfig", "BertForMaskedLM", _ENC, "masked LM, head tied to the word embeddings")
tiny_llama_token = _builder("LlamaConfig", "LlamaForTokenClassification", {**_DEC, "num_labels": 5},
                            "token classification through self.loss_function")
tiny_llama_qa = _builder("LlamaConfig", "LlamaForQuestionAnswering", _DEC, "question answering through self.loss_function")
tiny_llama_cls = _builder("LlamaConfig", "LlamaForSequenceClassification", {**_DEC, "num_labels": 3},
                          "last-token pooling, self.loss_function")

GRID_14: dict[str, Callable[..., nn.Module]] = {
    "llama": M.tiny_llama, "mistral": tiny_mistral, "qwen2": M.tiny_qwen2, "gpt2": M.tiny_gpt2, "gpt_neox": tiny_gpt_neox,
    "opt": tiny_opt, "phi": tiny_phi, "bert": M.tiny_bert_cls, "roberta": M.tiny_roberta_cls,
    "distilbert": M.tiny_distilbert, "t5": M.tiny_t5, "bart": M.tiny_bart, "vit": M.tiny_vit, "whisper": M.tiny_whisper,
}
GRID_MORE: dict[str, Callable[..., nn.Module]] = {
    "gemma2": tiny_gemma2, "falcon": tiny_falcon, "bloom": tiny_bloom, "mixtral": M.tiny_mixtral,
    "qwen2_moe": tiny_qwen2_moe, "electra": tiny_electra, "deberta_v2": tiny_deberta_v2, "albert": tiny_albert,
    "xlm_roberta": tiny_xlm_roberta, "mt5": tiny_mt5, "pegasus": tiny_pegasus, "marian": tiny_marian,
    "deit": tiny_deit, "swin": tiny_swin, "wav2vec2": tiny_wav2vec2, "hubert": tiny_hubert,
    "speech_to_text": tiny_speech_to_text,
}
ARCHS = {**GRID_14, **GRID_MORE}
HEADS = {"bert_token": tiny_bert_token, "bert_qa": tiny_bert_qa, "bert_choice": tiny_bert_choice,
         "bert_mlm": tiny_bert_mlm, "llama_token": tiny_llama_token, "llama_qa": tiny_llama_qa,
         "llama_cls": tiny_llama_cls}


def head_kind(model: nn.Module) -> str:
    from graphpeft.engine.losses import head_kind as kind

    return kind(type(model).__name__, getattr(model, "loss_type", None),
                bool(getattr(model.config, "is_encoder_decoder", False)))


def batch_for(model: nn.Module, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded inputs of the shapes ``graphpeft.synthesize_inputs`` gives, token ids in [3, 100)."""
    import graphpeft

    gen = torch.Generator().manual_seed(seed)
    out = graphpeft.synthesize_inputs(model, batch, seq)
    for name, value in out.items():
        if name.endswith("input_ids"):
            out[name] = torch.randint(3, VOCAB, value.shape, generator=gen)
        elif value.is_floating_point():
            out[name] = torch.randn(value.shape, generator=gen)
    return out


def targets_for(model: nn.Module, batch: dict, seed: int = 1) -> dict[str, torch.Tensor]:
    """The targets the model's head takes, seeded: labels (ids, classes, floats) or start/end positions."""
    gen = torch.Generator().manual_seed(seed)
    kind, config = head_kind(model), model.config
    n = int(batch["input_ids"].shape[-1]) if "input_ids" in batch else None
    b = next(iter(batch.values())).shape[0]
    if kind == "causal":
        return {"labels": batch["input_ids"].clone()}
    if kind in ("seq2seq", "masked"):
        length = batch["decoder_input_ids"].shape[1] if kind == "seq2seq" else n
        labels = torch.randint(3, VOCAB, (b, length), generator=gen)
        labels[0, -2:] = -100
        return {"labels": labels}
    if kind == "token":
        labels = torch.randint(0, config.num_labels, (b, n), generator=gen)
        labels[0, -2:] = -100
        return {"labels": labels}
    if kind == "question":
        return {"start_positions": torch.tensor([1, n + 3])[:b], "end_positions": torch.tensor([3, 5])[:b]}
    if kind == "multiple_choice":
        return {"labels": torch.randint(0, batch["input_ids"].shape[1], (b,), generator=gen)}
    if kind == "ctc":       # transcripts shorter than the clips' frames, -100 padded
        labels = torch.randint(1, config.vocab_size, (b, 3), generator=gen)
        labels[0, -1] = -100
        return {"labels": labels}
    if config.problem_type == "regression" or config.num_labels == 1:
        return {"labels": torch.randn(b, generator=gen)}
    if config.problem_type == "multi_label_classification":
        return {"labels": torch.randint(0, 2, (b, config.num_labels), generator=gen).float()}
    return {"labels": torch.randint(0, config.num_labels, (b,), generator=gen)}
