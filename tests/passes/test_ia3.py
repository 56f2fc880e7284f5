"""(IA)^3 against the oracle, Hugging Face PEFT: same vectors, same outputs, both ways through the file format;
graph-derived default sites; merge; training; the command line."""

from __future__ import annotations

import copy
import functools
import json

import peft
import pytest
import torch
from peft.tuners.ia3 import IA3Layer
from safetensors.torch import load_file
from torch import nn

import graphpeft
from graphpeft.cli import commands as cli
from graphpeft.engine.errors import GraphPeftError
from graphpeft.passes import IA3Pass
from tests.models import (inputs_for, tiny_bart, tiny_bert_cls, tiny_distilbert, tiny_gpt2, tiny_llama, tiny_vit,
                          tiny_whisper)

ATOL = 1e-5

# name -> (builder, IA3Config fields shared by PEFT and graphpeft)
CASES = {
    "llama": (tiny_llama, dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                             fan_in_fan_out=True)),
    # PEFT's feed-forward match is a plain suffix: "output.dense" also scales attention.output.dense's input
    "bert": (tiny_bert_cls, dict(task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"],
                                 feedforward_modules=["output.dense"])),
    "bart": (tiny_bart, dict(target_modules=r".*(self_attn|encoder_attn)\.(k_proj|v_proj)|.*\.fc2",
                             feedforward_modules=r".*\.fc2")),
}


@functools.lru_cache(maxsize=None)
def _captured(builder):
    """(model, its captured graph), once per builder: each use rewrites a copy of the graph.

    transformers initialises biases to zero; they are made non-zero so that merging must scale them."""
    model = builder()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model, graphpeft.capture(model)


def _model_and_graph(builder):
    model, gm = _captured(builder)
    return model, copy.deepcopy(gm)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _perturb(model, seed):
    """Vectors away from ones (init is ones) and a trained-looking head copy, seeded."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".ia3_l" in name:
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=gen))
            elif ".modules_to_save." in name:
                p.add_(0.25)
    return model.eval()


def _peft_sites(pm) -> dict[str, bool]:
    """{module path: scales its input} of a PEFT IA3 model."""
    return {name: mod.is_feedforward for name, mod in pm.base_model.model.named_modules() if isinstance(mod, IA3Layer)}


def _our_sites(gm) -> dict[str, bool]:
    return {r.module_path: r.info["feedforward"] for r in gm.records if r.rule == "ia3"}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    builder, fields = CASES[request.param]
    model, _ = _captured(builder)
    return builder, model, fields, inputs_for(model, batch=2, seq=7, pad=2)


def test_graphpeft_adapter_starts_at_the_base_loads_into_peft_and_merges(case, tmp_path):
    builder, model, fields, batch = case
    base = _logits(model, batch)
    gm = graphpeft.rewrite(_model_and_graph(builder)[1], graphpeft.IA3Config(**fields)).eval()
    torch.testing.assert_close(_logits(gm, batch), base, atol=ATOL, rtol=0)     # ones: the base model
    pm = peft.get_peft_model(copy.deepcopy(model), peft.IA3Config(**fields))
    assert gm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()

    _perturb(gm, 2).save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    assert _peft_sites(theirs) == _our_sites(gm), "PEFT reads the same sites and the same scaled side"
    want = _logits(gm, batch)
    assert not torch.allclose(want, base, atol=1e-3), "the vectors must change the outputs"
    torch.testing.assert_close(_logits(theirs, batch), want, atol=ATOL, rtol=0)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and "target_parameters" not in config
    assert set(config["feedforward_modules"]) <= set(config["target_modules"])

    merged = gm.merge_and_unload()
    assert not any("graphpeft" in n.meta for n in gm.merged_graph().graph_module.graph.nodes), "no adapter nodes"
    assert not any("ia3_l" in k for k, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, batch), want, atol=ATOL, rtol=0)
    with gm.disable_adapter():                                                   # merging left the base alone
        torch.testing.assert_close(_logits(gm, batch), base, atol=ATOL, rtol=0)


def test_peft_adapter_loads_into_graphpeft_and_saves_back_the_same_file(case, tmp_path):
    builder, model, fields, batch = case
    pm = _perturb(peft.get_peft_model(copy.deepcopy(model), peft.IA3Config(**fields)), 1)
    pm.save_pretrained(tmp_path / "p")
    ours = graphpeft.from_pretrained(_model_and_graph(builder)[1], tmp_path / "p")
    assert _our_sites(ours) == _peft_sites(pm)
    want = _logits(pm, batch)
    assert _logits(ours, batch).shape == want.shape
    torch.testing.assert_close(_logits(ours, batch), want, atol=ATOL, rtol=0)
    ours.save_pretrained(tmp_path / "g")
    saved = load_file(tmp_path / "g/adapter_model.safetensors")
    theirs = load_file(tmp_path / "p/adapter_model.safetensors")
    assert sorted(saved) == sorted(theirs) and any(k.endswith(".ia3_l") for k in saved)
    for key in saved:
        assert torch.equal(saved[key], theirs[key]), key


# -- default sites, from the graph ---------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")     # PEFT, on GPT-2's Conv1D
@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_defaults_are_peft_table_sites(builder):
    """PEFT's table: llama k_proj, v_proj, down_proj (feed-forward); gpt2 c_attn, mlp.c_proj (feed-forward)."""
    model, graph = _model_and_graph(builder)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.IA3Config())
    gm = graphpeft.rewrite(graph, graphpeft.IA3Config())
    assert _our_sites(gm) == _peft_sites(pm)
    assert sum(_our_sites(gm).values()) == 2                     # one feed-forward site per layer


