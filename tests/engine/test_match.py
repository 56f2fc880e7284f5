"""graphpeft.engine.match: site selection with PEFT's target_modules semantics, checked against PEFT itself.

The oracle is ``peft.get_peft_model``: for the same LoraConfig fields, the trainable parameters
(name -> shape) of PEFT's model and of graphpeft's rewritten graph must be the same, and so must
the per-site scaling. Each architecture is captured once; every case rewrites a deep copy.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import graphpeft
from graphpeft.engine.match import LINEAR_KINDS, attention_sites, find_sites, select_sites
from graphpeft.engine.rewriter import get_attr_path
from tests.models import BUILDERS, EinsumModel, inputs_for

peft = pytest.importorskip("peft", reason="PEFT is the test oracle (pip install peft)")
from peft.tuners.lora import LoraLayer  # noqa: E402


@pytest.fixture(scope="module")
def graphs():
    """(arch, attn_implementation) -> (eager model, captured graph), built on first use."""
    cache: dict = {}

    def get(arch: str, attn: str = "sdpa"):
        if (arch, attn) not in cache:
            model = BUILDERS[arch](attn_implementation=attn)
            cache[arch, attn] = (model, graphpeft.capture(model))
        return cache[arch, attn]

    return get


def peft_model(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kw))


def peft_trainable(model, **kw) -> dict[str, tuple]:
    pm = peft_model(model, **kw)
    return {n.removeprefix("base_model.model."): tuple(p.shape) for n, p in pm.named_parameters() if p.requires_grad}


def peft_scaling(model, **kw) -> dict[str, float]:
    pm = peft_model(model, **kw)
    return {n.removeprefix("base_model.model."): m.scaling["default"] for n, m in pm.named_modules()
            if isinstance(m, LoraLayer)}


def gp_rewrite(gm, **kw) -> graphpeft.GraphPeftModel:
    return graphpeft.rewrite(copy.deepcopy(gm), graphpeft.LoraConfig(**kw))


def gp_trainable(gm, **kw) -> dict[str, tuple]:
    model = gp_rewrite(gm, **kw)
    return {n.removeprefix("graph_module."): tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def lora_paths(model: graphpeft.GraphPeftModel) -> set[str]:
    return {r.module_path for r in model.records if r.rule == "lora"}


# -- target_modules / exclude_modules / layers / patterns, against PEFT ---------------------------

CASES = [
    # list: exact key or suffix ".name"
    ("llama", dict(target_modules=["q_proj", "down_proj"])),
    ("llama", dict(target_modules=["model.layers.0.self_attn.k_proj"])),
    ("llama", dict(target_modules=["self_attn.o_proj"])),
    # str: full regex match
    ("llama", dict(target_modules=r".*\.(q|v)_proj")),
    ("llama", dict(target_modules=r"model\.layers\.1\.mlp\.\w+_proj")),
    # exclude_modules, list and regex
    ("llama", dict(target_modules="all-linear", exclude_modules=["o_proj", "mlp.up_proj"])),
    ("llama", dict(target_modules=["q_proj", "v_proj"], exclude_modules=r".*layers\.1\..*")),
    # layers_to_transform / layers_pattern
    ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    ("llama", dict(target_modules=["q_proj", "down_proj"], layers_to_transform=0, layers_pattern="layers")),
    ("whisper", dict(target_modules=["q_proj", "fc1"], layers_to_transform=[1], layers_pattern="layers")),
    # rank_pattern / alpha_pattern (shapes here, scaling below)
    ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4,
                   rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}, alpha_pattern={"down_proj": 32})),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"], r=4, rank_pattern={"c_fc": 2}, alpha_pattern={"c_attn": 16})),
    # embedding sites
    ("llama", dict(target_modules=["embed_tokens", "q_proj"])),
    # modules_to_save, explicit and implied by task_type SEQ_CLS
    ("bert", dict(target_modules=["query", "value"], modules_to_save=["pooler"])),
    ("bert", dict(target_modules=["query", "value", "dense"], task_type="SEQ_CLS")),
    ("roberta", dict(target_modules=["query", "value", "dense"], task_type="SEQ_CLS")),
    # all-linear leaves the output head alone
    ("llama", dict(target_modules="all-linear", task_type="CAUSAL_LM")),
    ("gpt2", dict(target_modules="all-linear", task_type="CAUSAL_LM")),
    ("bert", dict(target_modules="all-linear", task_type="SEQ_CLS")),
    ("roberta", dict(target_modules="all-linear", task_type="SEQ_CLS")),
    ("t5", dict(target_modules="all-linear", task_type="SEQ_2_SEQ_LM")),
]


@pytest.mark.parametrize("arch,kw", CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CASES)])
def test_trainable_parameters_equal_peft(graphs, arch, kw):
    model, gm = graphs(arch)
    expected = peft_trainable(model, **kw)
    assert expected, "the PEFT oracle selected nothing: the case is meaningless"
    assert gp_trainable(gm, **kw) == expected


@pytest.mark.parametrize("kw", [
    dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8,
         rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}, alpha_pattern={"down_proj": 32}),
    dict(target_modules=["q_proj", "up_proj"], r=4, lora_alpha=16, use_rslora=True),
], ids=["patterns", "rslora"])
def test_rank_and_alpha_pattern_scaling_equal_peft(graphs, kw):
    model, gm = graphs("llama")
    rewritten = gp_rewrite(gm, **kw)
    got = {r.module_path: r.info["scaling"] for r in rewritten.records}
    expected = peft_scaling(model, **kw)
    assert got == pytest.approx(expected)
    assert len(set(expected.values())) > 1 or kw.get("use_rslora")
    for rec in rewritten.records:
        r = rec.info["r"]
        a = next(v for k, v in rec.params.items() if ".lora_A." in k)
        b = next(v for k, v in rec.params.items() if ".lora_B." in k)
        assert a[0] == r and b[1] == r


@pytest.mark.parametrize("arch,head", [("llama", "lm_head"), ("gpt2", "lm_head"), ("bert", "classifier"),
                                       ("roberta", "classifier")])
def test_all_linear_excludes_output_head(graphs, arch, head):
    model, gm = graphs(arch)
    rewritten = gp_rewrite(gm, target_modules="all-linear",
                           task_type="SEQ_CLS" if head == "classifier" else "CAUSAL_LM")
    paths = lora_paths(rewritten)
    assert paths and not any(p == head or p.startswith(head + ".") for p in paths)
    n_linear = sum(isinstance(m, (torch.nn.Linear,)) or type(m).__name__ == "Conv1D" for m in model.modules())
    head_linears = sum(isinstance(m, torch.nn.Linear) for m in model.get_submodule(head).modules())
    assert len(paths) == n_linear - head_linears


def test_output_heads_are_found_in_the_graph_without_a_task_type():
    """The head is the linear op whose result reaches the output through shape ops (and the index a
    decoder classifier uses to pick the last non-pad position)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from graphpeft.engine.match import output_heads

    llama_cls = LlamaForSequenceClassification(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48,
                                                           num_hidden_layers=1, num_attention_heads=4,
                                                           num_key_value_heads=2, pad_token_id=0, num_labels=3))
    assert output_heads(graphpeft.capture(llama_cls)) == ["score"]
    assert output_heads(graphpeft.capture(BUILDERS["bert"]())) == ["classifier"]
    assert output_heads(graphpeft.capture(BUILDERS["gpt2"]())) == ["lm_head"]


