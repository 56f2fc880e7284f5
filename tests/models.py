"""Tiny, seeded models for graphpeft's tests (engine tests and oracle tests alike).

Every builder returns a freshly initialised model in eval mode, built from a transformers config
(hidden size 32, 2 layers, 4 heads, vocabulary 100) with ``torch.manual_seed(seed)`` so that two
calls with the same arguments give bit-identical weights. Nothing is downloaded.

    from tests.models import tiny_llama, inputs_for
    model = tiny_llama()
    batch = inputs_for(model, batch=3, seq=5)      # kwargs for model(**batch)

Keyword arguments of a builder are passed to its transformers config (e.g.
``tiny_bert_cls(attn_implementation="eager", hidden_dropout_prob=0.0)``); ``seed`` sets the seed.
``BUILDERS`` maps a short architecture name to its builder, for parametrised tests.

``EinsumModel`` is a custom module whose projection is a bare ``nn.Parameter`` used in
``torch.einsum`` (the case PEFT reaches with ``target_parameters``); ``MLP`` is a plain two-layer
network of nn.Linear modules.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

VOCAB = 100
HIDDEN = 32
LAYERS = 2
HEADS = 4
FFN = 64
MAX_POS = 64
IMAGE = 16          # ViT image side (patch 4 -> 16 patches)
MEL_BINS = 8        # Whisper mel bins
MEL_FRAMES = 32     # Whisper input frames (= 2 * max_source_positions)


def _build(config_cls: type, model_cls: type, seed: int, defaults: dict, overrides: dict) -> nn.Module:
    attn = overrides.pop("attn_implementation", None)
    config = config_cls(**{**defaults, **overrides})
    if attn is not None:
        config._attn_implementation = attn
    torch.manual_seed(seed)
    model = model_cls(config)
    return model.eval()


def _decoder_defaults() -> dict:
    return dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                intermediate_size=FFN, vocab_size=VOCAB, max_position_embeddings=MAX_POS,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _bert_defaults() -> dict:
    return dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
                vocab_size=VOCAB, max_position_embeddings=MAX_POS, pad_token_id=0)


def tiny_llama(seed: int = 0, **config: Any) -> nn.Module:
    """LlamaForCausalLM (q/k/v/o_proj, gate/up/down_proj, untied lm_head)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    return _build(LlamaConfig, LlamaForCausalLM, seed, _decoder_defaults(), config)


def tiny_qwen2(seed: int = 0, **config: Any) -> nn.Module:
    """Qwen2ForCausalLM with grouped-query attention (2 key/value heads; q/k/v have biases)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return _build(Qwen2Config, Qwen2ForCausalLM, seed, {**_decoder_defaults(), "num_key_value_heads": 2}, config)


def tiny_mixtral(seed: int = 0, **config: Any) -> nn.Module:
    """MixtralForCausalLM, 4 experts (top 2) stored as 3-D parameters (``mlp.experts.gate_up_proj`` [4, 2*24, 32],
    ``mlp.experts.down_proj`` [4, 32, 24]) and run by transformers' batched_mm experts implementation, which
    torch.export captures (the default eager loop over the experts hit is data-dependent)."""
    from transformers import MixtralConfig, MixtralForCausalLM
    defaults = {**_decoder_defaults(), "intermediate_size": 24, "num_key_value_heads": 2, "num_local_experts": 4,
                "num_experts_per_tok": 2}
    impl = config.pop("experts_implementation", "batched_mm")
    cfg = MixtralConfig(**{**defaults, **config})
    cfg._experts_implementation = impl
    torch.manual_seed(seed)
    return MixtralForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, **config: Any) -> nn.Module:
    """GPT2LMHeadModel: Conv1D projections (addmm, weight [in, out]), lm_head tied to transformer.wte."""
    from transformers import GPT2Config, GPT2LMHeadModel
    defaults = dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, vocab_size=VOCAB, n_positions=MAX_POS,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _build(GPT2Config, GPT2LMHeadModel, seed, defaults, config)


def tiny_bert_cls(seed: int = 0, num_labels: int = 2, **config: Any) -> nn.Module:
    """BertForSequenceClassification; dropout 0.1 on hidden states and attention (the config defaults)."""
    from transformers import BertConfig, BertForSequenceClassification
    return _build(BertConfig, BertForSequenceClassification, seed, {**_bert_defaults(), "num_labels": num_labels}, config)


def tiny_bert(seed: int = 0, **config: Any) -> nn.Module:
    """BertModel (no head)."""
    from transformers import BertConfig, BertModel
    return _build(BertConfig, BertModel, seed, _bert_defaults(), config)


def tiny_roberta_cls(seed: int = 0, num_labels: int = 2, **config: Any) -> nn.Module:
    """RobertaForSequenceClassification (classifier.dense + classifier.out_proj head)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification
    defaults = {**_bert_defaults(), "max_position_embeddings": MAX_POS + 2, "pad_token_id": 1, "num_labels": num_labels}
    return _build(RobertaConfig, RobertaForSequenceClassification, seed, defaults, config)


