"""LoRA against the oracle, Hugging Face PEFT: same weights, same outputs, both ways through the file format."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

import graphpeft

ATOL = 1e-5


def _llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


def _bert_cls():
    return BertForSequenceClassification(BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=40, num_labels=3))


def _qwen2():
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


# name -> (builder, LoraConfig fields shared by PEFT and graphpeft)
CASES = {
    "llama": (_llama, dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "embed_tokens"], r=4, lora_alpha=8)),
    "gpt2": (_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "bert": (_bert_cls, dict(task_type="SEQ_CLS", target_modules=["query", "value"], rank_pattern={"value": 4},
                             alpha_pattern={"query": 16})),
    "qwen2": (_qwen2, dict(target_modules="all-linear", use_rslora=True, r=6)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    builder, fields = CASES[request.param]
    torch.manual_seed(0)
    model = builder().eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0                       # padding in one row
    return request.param, model, fields, {"input_ids": ids, "attention_mask": mask}


def _peft_model(model, fields, init=False):
    torch.manual_seed(2)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(init_lora_weights=init, **fields))
    with torch.no_grad():                 # a trained-looking head copy, so modules_to_save is exercised
        for name, p in pm.named_parameters():
            if ".modules_to_save." in name:
                p.add_(0.25)
    return pm.eval()


def _graphpeft_model(model, fields, init=False):
    torch.manual_seed(3)
    gm = graphpeft.rewrite(copy.deepcopy(model), graphpeft.LoraConfig(init_lora_weights=init, **fields)).eval()
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if ".modules_to_save." in name:
                p.add_(0.25)
    return gm


def test_peft_adapter_loads_into_graphpeft_with_same_logits(case, tmp_path):
    name, model, fields, batch = case
    pm = _peft_model(model, fields)
    pm.save_pretrained(tmp_path)
    gm = graphpeft.from_pretrained(copy.deepcopy(model), tmp_path)
    want = pm(**batch).logits
    assert not torch.allclose(want, model(**batch).logits, atol=1e-3), "the adapter must change the outputs"
    torch.testing.assert_close(gm(**batch).logits, want, atol=ATOL, rtol=0)


def test_graphpeft_adapter_loads_into_peft_with_same_logits(case, tmp_path):
    name, model, fields, batch = case
    gm = _graphpeft_model(model, fields)
    gm.save_pretrained(tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    want = gm(**batch).logits
    assert not torch.allclose(want, model(**batch).logits, atol=1e-3)
    torch.testing.assert_close(pm(**batch).logits, want, atol=ATOL, rtol=0)


def test_saved_files_have_peft_keys_and_shapes(case, tmp_path):
    name, model, fields, batch = case
    _graphpeft_model(model, fields).save_pretrained(tmp_path / "g")
    _peft_model(model, fields).save_pretrained(tmp_path / "p")
    ours, theirs = load_file(tmp_path / "g/adapter_model.safetensors"), load_file(tmp_path / "p/adapter_model.safetensors")
    # PEFT also stores the full weight of a targeted embedding (".base_layer."); graphpeft keeps adapters small
    theirs = {k: v for k, v in theirs.items() if ".base_layer." not in k}
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    config = json.loads((tmp_path / "g/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == fields.get("r", 8)


def test_merge_and_unload_matches_unmerged(case):
    name, model, fields, batch = case
    gm = _graphpeft_model(model, fields)
    merged = gm.merge_and_unload()
    assert type(merged) is type(model), "merged into the model's own transformers class"
    assert not any("graphpeft" in n.meta for n in gm.merged_graph().graph_module.graph.nodes), "merged graph has no adapter nodes"
    assert not any("lora_" in k for k, _ in merged.named_parameters())
    torch.testing.assert_close(merged(**batch).logits, gm(**batch).logits, atol=ATOL, rtol=0)
    with gm.disable_adapter():            # merging did not touch the base weights
        torch.testing.assert_close(gm(**batch).logits, model(**batch).logits, atol=ATOL, rtol=0)


def test_save_then_load_is_exact(case, tmp_path):
    name, model, fields, batch = case
    gm = _graphpeft_model(model, fields)
    gm.save_pretrained(tmp_path)
    again = graphpeft.from_pretrained(copy.deepcopy(model), tmp_path)
    saved = dict(gm.named_parameters())
    for k, v in again.named_parameters():
        assert torch.equal(v, saved[k]), k
    assert torch.equal(again(**batch).logits, gm(**batch).logits)


def test_trainable_parameter_counts_equal_peft(case):
    name, model, fields, batch = case
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**fields))
    gm = graphpeft.rewrite(copy.deepcopy(model), graphpeft.LoraConfig(**fields))
    assert gm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()


def test_default_init_starts_at_the_base_model(case):
    name, model, fields, batch = case
    gm = graphpeft.rewrite(copy.deepcopy(model), graphpeft.LoraConfig(**fields)).eval()
    torch.testing.assert_close(gm(**batch).logits, model(**batch).logits, atol=ATOL, rtol=0)


# -- a layer PEFT cannot target as a module: a bare parameter used in einsum -----------------------

class Mix(nn.Module):
    """Not an nn.Linear: its projection is a parameter used in einsum."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim_out, dim_in) / dim_in ** 0.5)

    def forward(self, x):
        return torch.einsum("bsi,oi->bso", x, self.weight)


class EinsumNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.mix = Mix(16, 12)
        self.out = nn.Linear(12, 4)

    def forward(self, x):
        return self.out(torch.relu(self.mix(torch.relu(self.inp(x)))))


@pytest.fixture(scope="module")
def einsum_net():
    torch.manual_seed(0)
    return EinsumNet().eval(), torch.randn(3, 5, 6)


def test_peft_refuses_the_einsum_layer_and_all_linear_skips_it(einsum_net):
    net, x = einsum_net
    with pytest.raises(ValueError, match="not supported"):
        peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(target_modules=["mix"]))
    pm = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(target_modules="all-linear"))
    assert not any(n.startswith("base_model.model.mix.lora") for n, _ in pm.named_parameters())


@pytest.mark.parametrize("targets", [["mix"], ["mix.weight"]])
def test_graphpeft_finds_the_einsum_site_by_op_and_merges_it(einsum_net, targets):
    net, x = einsum_net
    gm = graphpeft.rewrite(copy.deepcopy(net), graphpeft.LoraConfig(target_modules=targets, init_lora_weights=False),
                           example_inputs=(x,)).eval()
    assert [(r.module_path, r.kind) for r in gm.records] == [("mix", "einsum")]
    assert not torch.allclose(gm(x), net(x), atol=1e-4)
    torch.testing.assert_close(gm.merge_and_unload()(x), gm(x), atol=ATOL, rtol=0)


def test_target_parameters_matches_peft_both_ways(einsum_net, tmp_path):
    net, x = einsum_net
    fields = dict(target_modules=None, target_parameters=["mix.weight"], init_lora_weights=False)
    torch.manual_seed(4)
    pm = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(**fields)).eval()
    pm.save_pretrained(tmp_path / "p")
    ours = graphpeft.from_pretrained(copy.deepcopy(net), tmp_path / "p", example_inputs=(x,))
    torch.testing.assert_close(ours(x), pm(x), atol=ATOL, rtol=0)
    gm = graphpeft.rewrite(copy.deepcopy(net), graphpeft.LoraConfig(**fields), example_inputs=(x,)).eval()
    gm.save_pretrained(tmp_path / "g")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path / "g").eval()
    torch.testing.assert_close(theirs(x), gm(x), atol=ATOL, rtol=0)
    assert gm.get_nb_trainable_parameters()[0] == pm.get_nb_trainable_parameters()[0]


