"""Prompt tuning, P-tuning and multitask prompt tuning on raw-audio encoders (wav2vec2, HuBERT, Data2VecAudio),
whose virtual tokens go in front of the frames that enter the first transformer layer (graphpeft.engine.frame_sequence).

PEFT refuses these models, so the oracle is the mathematics, run by the model's own code: the base model with
hooks that (1) put the same prompts in front of the hidden state entering its first layer, (2) give every
layer the mask transformers' own ``create_bidirectional_mask`` builds for the explicit sequence
[prompts ; frames] with the frame mask ``cat(ones(V), frame_mask)``, and (3) cut the last layer's output back
to the real frames. Everything else (feature encoder, positional convolution, layer norms, the head's masked
mean pooling or CTC projection, the loss) is the model's own forward. The tests also show the head reads only
the real frames (pooling over the prompts too would give other logits), that a CTC head's logits keep the
real frame count and give the model's own CTC loss, and that save -> reload gives equal outputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from transformers.masking_utils import create_bidirectional_mask

import graphpeft
from graphpeft.engine.errors import GraphPeftError
from tests.prompt_methods import PROMPT_METHODS, prompt_config, prompts, task_inputs
from tests import grid_models as G

V = 3
ATOL = 1e-5
TASKS = torch.tensor([1, 0])
SAMPLES = 64            # 8 frames after the tiny feature encoder (kernels 4, 2; strides 4, 2)


def _build(model_cls, config_cls, attn="sdpa", **kw):
    torch.manual_seed(0)
    config = config_cls(**{**G._AUDIO, "initializer_range": 0.5, **kw})   # logits of order 1, not 1e-2
    config._attn_implementation = attn
    return model_cls(config).eval()


MODELS = {
    "wav2vec2-cls": lambda: _build(tf.Wav2Vec2ForSequenceClassification, tf.Wav2Vec2Config),
    "hubert-cls": lambda: _build(tf.HubertForSequenceClassification, tf.HubertConfig),
    "data2vec-audio-cls": lambda: _build(tf.Data2VecAudioForSequenceClassification, tf.Data2VecAudioConfig),
    "wav2vec2-cls-eager": lambda: _build(tf.Wav2Vec2ForSequenceClassification, tf.Wav2Vec2Config, attn="eager"),
    "wav2vec2-ctc-stable": lambda: _build(tf.Wav2Vec2ForCTC, tf.Wav2Vec2Config, do_stable_layer_norm=True,
                                          feat_extract_norm="layer", pad_token_id=0),
}
METHODS = PROMPT_METHODS


def _config(method, **kw):
    return prompt_config(method, V, **kw)


def _extra(method):
    return task_inputs(method, TASKS)


def _prompts(ours, method, batch):
    return prompts(ours, method, batch, V, TASKS)


def _inputs(masked):
    gen = torch.Generator().manual_seed(0)
    batch = {"input_values": torch.randn(2, SAMPLES, generator=gen)}
    if masked:
        mask = torch.ones(2, SAMPLES, dtype=torch.long)
        mask[1, 40:] = 0              # the second clip is shorter: its last frames are padding
        batch["attention_mask"] = mask
    return batch


@pytest.fixture(scope="module")
def captured():
    cache = {}

    def get(name, masked):
        if (name, masked) not in cache:
            model = MODELS[name]()
            cache[name, masked] = (model, graphpeft.capture(model, _inputs(masked)))
        return cache[name, masked]
    return get


def _oracle(model, prompts, batch, cut=True):
    """A copy of ``model`` whose layers run on [prompts ; frames] with the mask transformers builds for it, the
    last layer's output cut back to the frames (``cut``)."""
    oracle = copy.deepcopy(model)
    base = oracle.base_model
    layers = base.encoder.layers
    frames = {}

    def enter(layer, args, kwargs):
        hidden = args[0]
        if layer is layers[0]:
            hidden = torch.cat([prompts.to(hidden.dtype), hidden], 1)
        if kwargs.get("attention_mask") is not None:
            length = hidden.shape[1] - V
            frame_mask = base._get_feature_vector_attention_mask(length, batch["attention_mask"])
            full = torch.cat([torch.ones(hidden.shape[0], V, dtype=torch.bool), frame_mask.bool()], 1)
            kwargs = {**kwargs, "attention_mask": create_bidirectional_mask(config=oracle.config,
                                                                            inputs_embeds=hidden,
                                                                            attention_mask=full)}
        frames["n"] = hidden.shape[1]
        return (hidden, *args[1:]), kwargs

    for layer in layers:
        layer.register_forward_pre_hook(enter, with_kwargs=True)
    if cut:
        layers[-1].register_forward_hook(lambda mod, args, out: out[:, V:])
    return oracle


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padded"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_virtual_tokens_in_front_of_the_frames_entering_the_first_layer(name, method, masked, captured):
    model, gm = captured(name, masked)
    batch = _inputs(masked)
    torch.manual_seed(0)
    ours = graphpeft.rewrite(copy.deepcopy(gm), _config(method)).eval()
    with torch.no_grad():
        got = ours(**batch, **_extra(method)).logits
        prompts = _prompts(ours, method, 2)
        expected = _oracle(model, prompts, batch)(**batch).logits
        base = model(**batch).logits
    assert got.shape == expected.shape == base.shape           # CTC: the real frames only, as the base model
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (got - base).abs().max() > 1e-2                      # the prompts do change what the frames compute


