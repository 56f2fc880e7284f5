"""Prompt-learning methods on vision and speech architectures beyond ViT and Whisper, each built tiny from its
transformers config: the sites come from the graph, so no table per architecture.

Oracles (PEFT refuses these models):
- prompt tuning, P-tuning, multitask prompt tuning on an image model: the base model with a forward hook on
  its embeddings module that inserts the same prompts after the leading tokens (the class token; DeiT's
  distillation token too), so the rest runs the model's own code over the longer sequence;
- prefix tuning on an image model: the base model running its own SDPA attention with the prefix rows of
  layer j (PEFT's layout) concatenated in front of the keys and values;
- the prompt methods on Speech2Text (input_features, no encoder tokens; decoder positions numbered from the
  ids, so it takes no decoder_inputs_embeds): the base model on V non-pad ids + the ids, its embed_tokens
  output's first V rows replaced by the prompts (they join at the embedding module's output, so the
  decoder's embed_scale after it scales them too).
Every cell also trains one step that moves exactly the method's parameters and reloads with equal outputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
import transformers as tf
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import graphpeft
from graphpeft.engine.match import attention_sites
from graphpeft.engine.rewriter import get_attr_path
from graphpeft.passes.prefix_tuning import prompt_embeddings
from tests.prompt_methods import PROMPT_METHODS, prompt_config, prompts, task_inputs

V = 3
ATOL = 1e-5
LAYERS = 2
_DIMS = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64)
_IMAGE = dict(image_size=16, patch_size=4, num_channels=3)
_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _build(config_cls, model_cls, attn="sdpa", **kw):
    torch.manual_seed(0)
    config = config_cls(**kw)
    config._attn_implementation = attn
    return model_cls(config).eval()


# name -> (builder, tokens before the patches)
VISION = {
    "deit": (lambda: _build(tf.DeiTConfig, tf.DeiTForImageClassification, **_DIMS, **_IMAGE, **_NO_DROPOUT,
                            num_labels=3), 2),
    "deit-teacher": (lambda: _build(tf.DeiTConfig, tf.DeiTForImageClassificationWithTeacher, **_DIMS, **_IMAGE,
                                    **_NO_DROPOUT, num_labels=3), 2),
    "dinov2": (lambda: _build(tf.Dinov2Config, tf.Dinov2ForImageClassification, **_DIMS, image_size=16,
                              patch_size=4, num_labels=3), 1),
    "beit": (lambda: _build(tf.BeitConfig, tf.BeitForImageClassification, **_DIMS, **_IMAGE, **_NO_DROPOUT,
                            use_mean_pooling=False, drop_path_rate=0.0, num_labels=3), 1),
    "clip-vision": (lambda: _build(tf.CLIPVisionConfig, tf.CLIPVisionModel, **_DIMS, image_size=16, patch_size=4), 1),
    "siglip-vision": (lambda: _build(tf.SiglipVisionConfig, tf.SiglipVisionModel, **_DIMS, image_size=16,
                                     patch_size=4), 0),
}
METHODS = PROMPT_METHODS
TASKS = torch.tensor([1, 0])


def _config(method, **kw):
    if method in PROMPT_METHODS:
        return prompt_config(method, V, **kw)
    return graphpeft.PrefixTuningConfig(num_virtual_tokens=V, **kw)


def _extra(method):
    return task_inputs(method, TASKS)


def _prompts(ours, method, batch):
    return prompts(ours, method, batch, V, TASKS)


def _outputs(out):
    return [t for t in (getattr(out, "logits", None), getattr(out, "last_hidden_state", None),
                        getattr(out, "pooler_output", None)) if t is not None]


@pytest.fixture(scope="module")
def captured():
    cache = {}

    def get(name):
        if name not in cache:
            model = VISION[name][0]()
            cache[name] = (model, graphpeft.capture(model))
        return cache[name]
    return get


def _embeddings_module(model):
    """The model's patch-embedding module, by its class name (not by graphpeft)."""
    return next(m for n, m in model.named_modules() if type(m).__name__.endswith("Embeddings"))


