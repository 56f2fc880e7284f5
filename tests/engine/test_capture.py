"""graphpeft.engine.capture: model (+ example inputs) -> GraphModule.

Hugging Face models get example inputs synthesized from their config, are exported with dynamic
batch/sequence dims and must reproduce eager outputs on other shapes than the example. Dropout and
SDPA attention dropout survive capture and can be switched between train and eval, both ways.
Plain modules are traced with torch.fx (ops, not leaf modules); a model that cannot be captured
raises CaptureError with a one-line, actionable message.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import graphpeft
from graphpeft.engine.capture import capture_info
from tests.models import BUILDERS, MLP, inputs_for, tiny_bert_cls, tiny_llama, tiny_vit

aten = torch.ops.aten
ARCHS = ["llama", "gpt2", "bert", "distilbert", "vit", "whisper", "t5", "bart"]
MAIN_INPUT = {"llama": "input_ids", "gpt2": "input_ids", "bert": "input_ids", "distilbert": "input_ids",
              "vit": "pixel_values", "whisper": "input_features", "t5": "input_ids", "bart": "input_ids"}


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def _sdpa_p(gm: fx.GraphModule) -> list[float]:
    out = []
    for n in gm.graph.nodes:
        if n.target is aten.scaled_dot_product_attention.default:
            out.append(n.args[4] if len(n.args) > 4 else n.kwargs.get("dropout_p", 0.0))
    return out


def _dropout_flags(gm: fx.GraphModule) -> list[bool]:
    return [bool(n.args[2]) for n in gm.graph.nodes if n.target is aten.dropout.default]


@pytest.fixture(scope="module")
def captured():
    """arch -> (eager model in eval mode, graph captured from it without example inputs)."""
    out = {}
    for arch in ARCHS:
        model = BUILDERS[arch]()
        out[arch] = (model, graphpeft.capture(model))
    return out


# -- Hugging Face models: synthesized inputs, eager parity, dynamic dims --------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_synthesized_inputs_and_eager_parity(captured, arch):
    model, gm = captured[arch]
    example = graphpeft.synthesize_inputs(model)
    assert MAIN_INPUT[arch] in example
    if model.config.is_encoder_decoder:
        assert "decoder_input_ids" in example
    info = capture_info(gm)
    assert info.mode == "export"
    assert set(example) == set(info.input_names)
    assert isinstance(gm, fx.GraphModule) and not gm.training
    with torch.no_grad():
        expected = model(**example)
        got = graphpeft.CapturedModel(gm)(**example)
    assert type(got) is type(expected)
    _close(got.logits, expected.logits)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch,seq", [(3, 5), (1, 11)])
def test_dynamic_batch_and_sequence(captured, arch, batch, seq):
    model, gm = captured[arch]
    example = graphpeft.synthesize_inputs(model)
    x = inputs_for(model, batch, seq, seed=batch * 31 + seq, pad=2 if "attention_mask" in example else 0)
    assert next(iter(x.values())).shape[0] != next(iter(example.values())).shape[0]
    with torch.no_grad():
        expected = model(**x).logits
        got = graphpeft.CapturedModel(gm)(**x).logits
    assert got.shape == expected.shape and got.shape[0] == batch
    _close(got, expected)


def test_raw_graph_module_takes_model_kwargs(captured):
    """The GraphModule itself (not only the wrapper) runs on a new shape with the model's kwargs."""
    model, gm = captured["llama"]
    x = inputs_for(model, 3, 5, seed=7)
    with torch.no_grad():
        out = gm(**x, **capture_info(gm).constants)
        expected = model(**x).logits
    logits = out["logits"] if isinstance(out, dict) else out[0]
    _close(logits, expected)


# -- train / eval --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert_train():
    """BERT with the default dropout (hidden 0.1, attention 0.1), captured in train mode."""
    model = tiny_bert_cls().train()
    return model, graphpeft.capture(model)