def test_the_classification_head_pools_the_real_frames_only(captured):
    """Mean pooling over frames averages the F real frames, not the V prompts: the oracle whose last layer keeps
    the prompts (the head then averages V+F rows) gives other logits."""
    model, gm = captured("wav2vec2-cls", False)
    batch = _inputs(False)
    torch.manual_seed(0)
    ours = graphpeft.rewrite(copy.deepcopy(gm), _config("prompt_tuning")).eval()
    with torch.no_grad():
        got = ours(**batch).logits
        prompts = _prompts(ours, "prompt_tuning", 2)
        oracle, seen = _oracle(model, prompts, batch), []
        oracle.projector.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
        oracle(**batch)
        everything = _oracle(model, prompts, batch, cut=False)(**batch).logits
        by_hand = model.classifier(model.projector(seen[0]).mean(1))
    frames = model.base_model._get_feat_extract_output_lengths(SAMPLES)
    assert seen[0].shape[1] == frames                   # what the head reads: the real frames
    torch.testing.assert_close(got, by_hand, atol=ATOL, rtol=0)
    assert (got - everything).abs().max() > 1e-2


@pytest.mark.parametrize("method", ["prompt_tuning", "multitask_prompt_tuning"])
def test_ctc_logits_are_per_real_frame_and_give_the_model_s_own_ctc_loss(method, captured):
    """Wav2Vec2ForCTC: logits [B, F, vocab] for the F real frames (F from the model's own length formula, padded
    clip too), and the model's own forward computes the same CTC loss from them as from the oracle's logits."""
    model, gm = captured("wav2vec2-ctc-stable", True)
    batch = _inputs(True)
    labels = torch.tensor([[5, 6, 7, 8], [9, 10, -100, -100]])
    torch.manual_seed(0)
    ours = graphpeft.rewrite(copy.deepcopy(gm), _config(method)).eval()
    with torch.no_grad():
        logits = ours(**batch, **_extra(method)).logits
        oracle = _oracle(model, _prompts(ours, method, 2), batch)
        expected = oracle(**batch, labels=labels)
        oracle.lm_head.register_forward_hook(lambda mod, args, out: logits)
        from_ours = oracle(**batch, labels=labels)
    assert logits.shape[1] == model.base_model._get_feat_extract_output_lengths(SAMPLES)
    torch.testing.assert_close(logits, expected.logits, atol=ATOL, rtol=0)
    assert torch.isfinite(expected.loss)
    torch.testing.assert_close(from_ours.loss, expected.loss, atol=ATOL, rtol=0)
    with torch.no_grad():
        ours_loss = ours(**batch, **_extra(method), labels=labels).loss     # graphpeft's own CTC loss, as the class's
    torch.testing.assert_close(ours_loss, expected.loss, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_a_train_step_moves_only_the_prompts_and_save_reload_gives_equal_outputs(method, captured, tmp_path):
    model, gm = captured("hubert-cls", True)
    batch = _inputs(True)
    torch.manual_seed(0)
    ours = graphpeft.rewrite(copy.deepcopy(gm), _config(method))
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".prompt_encoder." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    ours.train()
    loss = ours(**batch, **_extra(method), labels=torch.tensor([0, 2])).loss     # the class's cross-entropy
    assert torch.isfinite(loss)
    loss.backward()
    torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=1.0).step()
    assert {n for n, p in ours.named_parameters() if not torch.equal(p, before[n])} == trainable
    ours.eval().save_pretrained(tmp_path / "adapter")
    loaded = graphpeft.from_pretrained(copy.deepcopy(gm), tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = ours(**batch, **_extra(method)).logits
        torch.testing.assert_close(loaded(**batch, **_extra(method)).logits, expected, atol=ATOL, rtol=0)
        oracle = _oracle(model, _prompts(ours, method, 2), batch)(**batch).logits
    torch.testing.assert_close(expected, oracle, atol=ATOL, rtol=0)


def test_a_fixed_audio_length_capture_lengthens_the_layers_shape_constants():
    """Captured with dynamic=False the frame count is a constant (10 here, not a head size) in the layers' views."""
    model = MODELS["wav2vec2-cls"]()
    batch = {"input_values": torch.randn(2, 80, generator=torch.Generator().manual_seed(0))}     # 10 frames
    gm = graphpeft.capture(model, batch, dynamic=False)
    torch.manual_seed(0)
    ours = graphpeft.rewrite(gm, _config("prompt_tuning")).eval()
    with torch.no_grad():
        got = ours(**batch).logits
        expected = _oracle(model, _prompts(ours, "prompt_tuning", 2), batch)(**batch).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_a_vocabulary_init_is_refused_on_audio_frames(captured):
    _, gm = captured("wav2vec2-cls", False)
    with pytest.raises(GraphPeftError, match="needs a token vocabulary, but the prompts go into the audio frames"):
        graphpeft.rewrite(copy.deepcopy(gm), _config("prompt_tuning", prompt_tuning_init="SAMPLE_VOCAB"))


def test_a_weighted_layer_sum_reads_every_layer_s_real_frames():
    """use_weighted_layer_sum: the head stacks the first layer's input and every layer's output; each is read on
    the F real frames (the layers' outputs cut), weighted by the model's layer weights, then pooled (masked)."""
    model = _build(tf.Wav2Vec2ForSequenceClassification, tf.Wav2Vec2Config, use_weighted_layer_sum=True)
    with torch.no_grad():
        model.layer_weights.copy_(torch.tensor([0.5, -1.0, 2.0]))
    batch = _inputs(True)
    torch.manual_seed(0)
    ours = graphpeft.rewrite(graphpeft.capture(model, batch), _config("prompt_tuning")).eval()
    with torch.no_grad():
        got = ours(**batch).logits
        oracle, seen = _oracle(model, _prompts(ours, "prompt_tuning", 2), batch, cut=False), []
        layers = oracle.base_model.encoder.layers
        layers[0].register_forward_pre_hook(lambda mod, args, kwargs: seen.append(args[0][:, V:]), with_kwargs=True)
        for layer in layers:
            layer.register_forward_hook(lambda mod, args, out: seen.append(out[:, V:]))
        oracle(**batch)
        weights = torch.softmax(model.layer_weights, -1).view(-1, 1, 1)
        hidden = model.projector((torch.stack(seen, 1) * weights).sum(1))
        frames = model.base_model._get_feature_vector_attention_mask(hidden.shape[1], batch["attention_mask"])
        expected = model.classifier((hidden * frames[..., None]).sum(1) / frames.sum(1, keepdim=True))
    assert len(seen) == len(layers) + 1
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (got - model(**batch).logits).abs().max() > 1e-2


def test_a_bare_encoder_returns_the_real_frames():
    """Wav2Vec2Model: last_hidden_state has the F real frames, equal to the oracle's."""
    model = _build(tf.Wav2Vec2Model, tf.Wav2Vec2Config)
    batch = _inputs(True)
    torch.manual_seed(0)
    ours = graphpeft.rewrite(graphpeft.capture(model, batch), _config("p_tuning")).eval()
    with torch.no_grad():
        got = ours(**batch).last_hidden_state
        expected = _oracle(model, _prompts(ours, "p_tuning", 2), batch)(**batch).last_hidden_state
        base = model(**batch).last_hidden_state
    assert got.shape == base.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (got - base).abs().max() > 1e-2


def test_another_batch_size_and_clip_length_than_captured(captured):
    """The capture is dynamic in batch and samples: 3 clips of 96 samples (12 frames), one padded, run too."""
    model, gm = captured("hubert-cls", True)
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(3, 96, dtype=torch.long)
    mask[2, 50:] = 0
    batch = {"input_values": torch.randn(3, 96, generator=gen), "attention_mask": mask}
    torch.manual_seed(0)
    ours = graphpeft.rewrite(copy.deepcopy(gm), _config("prompt_tuning")).eval()
    with torch.no_grad():
        got = ours(**batch).logits
        expected = _oracle(model, _prompts(ours, "prompt_tuning", 3), batch)(**batch).logits
    assert got.shape == (3, model.config.num_labels)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