@pytest.mark.parametrize("targets", ["q_proj", ["proj"], ["q"]])
def test_no_partial_matches_like_peft(graphs, targets):
    """A str is a full regex match and list entries match whole dotted names: PEFT and graphpeft both find nothing."""
    model, gm = graphs("llama")
    with pytest.raises(ValueError):
        peft_model(model, target_modules=targets)
    with pytest.raises(graphpeft.NoMatchError):
        gp_rewrite(gm, target_modules=targets)


# -- GPT-2's Conv1D --------------------------------------------------------------------------------

def test_gpt2_conv1d_sites_are_addmm_with_in_out_weight(graphs):
    model, gm = graphs("gpt2")
    sites = [s for s in find_sites(gm) if s.module_path.endswith(".attn.c_attn")]
    assert len(sites) == model.config.n_layer
    for s in sites:
        conv = model.get_submodule(s.module_path)
        assert type(conv).__name__ == "Conv1D"
        assert s.kind == "addmm"
        assert tuple(get_attr_path(gm, s.weight_name).shape) == (32, 96) == tuple(conv.weight.shape)
        assert (s.in_features, s.out_features) == (32, 96)
    rewritten = gp_rewrite(gm, target_modules=["c_attn"])
    for rec in rewritten.records:
        assert rec.kind == "addmm" and rec.info["layout"] == "in_out"
        assert sorted(rec.params.values()) == [(8, 32), (96, 8)]


# -- a bare parameter in einsum ----------------------------------------------------------------------

@pytest.fixture(scope="module", params=["symbolic_trace", "export"])
def einsum_graph(request):
    model = EinsumModel()
    example = None if request.param == "symbolic_trace" else (EinsumModel.example(),)
    gm = graphpeft.capture(model, example)
    assert gm.meta["graphpeft.capture"].mode == request.param
    return model, gm


@pytest.mark.parametrize("kw", [dict(target_modules=["mix"]), dict(target_modules=["mix.weight"]),
                                dict(target_modules="mix"), dict(target_parameters=["mix.weight"])],
                         ids=["module", "parameter", "regex", "target_parameters"])