def _train_step_and_reload(ours, gm, batch, tmp_path, extra):
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".prompt_encoder." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    ours.train()
    loss = sum(t.float().pow(2).mean() for t in _outputs(ours(**batch, **extra)))
    assert torch.isfinite(loss)
    loss.backward()
    torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=1.0).step()
    assert {n for n, p in ours.named_parameters() if not torch.equal(p, before[n])} == trainable
    ours.eval().save_pretrained(tmp_path / "adapter")
    loaded = graphpeft.from_pretrained(copy.deepcopy(gm), tmp_path / "adapter").eval()
    with torch.no_grad():
        for got, expected in zip(_outputs(loaded(**batch, **extra)), _outputs(ours(**batch, **extra))):
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(VISION))
def test_virtual_tokens_after_the_leading_tokens_of_the_patch_sequence(name, method, captured, tmp_path):
    model, gm = captured(name)
    leading = VISION[name][1]
    torch.manual_seed(0)
    ours = graphpeft.rewrite(copy.deepcopy(gm), _config(method)).eval()
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = _outputs(ours(pixel_values=pixels, **_extra(method)))
        prompts = _prompts(ours, method, 2)
        oracle = copy.deepcopy(model)
        _embeddings_module(oracle).register_forward_hook(
            lambda mod, args, out: torch.cat([out[:, :leading], prompts, out[:, leading:]], 1))
        expected = _outputs(oracle(pixel_values=pixels))
        base = _outputs(model(pixel_values=pixels))
    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)
    assert (got[-1] - base[-1]).abs().max() > 1e-4
    _train_step_and_reload(ours, gm, {"pixel_values": pixels}, tmp_path, _extra(method))


_PREFIX: dict[str, object] = {}


def _prefix_attention(module, query, key, value, attention_mask, **kwargs):
    """The model's own SDPA with the prefix of the j-th attention call in front of its keys and values."""
    j = _PREFIX["calls"]
    _PREFIX["calls"] = j + 1
    prefix, batch = _PREFIX["prefix"], key.shape[0]
    key = torch.cat([prefix[2 * j].unsqueeze(0).expand(batch, -1, -1, -1), key], 2)
    value = torch.cat([prefix[2 * j + 1].unsqueeze(0).expand(batch, -1, -1, -1), value], 2)
    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


AttentionInterface.register("graphpeft_generality_prefix", _prefix_attention)


@pytest.mark.parametrize("name", sorted(VISION))
def test_prefix_at_every_layer_of_an_image_model(name, captured, tmp_path):
    model, gm = captured(name)
    torch.manual_seed(0)
    ours = graphpeft.rewrite(copy.deepcopy(gm), _config("prefix_tuning")).eval()
    assert len([r for r in ours.records if r.kind != "prefix"]) == LAYERS       # the layers, not a pooling head
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = _outputs(ours(pixel_values=pixels))
        entry = next(r for r in ours.records if r.kind == "prefix")
        heads = model.config.num_attention_heads
        _PREFIX.update(calls=0, prefix=prompt_embeddings(ours.graph_module, entry).view(V, 2 * LAYERS, heads, -1)
                       .permute(1, 2, 0, 3))
        oracle = copy.deepcopy(model)
        for module in oracle.modules():
            if hasattr(module, "config") and hasattr(module.config, "_attn_implementation"):
                module.config._attn_implementation = "graphpeft_generality_prefix"
        expected = _outputs(oracle(pixel_values=pixels))
    assert _PREFIX["calls"] == LAYERS
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)
    _train_step_and_reload(ours, gm, {"pixel_values": pixels}, tmp_path, {})


# -- speech: Speech2Text's decoder -----------------------------------------------------------------------

def _speech2text():
    return _build(tf.Speech2TextConfig, tf.Speech2TextForConditionalGeneration, attn="eager", d_model=32, encoder_layers=2,
                  decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                  decoder_ffn_dim=64, vocab_size=100, input_feat_per_channel=8, num_conv_layers=1,
                  conv_kernel_sizes=[5], conv_channels=16, max_source_positions=64, max_target_positions=64,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, dropout=0.0)


@pytest.fixture(scope="module")
def speech2text():
    model = _speech2text()
    gen = torch.Generator().manual_seed(0)
    batch = {"input_features": torch.randn(2, 20, 8, generator=gen),
             "decoder_input_ids": torch.randint(3, 100, (2, 5), generator=gen)}
    return model, batch, graphpeft.capture(model, example_inputs=batch)


