"""The loss computed outside the graph equals the one the model's own transformers class computes, per head."""

import copy

import pytest
import torch

import graphpeft
from graphpeft.engine.errors import GraphPeftError
from tests import grid_models as G
from tests.models import tiny_bart, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5, tiny_vit, tiny_whisper

# name -> (builder, config overrides); the head kind each covers is in the name
CASES = {
    "causal-llama": (tiny_llama, {}),
    "causal-gpt2": (tiny_gpt2, {}),                          # GPT2LMHeadModel: no loss_type in transformers
    "seq2seq-t5": (tiny_t5, {}),
    "seq2seq-bart": (tiny_bart, {}),
    "seq2seq-whisper": (tiny_whisper, {}),
    "masked-bert": (G.tiny_bert_mlm, {}),
    "seqcls-single-bert": (tiny_bert_cls, {}),
    "seqcls-multi-bert": (tiny_bert_cls, {"num_labels": 3, "problem_type": "multi_label_classification"}),
    "seqcls-regression-bert": (tiny_bert_cls, {"num_labels": 1}),
    "seqcls-llama": (G.tiny_llama_cls, {}),                  # self.loss_function, last-token pooling
    "token-bert": (G.tiny_bert_token, {}),
    "token-llama": (G.tiny_llama_token, {}),
    "qa-bert": (G.tiny_bert_qa, {}),
    "qa-llama": (G.tiny_llama_qa, {}),
    "choice-bert": (G.tiny_bert_choice, {}),
    "image-vit": (tiny_vit, {}),
    "image-vit-regression": (tiny_vit, {"num_labels": 1}),
    "audio-wav2vec2": (G.tiny_wav2vec2, {}),
    "ctc-wav2vec2": (G.tiny_wav2vec2_ctc, {}),
    "ctc-wav2vec2-sum": (G.tiny_wav2vec2_ctc, {"ctc_loss_reduction": "sum", "ctc_zero_infinity": True}),
    "speech-s2t": (G.tiny_speech_to_text, {}),
}


# heavier captures (or kinds a default case covers already) run with -m slow
SLOW = {"ctc-wav2vec2-sum", "causal-gpt2", "seq2seq-t5", "seq2seq-whisper", "speech-s2t", "seqcls-llama", "token-llama", "qa-llama",
        "image-vit-regression", "seqcls-regression-bert"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(CASES)])
def test_loss_equals_the_models_own(name):
    build, overrides = CASES[name]
    model = build(**overrides).eval()
    captured = graphpeft.CapturedModel(graphpeft.capture(model)).eval()
    batch = G.batch_for(model)
    targets = G.targets_for(model, batch)
    if G.head_kind(model) == "seq2seq":
        batch.pop("decoder_input_ids")                     # the decoder's inputs come from the labels
    with torch.no_grad():
        ours = captured(**batch, **targets)
        ref = model(**copy.deepcopy(batch), **targets)
    assert ref.loss is not None and torch.isfinite(ref.loss)
    torch.testing.assert_close(ours.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for key in ("logits", "start_logits"):
        if key in ref:
            torch.testing.assert_close(ours[key], ref[key], rtol=1e-5, atol=1e-5)


def test_rewritten_model_with_its_adapter_disabled_has_the_base_loss():
    model = tiny_vit()
    batch = G.batch_for(model)
    labels = torch.tensor([0, 2])
    peft_model = graphpeft.rewrite(model, graphpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights=False)).eval()
    with torch.no_grad():
        ref = model(**batch, labels=labels).loss
        with peft_model.disable_adapter():
            base = peft_model(**batch, labels=labels).loss
        adapted = peft_model(**batch, labels=labels).loss
    torch.testing.assert_close(base, ref, rtol=1e-5, atol=1e-6)
    assert (adapted - ref).abs() > 1e-4                    # the adapter is in the loss when enabled
    peft_model.train()
    peft_model(**batch, labels=labels).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)


def test_num_items_in_batch_reaches_a_loss_function_as_the_class_passes_it():
    """ViT passes **kwargs to self.loss_function: Trainer's num_items_in_batch sums and divides."""
    model = tiny_vit()
    captured = graphpeft.CapturedModel(graphpeft.capture(model)).eval()
    batch, labels = G.batch_for(model), torch.tensor([0, 2])
    with torch.no_grad():
        ours = captured(**batch, labels=labels, num_items_in_batch=torch.tensor(5)).loss
        ref = model(**batch, labels=labels, num_items_in_batch=torch.tensor(5)).loss
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(ours, 2 * captured(**batch, labels=labels).loss.detach() / 5)