def test_train_mode_capture_keeps_dropout(bert_train):
    model, gm = bert_train
    graphpeft.set_train_mode(gm, True)
    assert gm.training
    assert _dropout_flags(gm) and all(_dropout_flags(gm))
    assert _sdpa_p(gm) and all(p == pytest.approx(0.1) for p in _sdpa_p(gm))
    cm = graphpeft.CapturedModel(gm)
    x = inputs_for(model, 3, 5)
    with torch.no_grad():
        a, b = cm(**x).logits, cm(**x).logits
        assert not torch.equal(a, b), "train-mode graph should be stochastic"
        # the same ops in the same order draw the same random numbers as eager train mode
        torch.manual_seed(123)
        got = cm(**x).logits
        model.train()
        torch.manual_seed(123)
        expected = model(**x).logits
    _close(got, expected)


def test_set_train_mode_switches_both_ways(bert_train):
    model, gm = bert_train
    cm = graphpeft.CapturedModel(gm)
    x = inputs_for(model, 2, 7, seed=3)
    graphpeft.set_train_mode(gm, True)
    assert graphpeft.set_train_mode(gm, False) is True
    assert graphpeft.set_train_mode(gm, False) is False          # already eval: nothing to change
    assert not gm.training and not any(_dropout_flags(gm)) and all(p == 0.0 for p in _sdpa_p(gm))
    model.eval()
    with torch.no_grad():
        a, b, expected = cm(**x).logits, cm(**x).logits, model(**x).logits
    assert torch.equal(a, b)
    _close(a, expected)
    assert graphpeft.set_train_mode(gm, True) is True
    assert all(_dropout_flags(gm)) and all(p == pytest.approx(0.1) for p in _sdpa_p(gm))
    with torch.no_grad():
        assert not torch.equal(cm(**x).logits, cm(**x).logits)


def test_sdpa_attention_dropout_alone_is_switched():
    """Only attention dropout (SDPA dropout_p) is on: the graph is stochastic in train mode only."""
    model = tiny_bert_cls(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.1)
    gm = graphpeft.capture(model)                       # eval model
    assert not gm.training and all(p == 0.0 for p in _sdpa_p(gm)) and _sdpa_p(gm)
    cm = graphpeft.CapturedModel(gm)
    x = inputs_for(model, 3, 6, seed=5)
    with torch.no_grad():
        _close(cm(**x).logits, model(**x).logits)
        cm.train()
        assert all(p == pytest.approx(0.1) for p in _sdpa_p(gm))
        assert not torch.equal(cm(**x).logits, cm(**x).logits)
        model.train()
        torch.manual_seed(9)
        got = cm(**x).logits
        torch.manual_seed(9)
        _close(got, model(**x).logits)
        cm.eval()
        model.eval()
        assert torch.equal(cm(**x).logits, cm(**x).logits)
        _close(cm(**x).logits, model(**x).logits)


def test_graph_peft_model_train_eval_both_ways():
    """A GraphPeftModel rewritten from an eval-mode model can go to train and back."""
    model = tiny_bert_cls()
    peft_model = graphpeft.rewrite(model, graphpeft.LoraConfig(target_modules=["query", "value"]))
    assert not peft_model.training and not peft_model.graph_module.training
    x = inputs_for(model, 2, 6, seed=11)
    with torch.no_grad():
        eval_out = peft_model(**x).logits
        _close(eval_out, model(**x).logits)               # B = 0 at init: the adapter adds nothing
        assert peft_model.train() is peft_model
        assert peft_model.training and peft_model.graph_module.training
        assert all(p == pytest.approx(0.1) for p in _sdpa_p(peft_model.graph_module))
        assert not torch.equal(peft_model(**x).logits, peft_model(**x).logits)
        peft_model.eval()
        assert not peft_model.graph_module.training
        assert torch.equal(peft_model(**x).logits, eval_out)


# -- plain nn.Module: torch.fx symbolic trace ------------------------------------------------------