def test_einsum_parameter_site(einsum_graph, kw):
    model, gm = einsum_graph
    rewritten = gp_rewrite(gm, **kw)
    assert [(r.kind, r.module_path) for r in rewritten.records] == [("einsum", "mix")]
    trainable = {n.removeprefix("graph_module."): tuple(p.shape)
                 for n, p in rewritten.named_parameters() if p.requires_grad}
    assert trainable == peft_trainable(model, target_parameters=["mix.weight"])


def test_einsum_parameter_site_computes_like_peft(einsum_graph):
    """With the same (non-zero) adapter weights, graphpeft's einsum site gives PEFT's target_parameters output."""
    model, gm = einsum_graph
    pm = peft_model(model, target_parameters=["mix.weight"], r=4, lora_alpha=8)
    ours = gp_rewrite(gm, target_parameters=["mix.weight"], r=4, lora_alpha=8)
    peft_params = dict(pm.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                key = "base_model.model." + name.removeprefix("graph_module.")
                p.copy_(torch.randn_like(p))
                peft_params[key].copy_(p)
    x = EinsumModel.example(batch=3, seed=1)        # float inputs: only the batch dim is dynamic
    with torch.no_grad():
        got, expected, base = ours(x), pm(x), model(x)
    assert not torch.allclose(got, base)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# -- default targets: the projections feeding query and value of attention ---------------------------

PEFT_TABLE = {"llama": ("q_proj", "v_proj"), "gpt2": ("c_attn",), "bert": ("query", "value")}
# PEFT has no default for these; graphpeft finds them in the graph. (transformers 5 names ViT's
# projections q_proj / v_proj; whisper's include the decoder's cross-attention encoder_attn.)
GRAPH_ONLY = {"distilbert": ("q_lin", "v_lin"), "vit": ("q_proj", "v_proj"), "whisper": ("q_proj", "v_proj")}


def _modules_named(model, names) -> set[str]:
    return {n for n, _ in model.named_modules() if n.rpartition(".")[2] in names}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", sorted(PEFT_TABLE))
def test_default_targets_equal_peft_table(graphs, arch, attn):
    model, gm = graphs(arch, attn)
    assert {s.kind for s in attention_sites(gm)} == {attn}
    expected = {n.removeprefix("base_model.model.") for n, m in peft_model(model).named_modules()
                if isinstance(m, LoraLayer)}
    assert expected == _modules_named(model, PEFT_TABLE[arch])
    assert lora_paths(gp_rewrite(gm)) == expected


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", sorted(GRAPH_ONLY))
def test_default_targets_found_where_peft_has_none(graphs, arch, attn):
    model, gm = graphs(arch, attn)
    assert {s.kind for s in attention_sites(gm)} == {attn}
    with pytest.raises(ValueError, match="target_modules"):
        peft_model(model)
    expected = _modules_named(model, GRAPH_ONLY[arch])
    if arch == "whisper":
        assert any(".encoder_attn." in p for p in expected)
    assert len(expected) == 2 * len(attention_sites(gm))
    assert lora_paths(gp_rewrite(gm)) == expected


def test_default_targets_respect_exclude_and_layers(graphs):
    model, gm = graphs("llama")
    kw = dict(exclude_modules=["v_proj"], layers_to_transform=[0])
    assert lora_paths(gp_rewrite(gm, **kw)) == {"model.layers.0.self_attn.q_proj"}
    assert set(peft_scaling(model, **kw)) == {"model.layers.0.self_attn.q_proj"}


# -- select_sites on a graph, without rewriting -------------------------------------------------------

def test_select_sites_is_read_only(graphs):
    _, gm = graphs("bert")
    before = [(n.name, n.target, n.args) for n in gm.graph.nodes]
    sites = select_sites(gm, graphpeft.LoraConfig(target_modules="all-linear"), LINEAR_KINDS)
    assert sites and all(s.kind == "linear" for s in sites)
    assert [(n.name, n.target, n.args) for n in gm.graph.nodes] == before


def test_modules_to_save_trains_a_copy(graphs):
    model, gm = graphs("bert")
    rewritten = gp_rewrite(gm, target_modules=["query"], modules_to_save=["classifier"])
    saved = [r for r in rewritten.records if r.rule == "modules_to_save"]
    assert [r.module_path for r in saved] == ["classifier"]
    assert set(saved[0].params) == {"classifier.modules_to_save.default.weight", "classifier.modules_to_save.default.bias"}
    params = dict(rewritten.graph_module.named_parameters())
    assert not params["classifier.weight"].requires_grad
    assert params["classifier.modules_to_save.default.weight"].requires_grad
    with torch.no_grad():
        params["classifier.modules_to_save.default.bias"].add_(1.0)
        x = inputs_for(model, 2, 5)
        torch.testing.assert_close(rewritten(**x).logits, model(**x).logits + 1.0)