class MixTransposed(Mix):
    """The parameter reaches einsum through a transpose (and, in float64, a cast): still the parameter's site."""

    def forward(self, x):
        return torch.einsum("bsi,io->bso", x, self.weight.t().to(x.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_einsum_on_a_transposed_or_cast_parameter_matches_peft_target_parameters(dtype, tmp_path):
    """PEFT's target_parameters patches the parameter wherever it is read: W + s B A, then the transpose and cast."""
    torch.manual_seed(5)
    net = EinsumNet()
    net.mix = MixTransposed(16, 12)
    net = net.to(dtype).eval()
    net.mix.weight.data = net.mix.weight.data.float()     # float32 weight, cast to the activations' dtype
    x = torch.randn(3, 5, 6, dtype=dtype)
    fields = dict(target_modules=None, target_parameters=["mix.weight"], init_lora_weights=False)
    gm = graphpeft.rewrite(copy.deepcopy(net), graphpeft.LoraConfig(**fields), example_inputs=(x,)).eval()
    assert [(r.module_path, r.kind) for r in gm.records] == [("mix", "einsum")]
    gm.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path).eval()
    with torch.no_grad():
        ours = gm(x)
        torch.testing.assert_close(ours, theirs(x), atol=ATOL, rtol=0)
        assert not torch.allclose(ours, net(x), atol=1e-3)
        torch.testing.assert_close(gm.merge_and_unload()(x), ours, atol=ATOL, rtol=0)


def test_tied_embedding_merges_into_its_own_copy(tmp_path):
    """GPT-2 ties wte to lm_head: the graph reads one parameter at two sites; only the embedding is adapted."""
    torch.manual_seed(0)
    model = _gpt2().eval()
    ids = torch.randint(0, 96, (2, 7))
    gm = graphpeft.rewrite(copy.deepcopy(model), graphpeft.LoraConfig(target_modules=["wte"], init_lora_weights=False)).eval()
    assert [(r.module_path, r.kind) for r in gm.records] == [("transformer.wte", "embedding")]
    merged = gm.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).logits, gm(input_ids=ids).logits, atol=ATOL, rtol=0)
    gm.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    torch.testing.assert_close(theirs(input_ids=ids).logits, gm(input_ids=ids).logits, atol=ATOL, rtol=0)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.c3 = nn.Conv1d(8, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.head(self.c3(h.flatten(2)).mean(-1))


def test_conv_sites_match_peft_both_ways_and_merge(tmp_path):
    torch.manual_seed(0)
    net, x = SmallCNN().eval(), torch.randn(2, 3, 8, 8)
    fields = dict(target_modules=["c1", "c2", "c3"], r=4, init_lora_weights=False)
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(**fields)).eval()
    pm.save_pretrained(tmp_path / "p")
    ours = graphpeft.from_pretrained(copy.deepcopy(net), tmp_path / "p", example_inputs=(x,))
    assert [r.kind for r in ours.records] == ["conv"] * 3
    assert not torch.allclose(pm(x), net(x), atol=1e-3)
    torch.testing.assert_close(ours(x), pm(x), atol=ATOL, rtol=0)
    gm = graphpeft.rewrite(copy.deepcopy(net), graphpeft.LoraConfig(**fields), example_inputs=(x,)).eval()
    gm.save_pretrained(tmp_path / "g")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path / "g").eval()
    torch.testing.assert_close(theirs(x), gm(x), atol=ATOL, rtol=0)
    torch.testing.assert_close(gm.merge_and_unload()(x), gm(x), atol=ATOL, rtol=0)
    assert gm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_training_steps_follow_peft_with_dropout_on(arch, tmp_path):
    """Train mode, model dropout and lora_dropout on, same seeds: 4 AdamW steps give PEFT's losses and adapters.

    The inserted dropout sits right after its anchor, where PEFT's lora.Linear draws its mask, so even
    the random streams line up.
    """
    from tests.models import tiny_bert_cls, tiny_llama

    model = (tiny_bert_cls if arch == "bert" else tiny_llama)()
    targets = ["query", "value"] if arch == "bert" else ["q_proj", "v_proj", "gate_proj"]
    fields = dict(target_modules=targets, lora_dropout=0.1, init_lora_weights=False,
                  task_type="SEQ_CLS" if arch == "bert" else None)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**fields))
    pm.save_pretrained(tmp_path)
    gm = graphpeft.from_pretrained(copy.deepcopy(model), tmp_path, is_trainable=True)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (4, 9), generator=gen)
    labels = torch.tensor([0, 1, 1, 0]) if arch == "bert" else ids
    losses = {}
    for name, m in (("peft", pm), ("graphpeft", gm)):
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        torch.manual_seed(7)
        losses[name] = []
        for _ in range(4):
            loss = m(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    assert losses["graphpeft"] == pytest.approx(losses["peft"], abs=1e-6)
    assert losses["peft"][-1] < losses["peft"][0]
    theirs = {k.replace("base_model.model.", "").replace(".default", ""): p
              for k, p in pm.named_parameters() if p.requires_grad}
    ours = {k.replace("graph_module.", "").replace(".default", ""): p for k, p in gm.named_parameters() if p.requires_grad}
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=0)