def tiny_distilbert(seed: int = 0, num_labels: int = 2, **config: Any) -> nn.Module:
    """DistilBertForSequenceClassification (q_lin/k_lin/v_lin/out_lin; pre_classifier + classifier)."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification
    defaults = dict(dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN, vocab_size=VOCAB,
                    max_position_embeddings=MAX_POS, pad_token_id=0, num_labels=num_labels)
    return _build(DistilBertConfig, DistilBertForSequenceClassification, seed, defaults, config)


def tiny_vit(seed: int = 0, num_labels: int = 3, **config: Any) -> nn.Module:
    """ViTForImageClassification on 3 x 16 x 16 images, patch 4 (17 tokens with CLS)."""
    from transformers import ViTConfig, ViTForImageClassification
    defaults = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
                    image_size=IMAGE, patch_size=4, num_channels=3, num_labels=num_labels)
    return _build(ViTConfig, ViTForImageClassification, seed, defaults, config)


def tiny_whisper(seed: int = 0, **config: Any) -> nn.Module:
    """WhisperForConditionalGeneration: encoder self-attention, decoder self- and cross-attention."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    defaults = dict(d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=HEADS,
                    decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, vocab_size=VOCAB,
                    num_mel_bins=MEL_BINS, max_source_positions=MEL_FRAMES // 2, max_target_positions=MAX_POS,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    return _build(WhisperConfig, WhisperForConditionalGeneration, seed, defaults, config)


def tiny_t5(seed: int = 0, **config: Any) -> nn.Module:
    """T5ForConditionalGeneration (q/k/v/o, wi/wo; relative position bias)."""
    from transformers import T5Config, T5ForConditionalGeneration
    defaults = dict(d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=FFN, num_layers=LAYERS, num_heads=HEADS,
                    vocab_size=VOCAB, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return _build(T5Config, T5ForConditionalGeneration, seed, defaults, config)


def tiny_bart(seed: int = 0, **config: Any) -> nn.Module:
    """BartForConditionalGeneration (q/k/v/out_proj, fc1/fc2; lm_head tied to the shared embedding)."""
    from transformers import BartConfig, BartForConditionalGeneration
    defaults = dict(d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=HEADS,
                    decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, vocab_size=VOCAB,
                    max_position_embeddings=MAX_POS, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                    decoder_start_token_id=2, forced_eos_token_id=2)
    return _build(BartConfig, BartForConditionalGeneration, seed, defaults, config)


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2, "bert": tiny_bert_cls, "roberta": tiny_roberta_cls,
    "distilbert": tiny_distilbert, "vit": tiny_vit, "whisper": tiny_whisper, "t5": tiny_t5, "bart": tiny_bart,
}