def test_bert_defaults_leave_the_attention_output_alone():
    """PEFT's bert entry "output.dense" also matches attention.output.dense (a suffix); the graph's feed-forward
    down projection is only output.dense, whose input comes through the activation."""
    model, graph = _model_and_graph(tiny_bert_cls)
    peft_sites = _peft_sites(peft.get_peft_model(copy.deepcopy(model), peft.IA3Config(task_type="SEQ_CLS")))
    ours = _our_sites(graphpeft.rewrite(graph, graphpeft.IA3Config(task_type="SEQ_CLS")))
    attention_out = {p for p in peft_sites if p.endswith("attention.output.dense")}
    assert len(attention_out) == 2
    assert ours == {p: ff for p, ff in peft_sites.items() if p not in attention_out}


@pytest.mark.parametrize("builder,names", [
    (tiny_distilbert, {"k_lin": False, "v_lin": False, "lin2": True}),
    (tiny_vit, {"k_proj": False, "v_proj": False, "fc2": True}),
    (tiny_whisper, {"k_proj": False, "v_proj": False, "fc2": True}),
], ids=["distilbert", "vit", "whisper"])
def test_defaults_work_where_peft_has_no_table(builder, names):
    model, graph = _model_and_graph(builder)
    with pytest.raises(ValueError, match="target_modules"):
        peft.get_peft_model(copy.deepcopy(model), peft.IA3Config())
    gm = _perturb(graphpeft.rewrite(graph, graphpeft.IA3Config()), 3)
    sites = _our_sites(gm)
    assert {p.rpartition(".")[2]: ff for p, ff in sites.items()} == names
    layers = 4 if builder is tiny_whisper else 2                  # whisper: encoder and decoder; cross-attention too
    assert sum(sites.values()) == layers
    assert len(sites) == 3 * layers + (4 if builder is tiny_whisper else 0)
    params = dict(gm.graph_module.named_parameters())
    assert all(params[f"{p}.ia3_l.default"].requires_grad for p in sites)
    batch = inputs_for(model, batch=2, seq=6)
    out = _logits(gm, batch)
    assert (out - _logits(model, batch)).abs().max() > 1e-5     # vectors of ones would give the base exactly
    torch.testing.assert_close(_logits(gm.merge_and_unload(), batch), out, atol=ATOL, rtol=0)