class Twice(nn.Module):
    """One projection applied twice (weight sharing across depth, as ALBERT does)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.proj(torch.tanh(self.proj(x)))))


def test_a_module_called_twice_shares_one_adapter_as_in_peft(tmp_path):
    torch.manual_seed(0)
    net, x = Twice().eval(), torch.randn(4, 8)
    fields = dict(target_modules=["proj"], init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(**fields)).eval()
    pm.save_pretrained(tmp_path)
    gm = graphpeft.from_pretrained(copy.deepcopy(net), tmp_path, example_inputs=(x,))
    assert [r.module_path for r in gm.records] == ["proj", "proj"]
    assert len({tuple(r.params) for r in gm.records}) == 1, "both sites read the same adapter parameters"
    torch.testing.assert_close(gm(x), pm(x), atol=ATOL, rtol=0)
    torch.testing.assert_close(gm.merge_and_unload()(x), gm(x), atol=ATOL, rtol=0)
    fresh = graphpeft.rewrite(copy.deepcopy(net), graphpeft.LoraConfig(**fields), example_inputs=(x,))
    assert fresh.get_nb_trainable_parameters() == peft.get_peft_model(
        copy.deepcopy(net), peft.LoraConfig(**fields)).get_nb_trainable_parameters()


def test_a_lora_site_inside_a_module_to_save_keeps_its_lora_weights(tmp_path):
    """SEQ_CLS saves "classifier" whole, and PEFT's suffix match takes DistilBERT's pre_classifier too, which
    all-linear also gives LoRA. PEFT refuses the pair (TypeError: modules_to_save cannot be applied to a LoRA
    layer); graphpeft trains both: the copy of pre_classifier's own weights, and LoRA on it, saved and
    reloaded intact."""
    from tests.models import tiny_distilbert

    model = tiny_distilbert()
    config = dict(task_type="SEQ_CLS", target_modules="all-linear")
    with pytest.raises(TypeError, match="modules_to_save cannot be applied"):
        peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config))
    ours = graphpeft.rewrite(copy.deepcopy(model), graphpeft.LoraConfig(**config, init_lora_weights=False))
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad and "pre_classifier" in n}
    assert any(".lora_A." in n for n in trainable) and any(".modules_to_save." in n for n in trainable)
    ours.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.model.pre_classifier.lora_A.weight", "base_model.model.pre_classifier.lora_B.weight",
            "base_model.model.pre_classifier.weight", "base_model.model.classifier.weight"} <= keys
    ids = torch.randint(3, 50, (2, 7))
    again = graphpeft.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, ours.eval()(input_ids=ids).logits, atol=1e-6, rtol=0)
