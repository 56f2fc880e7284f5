"""graphpeft.engine.sequence: positions prepended at the graph entry reach every shape the model derives."""

import pytest
import torch

import graphpeft
from graphpeft.engine.sequence import prepend_positions, sequence_inputs
from tests.models import tiny_bart, tiny_bert_cls, tiny_llama


def _extend(gm, main, n):
    for node in sequence_inputs(gm, main):
        prepend_positions(gm, node, n, 1 if "mask" in node.target else 0)
    gm.recompile()
    return graphpeft.CapturedModel(gm).eval()


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert_cls])
def test_prepended_positions_equal_a_longer_input(build):
    model = build().eval()
    graph = _extend(graphpeft.capture(model), "input_ids", 3)
    ids = torch.randint(5, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    longer = torch.cat([torch.zeros(2, 3, dtype=torch.long), ids], 1)
    with torch.no_grad():
        ours = graph(input_ids=ids, attention_mask=mask).logits
        ref = model(input_ids=longer, attention_mask=torch.cat([torch.ones(2, 3, dtype=torch.long), mask], 1)).logits
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_encoder_and_decoder_sequences_are_told_apart():
    gm = graphpeft.capture(tiny_bart())
    assert [n.target for n in sequence_inputs(gm, "input_ids")] == ["input_ids", "attention_mask"]
    assert [n.target for n in sequence_inputs(gm, "decoder_input_ids")] == ["decoder_input_ids"]
    assert sequence_inputs(gm, "pixel_values") == []
