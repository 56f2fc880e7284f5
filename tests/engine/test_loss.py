"""The loss computed outside the graph equals the model's own transformers loss."""

import pytest
import torch

import graphpeft
from tests.models import tiny_bart, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bert_cls, tiny_t5, tiny_bart])
def test_loss_equals_the_models_own(build):
    model = build().eval()
    captured = graphpeft.CapturedModel(graphpeft.capture(model)).eval()
    ids = torch.randint(3, 50, (2, 7))
    if build is tiny_bert_cls:
        labels = torch.tensor([0, 1])
    else:
        labels = torch.randint(3, 50, (2, 5) if build in (tiny_t5, tiny_bart) else (2, 7))
        labels[0, -2:] = -100
    with torch.no_grad():
        ours = captured(input_ids=ids, labels=labels)     # encoder-decoder: decoder inputs come from labels
        ref = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(ours.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.logits, ref.logits, rtol=1e-5, atol=1e-6)