def test_plain_module_is_symbolically_traced_as_ops():
    model = MLP(dropout=0.5).eval()
    gm = graphpeft.capture(model)
    assert capture_info(gm).mode == "symbolic_trace"
    assert not any(n.op == "call_module" for n in gm.graph.nodes)
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.nn.functional.linear]
    assert [n.args[1].target for n in linears] == ["fc1.weight", "fc2.weight"]
    for batch in (1, 5):
        x = torch.randn(batch, 16, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            _close(gm(x), model(x))
    # dropout in a traced graph switches too
    x = torch.randn(4, 16)
    graphpeft.set_train_mode(gm, True)
    with torch.no_grad():
        assert not torch.equal(gm(x), gm(x))
    graphpeft.set_train_mode(gm, False)
    with torch.no_grad():
        _close(gm(x), model(x))
    # and the traced graph is what rewrite works on
    rewritten = graphpeft.rewrite(model, graphpeft.LoraConfig(target_modules=["fc1"]))
    assert [(r.kind, r.module_path) for r in rewritten.records] == [("linear", "fc1")]
    with torch.no_grad():
        _close(rewritten(x), model(x))


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return x


def test_untraceable_module_raises_capture_error_suggesting_example_inputs():
    with pytest.raises(graphpeft.CaptureError) as err:
        graphpeft.capture(_DataDependent())
    msg = str(err.value)
    assert "\n" not in msg
    assert "_DataDependent" in msg and "control flow" in msg
    assert "example inputs" in msg
    assert isinstance(err.value, graphpeft.GraphPeftError) and isinstance(err.value, ValueError)


def test_rewrite_of_untraceable_module_raises_capture_error():
    with pytest.raises(graphpeft.CaptureError, match="example inputs"):
        graphpeft.rewrite(_DataDependent(), graphpeft.LoraConfig(target_modules=["lin"]))


def test_unexportable_module_raises_capture_error():
    with pytest.raises(graphpeft.CaptureError) as err:
        graphpeft.capture(_DataDependent(), (torch.randn(2, 4),))
    msg = str(err.value)
    assert "\n" not in msg
    assert "torch.export" in msg and "data-dependent" in msg.lower()
    assert "example_inputs" in msg


def test_non_module_raises_capture_error():
    with pytest.raises(graphpeft.CaptureError, match="nn.Module"):
        graphpeft.capture(lambda x: x)


def test_inputs_outside_the_captured_shapes_get_a_one_line_error():
    """tiny ViT fixes the image size: the graph's shape guard becomes a GraphPeftError."""
    model = tiny_vit()
    peft_model = graphpeft.rewrite(model, graphpeft.LoraConfig())
    size = model.config.image_size
    with pytest.raises(graphpeft.GraphPeftError, match="captured for") as info:
        peft_model(pixel_values=torch.randn(2, 3, size + 16, size + 16))
    assert "\n" not in str(info.value)


def test_bert_takes_a_tokenizers_output_token_type_ids_included():
    model = tiny_bert_cls()
    peft_model = graphpeft.rewrite(model, graphpeft.LoraConfig()).eval()
    assert "token_type_ids" in peft_model.capture_info.input_names
    ids = torch.randint(0, 100, (2, 7))
    types = torch.zeros_like(ids)
    types[1, 3:] = 1                          # a sentence pair in the second row
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": types}
    torch.testing.assert_close(peft_model(**batch).logits, model(**batch).logits, rtol=0, atol=1e-6)
    # left out, it defaults to zeros as in transformers
    torch.testing.assert_close(peft_model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_moving_the_model_moves_the_device_constants_of_its_graphs():
    """A graph records the capture device (arange(..., device=cpu)); .to() points every graph at the new one.

    No GPU here: the meta device stands in for it (a cpu constant among meta tensors fails).
    """
    from graphpeft.engine.capture import retarget_device

    peft_model = graphpeft.rewrite(tiny_llama(), graphpeft.LoraConfig(r=2))
    ids = torch.randint(0, 50, (2, 5))
    graphs = [peft_model.graph_module.graph, peft_model._base_graph]
    assert all(_devices(g) == {torch.device("cpu")} for g in graphs)
    peft_model.to("meta")
    assert all(_devices(g) == {torch.device("meta")} for g in graphs)
    out = peft_model(input_ids=ids.to("meta"))
    assert out.logits.device.type == "meta" and out.logits.shape == (2, 5, 100)
    with peft_model.disable_adapter():
        assert peft_model(input_ids=ids.to("meta")).logits.device.type == "meta"
    assert retarget_device(peft_model.graph_module.graph, torch.device("meta")) == 0   # nothing left to move


def _devices(graph):
    found = set()
    for node in graph.nodes:
        for value in [*node.args, *node.kwargs.values()]:
            if isinstance(value, torch.device):
                found.add(value)
    return found