@pytest.mark.parametrize("build", [G.tiny_bert_qa, G.tiny_bert_token])
def test_prompt_tuning_shifts_targets_past_its_virtual_tokens_as_peft_with_shifted_targets(build, tmp_path):
    """Logits cover V virtual tokens + L input tokens (as PEFT's); targets point at input tokens, so start/end
    positions move by V (labels get V leading -100): the loss equals PEFT's given shifted targets, and the
    model's own class's on the same virtual tokens."""
    import peft

    v = 3
    model = build(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    task = "QUESTION_ANS" if G.head_kind(model) == "question" else "TOKEN_CLS"
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.PromptTuningConfig(task_type=task, num_virtual_tokens=v)).eval()
    pm.save_pretrained(tmp_path)
    ours = graphpeft.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    batch = G.batch_for(model)
    targets = G.targets_for(model, batch)
    if task == "QUESTION_ANS":
        shifted = {k: t + v for k, t in targets.items()}
    else:
        shifted = {"labels": torch.cat([torch.full((2, v), -100), targets["labels"]], dim=1)}
    with torch.no_grad():
        got = ours(**batch, **targets)
        expected = pm(**batch, **shifted)
    first = "start_logits" if task == "QUESTION_ANS" else "logits"
    assert got[first].shape[1] == v + batch["input_ids"].shape[1]
    torch.testing.assert_close(got[first], expected[first], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)


def test_synthesized_inputs_fit_models_whose_main_input_is_not_token_ids():
    shapes = {}
    for build in (G.tiny_wav2vec2, G.tiny_speech_to_text, G.tiny_bert_choice, tiny_whisper):
        model = build()
        inputs = graphpeft.synthesize_inputs(model)
        with torch.no_grad():
            model(**inputs)                                  # the model takes them
        shapes[type(model).__name__] = {k: tuple(v.shape) for k, v in inputs.items()}
    assert shapes["Wav2Vec2ForSequenceClassification"]["input_values"][0] == 2
    assert len(shapes["BertForMultipleChoice"]["input_ids"]) == 3
    assert len(shapes["Speech2TextForConditionalGeneration"]["input_features"]) == 3


def test_wrong_or_missing_targets_are_one_line_errors():
    model = G.tiny_bert_qa()
    captured = graphpeft.CapturedModel(graphpeft.capture(model))
    batch = G.batch_for(model)
    with pytest.raises(GraphPeftError, match="start_positions and end_positions") as err:
        captured(**batch, start_positions=torch.tensor([1, 2]))
    assert len(str(err.value).splitlines()) == 1
    with pytest.raises(GraphPeftError, match="knows no loss for BertModel"):
        from tests.models import tiny_bert
        bare = tiny_bert()
        graphpeft.CapturedModel(graphpeft.capture(bare))(**G.batch_for(bare), labels=torch.tensor([0, 1]))


@pytest.mark.parametrize("model_class, kind", [
    ("T5ForConditionalGeneration", "seq2seq"), ("BartForConditionalGeneration", "seq2seq"),   # also a masked-LM class
    ("WhisperForConditionalGeneration", "seq2seq"), ("GPT2LMHeadModel", "causal"), ("BertForMaskedLM", "masked"),
    ("ViTForImageClassification", "sequence"), ("Wav2Vec2ForSequenceClassification", "audio"),
    ("BertForMultipleChoice", "multiple_choice"), ("LlamaForQuestionAnswering", "question"), ("BertModel", None),
    ("Wav2Vec2ForCTC", "ctc"), ("HubertForCTC", "ctc"),
])
def test_head_kind_comes_from_transformers_auto_mappings(model_class, kind):
    from graphpeft.engine.losses import head_kind
    assert head_kind(model_class, None) == kind


def test_a_class_no_mapping_names_falls_back_on_its_loss_type():
    from graphpeft.engine.losses import head_kind
    assert head_kind("MyOwnForCausalLM", "ForCausalLM") == "causal"
    assert head_kind("MyOwnSeq2Seq", "ForConditionalGeneration", is_encoder_decoder=True) == "seq2seq"
    assert head_kind("MyOwnModel", None) is None


def test_ctc_loss_counts_each_clip_s_frames_from_its_attention_mask():
    """A padded clip: its CTC input length is the class's own frame count of the mask's sum, as Wav2Vec2ForCTC."""
    model = G.tiny_wav2vec2_ctc(feat_extract_norm="layer").eval()     # the layout that takes an attention mask
    batch = G.batch_for(model)
    batch["attention_mask"] = torch.ones(batch["input_values"].shape, dtype=torch.long)
    batch["attention_mask"][1, batch["input_values"].shape[1] // 2:] = 0
    captured = graphpeft.CapturedModel(graphpeft.capture(model, example_inputs=dict(batch))).eval()
    targets = G.targets_for(model, batch)
    with torch.no_grad():
        ours, ref = captured(**batch, **targets), model(**batch, **targets)
        unpadded = model(**{**batch, "attention_mask": torch.ones_like(batch["attention_mask"])}, **targets)
    torch.testing.assert_close(ours.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ref.loss, unpadded.loss)
    with pytest.raises(GraphPeftError, match="CTC labels must be token ids below it"):
        captured(**batch, labels=torch.full((2, 3), model.config.vocab_size))