class GatedBlock(nn.Module):
    """Attention whose output is gated by sigmoid(gate(x)) before o, then a gelu feed-forward block."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.gate, self.o = (nn.Linear(dim, dim) for _ in range(5))
        self.up, self.down = nn.Linear(dim, 32), nn.Linear(32, dim)

    def forward(self, x):
        b, t, d = x.shape

        def split(y):
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        a = nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d) * torch.sigmoid(self.gate(x)))
        return x + self.down(nn.functional.gelu(self.up(x)))


def test_a_gated_attention_output_is_not_taken_for_a_feedforward_projection():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    gm = graphpeft.rewrite(GatedBlock().eval(), graphpeft.IA3Config(), example_inputs=(x,))
    assert _our_sites(gm) == {"k": False, "v": False, "down": True}


# -- convolutions, bad input, the pass contract ---------------------------------------------------------

class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


def test_conv_sites_match_peft_both_ways_and_merge(tmp_path):
    torch.manual_seed(0)
    net, x = SmallCNN().eval(), torch.randn(2, 3, 6, 6)
    fields = dict(target_modules=["c1", "c2", "head"], feedforward_modules=["c2"])
    pm = _perturb(peft.get_peft_model(copy.deepcopy(net), peft.IA3Config(**fields)), 1)
    pm.save_pretrained(tmp_path / "p")
    ours = graphpeft.from_pretrained(copy.deepcopy(net), tmp_path / "p", example_inputs=(x,))
    assert [(r.kind, r.info["feedforward"]) for r in ours.records] == [("conv", False), ("conv", True),
                                                                         ("linear", False)]
    torch.testing.assert_close(ours(x), pm(x), atol=ATOL, rtol=0)
    gm = _perturb(graphpeft.rewrite(copy.deepcopy(net), graphpeft.IA3Config(**fields), example_inputs=(x,)), 4)
    gm.save_pretrained(tmp_path / "g")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path / "g").eval()
    torch.testing.assert_close(theirs(x), gm(x), atol=ATOL, rtol=0)
    torch.testing.assert_close(gm.merge_and_unload()(x), gm(x), atol=ATOL, rtol=0)   # grouped input scaling too
    assert gm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()


def test_feedforward_outside_targets_is_refused_as_peft_does():
    fields = dict(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="subset"):
        peft.IA3Config(**fields)
    with pytest.raises(GraphPeftError, match="subset of target_modules") as info:
        graphpeft.IA3Config(**fields)
    assert "\n" not in str(info.value) and "down_proj" in str(info.value)
    with pytest.raises(GraphPeftError, match="target_parameters"):
        graphpeft.IA3Config(target_parameters=["mix.weight"])


def test_an_embedding_target_is_declined_as_peft_refuses_it():
    model, graph = _model_and_graph(tiny_llama)
    with pytest.raises(ValueError, match="not supported"):
        peft.get_peft_model(copy.deepcopy(model), peft.IA3Config(target_modules=["embed_tokens"],
                                                                 feedforward_modules=[]))
    with pytest.raises(graphpeft.NoMatchError, match="embed_tokens: .*not embedding ops"):
        graphpeft.rewrite(graph, graphpeft.IA3Config(target_modules=["embed_tokens"]))


def test_the_pass_applied_twice_changes_nothing():
    torch.manual_seed(0)
    net, x = SmallCNN().eval(), torch.randn(1, 3, 4, 4)
    gm = graphpeft.capture(net, (x,))
    first = IA3Pass(graphpeft.IA3Config(target_modules=["c1", "head"]))(gm)
    nodes = len(first.graph_module.graph.nodes)
    second = IA3Pass(graphpeft.IA3Config(target_modules=["c1", "head"]))(first.graph_module)
    assert first.modified and len(first.records) == 2
    assert not second.modified and len(second.graph_module.graph.nodes) == nodes


# -- training ------------------------------------------------------------------------------------------

def test_training_moves_only_the_vectors_and_the_loss_falls():
    gm = graphpeft.rewrite(_model_and_graph(tiny_llama)[1], graphpeft.IA3Config()).train()
    before = {k: p.detach().clone() for k, p in gm.named_parameters()}
    trainable = [p for p in gm.parameters() if p.requires_grad]
    assert {k for k, p in gm.named_parameters() if p.requires_grad} == {k for k in before if ".ia3_l." in k}
    opt = torch.optim.AdamW(trainable, lr=0.3)        # a random tiny model: its logits move slowly
    ids = torch.randint(3, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        loss = gm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.05, losses
    for k, p in gm.named_parameters():
        assert torch.equal(p, before[k]) != (".ia3_l." in k), k


# -- command line ----------------------------------------------------------------------------------------

def test_cli_rewrite_with_ia3_defaults_loads_into_peft(tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    code = cli.main(["rewrite", str(tiny_llama_dir), "-o", str(out), "--method", "ia3"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    config = json.loads((out / "adapter_config.json").read_text())
    layers = [f"model.layers.{i}" for i in range(2)]
    assert config["peft_type"] == "IA3" and config["task_type"] == "CAUSAL_LM"
    names = ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")
    assert sorted(config["target_modules"]) == sorted(f"{layer}.{n}" for layer in layers for n in names)
    assert sorted(config["feedforward_modules"]) == [f"{layer}.mlp.down_proj" for layer in layers]
    assert "ia3_l [1, 64]" in stdout and "ia3_l [32, 1]" in stdout
    assert "trainable params: 256 ||" in stdout                 # 2 layers x (32 + 32 + 64)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    theirs = peft.PeftModel.from_pretrained(model, str(out))
    assert _peft_sites(theirs) == {p: p.endswith("down_proj") for p in config["target_modules"]}


def test_cli_feedforward_option_and_its_bad_input(tiny_llama_dir, tmp_path, capsys):
    args, method = cli.parse_args(["rewrite", "--method", "ia3", "--targets", "k_proj,down_proj",
                                   "--feedforward", "down_proj"])
    config = cli.build_config(method, args)
    assert isinstance(config, graphpeft.IA3Config)
    assert config.target_modules == ["k_proj", "down_proj"] and config.feedforward_modules == ["down_proj"]
    args, method = cli.parse_args(["rewrite", "--method", "ia3", "--targets", r".*\.(k_proj|down_proj)",
                                   "--feedforward", r".*\.down_proj"])
    assert cli.build_config(method, args).feedforward_modules == r".*\.down_proj"

    out = tmp_path / "bad"
    code = cli.main(["rewrite", str(tiny_llama_dir), "-o", str(out), "--method", "ia3",
                     "--targets", "k_proj", "v_proj", "--feedforward", "down_proj"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("graphpeft: error: ")
    assert "feedforward_modules" in err and not out.exists()