@pytest.mark.parametrize("method", METHODS)
def test_speech2text_decoder_prompt(method, speech2text, tmp_path):
    """Speech2Text numbers decoder positions from the ids (no decoder_inputs_embeds): the oracle runs the base
    model on [V non-pad ids ; ids] with a hook that puts the prompts in the V first rows of embed_tokens."""
    model, batch, gm = speech2text
    torch.manual_seed(0)
    ours = graphpeft.rewrite(copy.deepcopy(gm), _config(method, task_type="SEQ_2_SEQ_LM")).eval()
    with torch.no_grad():
        got = ours(**batch, **_extra(method)).logits
        prompts = _prompts(ours, method, 2)
        oracle = copy.deepcopy(model)
        oracle.model.decoder.embed_tokens.register_forward_hook(lambda mod, args, out: torch.cat([prompts, out[:, V:]], 1))
        ids = torch.cat([torch.full((2, V), 1), batch["decoder_input_ids"]], 1)          # 1: not the pad id 0
        expected = oracle(input_features=batch["input_features"], decoder_input_ids=ids).logits
        base = model(**batch).logits
    assert got.shape == (2, V + 5, 100)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (got[:, V:] - base).abs().max() > 1e-3
    _train_step_and_reload(ours, gm, batch, tmp_path, _extra(method))


# -- weight matmuls found by what the graph computes ---------------------------------------------------------

class _Transposed(nn.Module):
    """y = x @ W.t().contiguous() + b, W [out, in]: nn.Linear written by hand."""

    def __init__(self, fin, fout):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fout, fin) / fin ** 0.5)
        self.bias = nn.Parameter(torch.randn(fout) / 10)

    def forward(self, x):
        return x @ self.weight.t().contiguous() + self.bias


class _Permuted(_Transposed):
    """y = matmul(x, W.permute(1, 0))."""

    def forward(self, x):
        return torch.matmul(x, self.weight.permute(1, 0))


class _Batched(nn.Module):
    """y = bmm(x, W expanded over the batch), W stored [in, out]."""

    def __init__(self, fin, fout):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fin, fout) / fin ** 0.5)

    def forward(self, x):
        return torch.bmm(x, self.weight.unsqueeze(0).expand(x.shape[0], -1, -1))


class _Chains(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.mix, self.down = _Transposed(16, 24), _Batched(24, 20), _Permuted(20, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.down(torch.relu(self.mix(torch.relu(self.up(x))))))


def _linear_twin(chains):
    """The same model written with nn.Linear, which PEFT's LoRA takes."""
    twin = nn.Module()
    for name, transposed in (("up", False), ("mix", True), ("down", False)):
        source = getattr(chains, name)
        w = source.weight.detach()
        layer = nn.Linear(w.shape[0] if transposed else w.shape[1], w.shape[1] if transposed else w.shape[0],
                          bias=hasattr(source, "bias") and name == "up")
        layer.weight.data = (w.T if transposed else w).clone()
        if name == "up":
            layer.bias.data = source.bias.detach().clone()
        setattr(twin, name, layer)
    twin.head = copy.deepcopy(chains.head)
    twin.forward = lambda x: twin.head(twin.down(torch.relu(twin.mix(torch.relu(twin.up(x))))))
    return twin


def test_weight_matmuls_through_transpose_permute_and_batch_broadcast_are_lora_sites():
    import peft

    model = _Chains().eval()
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    cfg = dict(r=4, lora_alpha=8, target_modules=["up", "mix", "down"], init_lora_weights=False)
    torch.manual_seed(0)
    ours = graphpeft.rewrite(model, graphpeft.LoraConfig(**cfg), example_inputs=(x,)).eval()
    kinds = {r.module_path: r.kind for r in ours.records}
    assert kinds == {"up": "linear", "mix": "mm", "down": "linear"}
    twin = _linear_twin(model)
    pm = peft.get_peft_model(twin, peft.LoraConfig(**cfg)).eval()
    with torch.no_grad():
        for name in ("up", "mix", "down"):
            for part in ("lora_A", "lora_B"):
                mine = get_attr_path(ours.graph_module, f"{name}.{part}.default.weight")
                getattr(getattr(pm.base_model.model, name), part)["default"].weight.copy_(mine)
        got, expected = ours(x), pm(x)
        base = model(x)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (got - base).abs().max() > 1e-3
    merged = ours.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), got, atol=ATOL, rtol=0)
    all_linear = graphpeft.rewrite(_Chains().eval(), graphpeft.LoraConfig(target_modules="all-linear"),
                                   example_inputs=(x,))
    assert {r.module_path for r in all_linear.records} == {"up", "mix", "down"}        # the head left out


# -- attention with an additive bias (ALiBi) and scores of rank 3 --------------------------------------------

def _bloom():
    torch.manual_seed(0)
    return tf.BloomForCausalLM(tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=100,
                                              hidden_dropout=0.0, attention_dropout=0.0)).eval()