def perturb_adapters(model: nn.Module, seed: int, scale: float) -> nn.Module:
    """Move every trainable parameter far from its init (adds seeded noise * ``scale``, in name order), in place:
    an adapter that really changes the outputs, as a trained one would. Returns ``model``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def inputs_for(model: nn.Module, batch: int = 2, seq: int = 8, seed: int = 0, pad: int = 0) -> dict[str, torch.Tensor]:
    """Keyword inputs for ``model(**inputs)``, of the given batch and sequence length, seeded.

    Text models get input_ids + attention_mask (the last ``pad`` positions of row 0 masked out);
    encoder-decoders also get decoder_input_ids of length ``seq + 1`` (a different length on purpose);
    ViT gets pixel_values (``seq`` is unused); Whisper gets input_features of the fixed frame count
    its positional table allows and decoder_input_ids of length ``seq``.
    """
    gen = torch.Generator().manual_seed(seed)
    main = getattr(model, "main_input_name", "input_ids")
    config = getattr(model, "config", None)
    if main == "pixel_values":
        return {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=gen)}
    if main == "input_features":
        return {"input_features": torch.randn(batch, MEL_BINS, MEL_FRAMES, generator=gen),
                "decoder_input_ids": torch.randint(3, VOCAB, (batch, seq), generator=gen)}
    out = {"input_ids": torch.randint(3, VOCAB, (batch, seq), generator=gen),
           "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    if pad:
        out["attention_mask"][0, seq - pad:] = 0
    if getattr(config, "is_encoder_decoder", False):
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, seq + 1), generator=gen)
    return out


class EinsumModel(nn.Module):
    """A custom layer whose projection is a bare parameter in ``torch.einsum`` (no nn.Linear).

        x [batch, seq, 16] -> einsum("bsi,oi->bso", x, mix.weight [16, 16]) -> relu -> head (nn.Linear 16 -> 4)

    ``mix`` is a module holding one parameter ``weight``: PEFT reaches it with
    ``target_parameters=["mix.weight"]``; graphpeft also with ``target_modules=["mix"]`` or ``["mix.weight"]``.
    """

    class Mix(nn.Module):
        def __init__(self, dim: int):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(dim, dim) / dim ** 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.einsum("bsi,oi->bso", x, self.weight)

    def __init__(self, dim: int = 16, out: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.mix = EinsumModel.Mix(dim)
        self.head = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(x)))

    @staticmethod
    def example(batch: int = 2, seq: int = 5, dim: int = 16, seed: int = 0) -> torch.Tensor:
        return torch.randn(batch, seq, dim, generator=torch.Generator().manual_seed(seed))


class MLP(nn.Module):
    """Plain two-layer network of nn.Linear modules (``fc1``, ``fc2``), for symbolic_trace tests."""

    def __init__(self, dim: int = 16, hidden: int = 32, out: int = 4, dropout: float = 0.0, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(dim, hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


class TinySdpaLM(nn.Module):
    """A small custom causal LM that is no Hugging Face model: token + learned position embeddings,
    pre-norm blocks whose attention is ``F.scaled_dot_product_attention`` with a causal-and-padding
    boolean mask, no cache and no ``past_key_values`` argument, and a linear LM head.

        forward(input_ids [B, L], attention_mask [B, L] = None) -> logits [B, L, vocab]

    Capture it with ``example_inputs=TinySdpaLM.example()``. ``embed`` is the token embedding.
    """

    class Block(nn.Module):
        def __init__(self, dim: int, heads: int):
            super().__init__()
            self.heads = heads
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

        def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            b, n, d = h.shape
            q, k, v = self.qkv(self.norm1(h)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            att = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            h = h + self.proj(att.transpose(1, 2).reshape(b, n, d))
            return h + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(h))))

    def __init__(self, vocab: int = VOCAB, dim: int = HIDDEN, heads: int = HEADS, layers: int = LAYERS,
                 max_pos: int = MAX_POS, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_pos, dim)
        self.blocks = nn.ModuleList(TinySdpaLM.Block(dim, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)
        self.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor = None) -> torch.Tensor:
        n = input_ids.shape[1]
        h = self.embed(input_ids) + self.pos(torch.arange(n, device=input_ids.device))
        mask = torch.ones(n, n, dtype=torch.bool, device=input_ids.device).tril()[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :].bool()
        for block in self.blocks:
            h = block(h, mask)
        return self.head(self.norm(h))

    @staticmethod
    def example(batch: int = 2, seq: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.randint(3, VOCAB, (batch, seq), generator=gen),
                "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


WORDS = ("the a cat dog bird sat ran flew on under over mat tree house car fast slow big small red blue green "
         "is was and or not good bad happy sad very quite").split()


def tiny_tokenizer() -> Any:
    """A word-level fast tokenizer over ``WORDS`` (ids below ``VOCAB``): <pad>=0, <s>=1, </s>=2, <unk>=3.

    Built with ``tokenizers``, nothing downloaded; it fits the tiny decoder models' vocabulary.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def sentences(n: int, seed: int = 0, shortest: int = 3, longest: int = 9) -> list[str]:
    """``n`` seeded random sentences over ``WORDS`` (for tokenizer-driven tests)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(shortest, longest + 1, (1,), generator=gen))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=gen)))
    return out