def _copy_lora_into_peft(ours, pm):
    """PEFT's LoRA weights set to graphpeft's, site by site."""
    for path in pm.targeted_module_names:
        layer = pm.base_model.model.get_submodule(path)
        for part in ("lora_A", "lora_B"):
            getattr(layer, part)["default"].weight.copy_(get_attr_path(ours.graph_module, f"{path}.{part}.default.weight"))


def test_alibi_attention_is_found_and_lora_defaults_equal_peft_s_table_on_bloom():
    """BLOOM scores with baddbmm(alibi, q, k) on [batch*heads, q, k]: the attention sites are found, so LoRA's
    default targets (the projections feeding q and v) are query_key_value, PEFT's table entry for bloom."""
    import peft

    model = _bloom()
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["attention_mask"][0, :2] = 0
    gm = graphpeft.capture(model, example_inputs=batch)
    assert len(attention_sites(gm)) == 2
    cfg = dict(task_type="CAUSAL_LM", init_lora_weights=False)
    torch.manual_seed(0)
    ours = graphpeft.rewrite(gm, graphpeft.LoraConfig(**cfg)).eval()
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg)).eval()
    assert sorted(r.module_path for r in ours.records) == sorted(pm.targeted_module_names) == [
        f"transformer.h.{i}.self_attention.query_key_value" for i in range(2)]
    with torch.no_grad():
        _copy_lora_into_peft(ours, pm)
        torch.testing.assert_close(ours(**batch).logits, pm(**batch).logits, atol=ATOL, rtol=0)


def test_falcon_weights_read_through_numpy_T_are_sites_and_lora_defaults_equal_peft_s_table():
    """FalconLinear computes x @ W.T (aten.numpy_T): its projections are linear sites, the attention behind
    the index-split fused qkv is found, and LoRA's defaults are query_key_value as in PEFT's table."""
    import peft
    from tests.grid_models import tiny_falcon

    model = tiny_falcon().eval()
    ids = torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    cfg = dict(task_type="CAUSAL_LM", init_lora_weights=False)
    torch.manual_seed(0)
    ours = graphpeft.rewrite(model, graphpeft.LoraConfig(**cfg)).eval()
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg)).eval()
    assert sorted(r.module_path for r in ours.records) == sorted(pm.targeted_module_names)
    assert all(p.endswith("query_key_value") for p in pm.targeted_module_names)
    with torch.no_grad():
        _copy_lora_into_peft(ours, pm)
        torch.testing.assert_close(ours(**batch).logits, pm(**batch).logits, atol=ATOL, rtol=0)
        merged = ours.merge_and_unload()
        torch.testing.assert_close(merged(**batch).logits, pm(**batch).logits, atol=ATOL, rtol=0)


def test_a_weight_cast_to_another_dtype_is_a_site_whose_branch_runs_in_the_weight_s_dtype():
    """x @ W^T.to(float64) with a float32 W: a LoRA site. The branch runs as PEFT's LoRA layer runs on activations
    of another dtype than its weights: x cast to the adapter's dtype (W's), B A x s cast back and added. The oracle
    is that formula written out; merging gives W + s B A, cast on its way as before."""

    class Proj(nn.Module):
        def __init__(self, dtype):
            super().__init__()
            self.weight, self.dtype = nn.Parameter(torch.randn(8, 8)), dtype

        def forward(self, x):
            return x @ self.weight.t().to(self.dtype)

    class Model(nn.Module):
        def __init__(self, dtype):
            super().__init__()
            self.proj, self.head = Proj(dtype), nn.Linear(8, 2).to(dtype)

        def forward(self, x):
            return self.head(torch.relu(self.proj(x)))

    cfg = graphpeft.LoraConfig(target_modules=["proj"], init_lora_weights=False, r=4, lora_alpha=8)
    model = Model(torch.float64)
    x = torch.randn(3, 8, dtype=torch.float64)
    ours = graphpeft.rewrite(model, cfg, example_inputs=(x,))
    assert [r.module_path for r in ours.records] == ["proj"]
    a, b = (p.detach() for n, p in ours.named_parameters() if "lora_" in n)
    assert a.dtype == b.dtype == torch.float32
    branch = ((x.float() @ a.T @ b.T) * 2.0).double()
    expected = model.head(torch.relu(x @ model.proj.weight.t().double() + branch))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(ours.merge_and_unload()(x), expected, atol=1e-5, rtol=0)
    with pytest.raises(graphpeft.GraphPeftError, match="cast to torch.float64 on its way"):
        graphpeft.rewrite(Model(torch.float64), graphpeft.LoraConfig(target_modules=["proj"], use_dora=True),
                          example_inputs=(x,))
