"""LoRA variants against the oracle, PEFT 0.21.2: DoRA, lora_bias, PiSSA / OLoRA initialisation.

Each variant: PEFT's adapter loads into graphpeft with the same outputs, graphpeft's into PEFT, the saved
files have PEFT's keys and shapes, merging gives the same outputs, and training steps follow PEFT's.
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import graphpeft
from graphpeft.engine.errors import GraphPeftError
from tests.models import inputs_for, tiny_bert_cls, tiny_gpt2, tiny_llama

ATOL = 1e-5

# name -> (builder, LoraConfig fields shared by PEFT and graphpeft)
DORA = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], r=4, lora_alpha=8)),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "bert": (tiny_bert_cls, dict(task_type="SEQ_CLS", target_modules=["query", "value", "dense"])),
}
BIAS = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj"])),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "bert": (tiny_bert_cls, dict(task_type="SEQ_CLS", target_modules=["query", "value"], use_rslora=True,
                                 rank_pattern={"value": 4}, alpha_pattern={"query": 16})),   # PEFT takes both
}


def _perturb(model) -> None:
    """Move every adapter tensor away from its start (a trained-looking adapter), magnitudes included."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def _pair(variant: dict, arch: str, extra: dict):
    builder, fields = variant[arch]
    model = builder()
    return model, {**fields, **extra}, inputs_for(model, batch=3, seq=7, pad=2)


def _both_ways(model, fields, batch, tmp_path, call=lambda m, b: m(**b).logits):
    torch.manual_seed(2)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**fields))
    _perturb(pm)
    pm.eval().save_pretrained(tmp_path / "p")
    ours = graphpeft.from_pretrained(copy.deepcopy(model), tmp_path / "p")
    want = call(pm, batch)
    assert not torch.allclose(want, call(model, batch), atol=1e-3), "the adapter must change the outputs"
    torch.testing.assert_close(call(ours, batch), want, atol=ATOL, rtol=0)
    gm = graphpeft.rewrite(copy.deepcopy(model), graphpeft.LoraConfig(**fields))
    _perturb(gm)
    gm.eval().save_pretrained(tmp_path / "g")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "g").eval()
    torch.testing.assert_close(call(theirs, batch), call(gm, batch), atol=ATOL, rtol=0)
    keys = load_file(tmp_path / "g/adapter_model.safetensors")
    want_keys = {k: v.shape for k, v in load_file(tmp_path / "p/adapter_model.safetensors").items()
                 if not k.endswith(".base_layer.weight")}     # PEFT also stores a targeted embedding's full weight
    assert {k: v.shape for k, v in keys.items()} == want_keys
    return gm, pm


def _train(models: dict, batch: dict, labels, steps: int = 3) -> dict:
    losses = {}
    for name, m in models.items():
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        torch.manual_seed(7)
        losses[name] = []
        for _ in range(steps):
            loss = m(**batch, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    return losses


def _assert_same_trained_params(pm, gm) -> list[str]:
    """PEFT's and graphpeft's trainable parameters: the same names and values (1e-5); returns the names."""
    theirs = {k.replace("base_model.model.", "").replace(".default", ""): p
              for k, p in pm.named_parameters() if p.requires_grad}
    ours = {k.replace("graph_module.", "").replace(".default", ""): p for k, p in gm.named_parameters() if p.requires_grad}
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-5, rtol=0, msg=k)
    return sorted(ours)


# -- DoRA ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(DORA))
def test_dora_matches_peft_both_ways_and_merges(arch, tmp_path):
    model, fields, batch = _pair(DORA, arch, dict(use_dora=True))
    gm, pm = _both_ways(model, fields, batch, tmp_path)
    assert any("lora_magnitude_vector" in k for k in load_file(tmp_path / "g/adapter_model.safetensors"))
    merged = gm.merge_and_unload()
    assert not any("lora_" in k for k, _ in merged.named_parameters())
    torch.testing.assert_close(merged(**batch).logits, gm(**batch).logits, atol=ATOL, rtol=0)
    pm_merged = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "g").merge_and_unload()
    torch.testing.assert_close(merged(**batch).logits, pm_merged(**batch).logits, atol=ATOL, rtol=0)
    from graphpeft.runtime.inference import merge_for_inference

    torch.testing.assert_close(merge_for_inference(gm)(**batch).logits, gm(**batch).logits, atol=ATOL, rtol=0)
    assert gm.get_nb_trainable_parameters() == peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(**fields)).get_nb_trainable_parameters()


def test_dora_default_init_starts_at_the_base_model():
    model, fields, batch = _pair(DORA, "llama", dict(use_dora=True))
    gm = graphpeft.rewrite(copy.deepcopy(model), graphpeft.LoraConfig(**fields)).eval()
    torch.testing.assert_close(gm(**batch).logits, model(**batch).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch,dropout", [("llama", 0.0), ("gpt2", 0.1), ("bert", 0.1)])
def test_dora_training_steps_follow_peft(arch, dropout, tmp_path):
    """Same weights, train mode, same seeds: AdamW steps give PEFT's losses and adapters (magnitudes included).

    With lora_dropout, DoRA computes the base op once more on the dropped-out input, as PEFT does.
    """
    model, fields, batch = _pair(DORA, arch, dict(use_dora=True, lora_dropout=dropout))
    torch.manual_seed(2)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**fields))
    _perturb(pm)
    pm.save_pretrained(tmp_path)
    gm = graphpeft.from_pretrained(copy.deepcopy(model), tmp_path, is_trainable=True)
    labels = torch.tensor([0, 1, 1]) if arch == "bert" else batch["input_ids"]
    losses = _train({"peft": pm, "graphpeft": gm}, batch, labels)
    assert losses["graphpeft"] == pytest.approx(losses["peft"], abs=1e-5)
    assert losses["peft"][-1] < losses["peft"][0]
    names = _assert_same_trained_params(pm, gm)
    assert any("magnitude" in k for k in names)


def test_dora_norm_is_detached_as_in_the_paper():
    """The weight norm gets no gradient: A's gradient equals the one with the norm held constant."""
    model, fields, batch = _pair(DORA, "llama", dict(use_dora=True, target_modules=["q_proj"]))
    gm = graphpeft.rewrite(copy.deepcopy(model), graphpeft.LoraConfig(**fields))
    _perturb(gm)
    nodes = [n for n in gm.graph_module.graph.nodes if n.target is torch.ops.aten.linalg_vector_norm.default]
    assert nodes and all(next(iter(n.users)).target is torch.ops.aten.detach.default for n in nodes)
    assert all(a.target is torch.ops.aten.detach.default
               for n in nodes for a in n.args[0].args[1].all_input_nodes[0].all_input_nodes)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv1d(8, 4, 1, bias=False)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        return self.head(self.c2(h.flatten(2)).mean(-1))


@pytest.mark.parametrize("extra", [dict(use_dora=True), dict(lora_bias=True)], ids=["dora", "lora_bias"])
def test_conv_variants_match_peft_both_ways(extra, tmp_path):
    torch.manual_seed(0)
    net, x = SmallCNN().eval(), torch.randn(2, 3, 6, 6)
    fields = dict(target_modules=["c1", "c2", "head"], r=4, **extra)
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(**fields))
    _perturb(pm)
    pm.eval().save_pretrained(tmp_path / "p")
    ours = graphpeft.from_pretrained(copy.deepcopy(net), tmp_path / "p", example_inputs=(x,))
    assert not torch.allclose(pm(x), net(x), atol=1e-3)
    torch.testing.assert_close(ours(x), pm(x), atol=ATOL, rtol=0)
    gm = graphpeft.rewrite(copy.deepcopy(net), graphpeft.LoraConfig(**fields), example_inputs=(x,))
    _perturb(gm)
    gm.eval().save_pretrained(tmp_path / "g")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path / "g").eval()
    torch.testing.assert_close(theirs(x), gm(x), atol=ATOL, rtol=0)
    assert ({k: v.shape for k, v in load_file(tmp_path / "g/adapter_model.safetensors").items()}
            == {k: v.shape for k, v in load_file(tmp_path / "p/adapter_model.safetensors").items()})
    if "use_dora" in extra:
        torch.testing.assert_close(gm.merge_and_unload()(x), gm(x), atol=ATOL, rtol=0)
    else:       # c2 has no bias: PEFT cannot merge lora_bias there, neither can graphpeft
        with pytest.raises(GraphPeftError, match="c2.*no bias"):
            gm.merge_and_unload()


# -- lora_bias -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(BIAS))
def test_lora_bias_matches_peft_both_ways(arch, tmp_path):
    model, fields, batch = _pair(BIAS, arch, dict(lora_bias=True))
    gm, pm = _both_ways(model, fields, batch, tmp_path)
    assert any(k.endswith("lora_B.bias") for k in load_file(tmp_path / "g/adapter_model.safetensors"))
    if arch == "llama":         # llama's projections have no bias: merging is refused, as in PEFT
        with pytest.raises(GraphPeftError, match="no bias"):
            gm.merge_and_unload()
    else:
        torch.testing.assert_close(gm.merge_and_unload()(**batch).logits, gm(**batch).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_lora_bias_training_steps_follow_peft(arch, tmp_path):
    model, fields, batch = _pair(BIAS, arch, dict(lora_bias=True, lora_dropout=0.1))
    torch.manual_seed(2)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**fields))
    pm.save_pretrained(tmp_path)
    gm = graphpeft.from_pretrained(copy.deepcopy(model), tmp_path, is_trainable=True)
    labels = torch.tensor([0, 1, 1]) if arch == "bert" else batch["input_ids"]
    losses = _train({"peft": pm, "graphpeft": gm}, batch, labels)
    assert losses["graphpeft"] == pytest.approx(losses["peft"], abs=1e-5)
    names = _assert_same_trained_params(pm, gm)
    assert any(k.endswith("lora_B.bias") for k in names)


# -- refusals (PEFT's, as one line) ---------------------------------------------------------------------

@pytest.mark.parametrize("fields,match", [
    (dict(use_dora=True, lora_bias=True), "lora_bias=True cannot be combined with use_dora"),
    (dict(lora_bias=True, init_lora_weights="pissa"), "lora_bias=True needs init_lora_weights True or False"),
    (dict(init_lora_weights="loftq"), "LoftQ needs a quantized base"),
    (dict(init_lora_weights="eva"), "init_lora_weights='eva' is not supported"),
])
def test_unsupported_combinations_are_one_line_errors(fields, match):
    with pytest.raises(GraphPeftError, match=match):
        graphpeft.LoraConfig(**fields)


def test_lora_bias_on_an_embedding_is_declined():
    model = tiny_llama()
    with pytest.raises(GraphPeftError, match="lora_bias is not supported on an embedding"):
        graphpeft.rewrite(model, graphpeft.LoraConfig(target_modules=["embed_tokens"], lora_bias=True))


# -- PiSSA / OLoRA ---------------------------------------------------------------------------------

DECOMPOSE = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=16)),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, r=4)),
    "bert": (tiny_bert_cls, dict(task_type="SEQ_CLS", target_modules=["query", "value"], r=4)),
}


@pytest.mark.parametrize("arch,init", [("llama", "pissa"), ("llama", "pissa_niter_4"), ("llama", "olora"),
                                       ("gpt2", "pissa_niter_2"), ("bert", "olora")])
def test_decomposing_init_equals_peft_and_starts_at_the_base_model(arch, init):
    model, fields, batch = _pair(DECOMPOSE, arch, dict(init_lora_weights=init))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**fields)).eval()
    torch.manual_seed(0)
    gm = graphpeft.rewrite(model, graphpeft.LoraConfig(**fields)).eval()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the user's model is unchanged"
    ours = {k.replace("graph_module.", "base_model.model."): v for k, v in gm.named_parameters()}
    theirs = dict(pm.named_parameters())
    adapters = [k for k in theirs if ".lora_" in k]
    residuals = [k for k in theirs if k.endswith(".base_layer.weight")]
    assert adapters and residuals
    for k in adapters:          # A and B from the decomposition, equal to PEFT's
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=0, msg=k)
    for k in residuals:         # and the base weight in the graph is the residual, as PEFT's
        assert not torch.allclose(theirs[k], before[k.replace("base_model.model.", "").replace("base_layer.", "")])
        torch.testing.assert_close(ours[k.replace("base_layer.", "")], theirs[k], atol=1e-6, rtol=0, msg=k)
    torch.testing.assert_close(gm(**batch).logits, model(**batch).logits, atol=ATOL, rtol=0)
    with gm.disable_adapter(), pm.disable_adapter():  # as in PEFT, the adapter off leaves the residual model
        torch.testing.assert_close(gm(**batch).logits, pm(**batch).logits, atol=ATOL, rtol=0)


def test_olora_on_conv1d_follows_the_mathematics_where_peft_breaks():
    """PEFT's olora_init takes the QR of GPT-2's Conv1D weight without transposing it ([in, out]): A gets the
    wrong shape and the forward fails. graphpeft decomposes W in [out, in] like PiSSA does: same start as the base."""
    model, fields, batch = _pair(DECOMPOSE, "gpt2", dict(init_lora_weights="olora"))
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**fields))(**batch)
    gm = graphpeft.rewrite(copy.deepcopy(model), graphpeft.LoraConfig(**fields)).eval()
    torch.testing.assert_close(gm(**batch).logits, model(**batch).logits, atol=ATOL, rtol=0)
    a = dict(gm.named_parameters())["graph_module.transformer.h.0.attn.c_attn.lora_A.default.weight"]
    assert torch.allclose(a.tril(-1), torch.zeros_like(a)), "A is R's first rows: upper triangular"


@pytest.mark.parametrize("arch,init", [("llama", "pissa"), ("llama", "olora")])
def test_decomposed_adapters_load_both_ways_against_the_original_weights(arch, init, tmp_path):
    """A saved PiSSA/OLoRA adapter keeps its init in adapter_config.json: loading it into the original model
    recomputes the residual (PEFT does the same), so the loaded model equals the trained one."""
    model, fields, batch = _pair(DECOMPOSE, arch, dict(init_lora_weights=init))
    _both_ways(model, fields, batch, tmp_path)
    assert json.loads((tmp_path / "g/adapter_config.json").read_text())["init_lora_weights"] == init


@pytest.mark.parametrize("arch,init", [("llama", "olora"), ("gpt2", "pissa")])
def test_conversion_to_plain_lora_equals_peft(arch, init, tmp_path):
    """save_pretrained(path_initial_model_for_weight_conversion=...) writes a plain LoRA of rank 2r on the
    original weights: the same files as PEFT's conversion, and PEFT loads it with the trained model's outputs."""
    model, fields, batch = _pair(DECOMPOSE, arch, dict(init_lora_weights=init))
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**fields))
    pm.peft_config["default"].init_lora_weights = True         # PEFT's documented way to save the initial adapter
    pm.save_pretrained(tmp_path / "p_init")
    pm.peft_config["default"].init_lora_weights = init
    torch.manual_seed(0)
    gm = graphpeft.rewrite(copy.deepcopy(model), graphpeft.LoraConfig(**fields))
    gm.save_pretrained(tmp_path / "g_init")
    _perturb(pm)
    _perturb(gm)
    pm.save_pretrained(tmp_path / "p", path_initial_model_for_weight_conversion=str(tmp_path / "p_init"))
    gm.save_pretrained(tmp_path / "g", path_initial_model_for_weight_conversion=str(tmp_path / "g_init"))
    ours, theirs = load_file(tmp_path / "g/adapter_model.safetensors"), load_file(tmp_path / "p/adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=0, msg=k)
    config = json.loads((tmp_path / "g/adapter_config.json").read_text())
    want = json.loads((tmp_path / "p/adapter_config.json").read_text())
    assert {k: config[k] for k in ("r", "lora_alpha", "init_lora_weights")} == {k: want[k] for k in
                                                                             ("r", "lora_alpha", "init_lora_weights")}
    plain = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "g").eval()
    torch.testing.assert_close(plain(**batch).logits, gm.eval()(**batch).logits, atol=ATOL, rtol=0)
    again = graphpeft.from_pretrained(copy.deepcopy(model), tmp_path / "g")
    torch.testing.assert_close(again(**batch).logits, gm(**batch).logits, atol=ATOL, rtol=0)


def test_pissa_training_steps_follow_peft(tmp_path):
    model, fields, batch = _pair(DECOMPOSE, "llama", dict(init_lora_weights="pissa", use_dora=True))
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**fields))
    torch.manual_seed(0)
    gm = graphpeft.rewrite(copy.deepcopy(model), graphpeft.LoraConfig(**fields))
    losses = _train({"peft": pm, "graphpeft": gm}, batch, batch["input_ids"])
    assert losses["graphpeft"] == pytest.approx(losses["peft"], abs=1e-5)
    _assert_same_trained_params(pm, gm)


# -- target_parameters on MoE experts (3-D parameters) ------------------------------------------------

MOE = {
    "both": dict(target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"], r=2),
    "down": dict(target_modules=None, target_parameters=["down_proj"], r=4, lora_alpha=16),
    "all-linear": dict(target_modules="all-linear", r=2),
}


@pytest.fixture(scope="module")
def mixtral():
    from tests.models import tiny_mixtral

    model = tiny_mixtral()
    return model, {"input_ids": torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))}


@pytest.mark.parametrize("case", sorted(MOE))
def test_expert_parameters_match_peft_both_ways_and_merge(mixtral, case, tmp_path):
    """PEFT's ParamWrapper semantics on [experts, out, in]: A [r*E, in], B [out, r*E]; two targeted parameters of
    one module nest (``experts.base_layer.lora_A`` for gate_up_proj); all-linear adds the experts, with PEFT's
    doubled rank and alpha on the fused gate_up_proj."""
    model, batch = mixtral
    fields = MOE[case]
    gm, pm = _both_ways(model, fields, batch, tmp_path)
    keys = load_file(tmp_path / "g/adapter_model.safetensors")
    assert any(".experts." in k for k in keys)
    if case != "down":
        a = keys["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"]
        assert a.shape == (fields["r"] * 4 * (2 if case == "all-linear" else 1), 32)
    torch.testing.assert_close(gm.merge_and_unload()(**batch).logits, gm(**batch).logits, atol=ATOL, rtol=0)
    assert gm.get_nb_trainable_parameters() == peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(**fields)).get_nb_trainable_parameters()


def test_expert_parameters_training_steps_follow_peft(mixtral, tmp_path):
    model, batch = mixtral
    torch.manual_seed(2)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**MOE["both"]))
    _perturb(pm)
    pm.save_pretrained(tmp_path)
    gm = graphpeft.from_pretrained(copy.deepcopy(model), tmp_path, is_trainable=True)
    losses = _train({"peft": pm, "graphpeft": gm}, batch, batch["input_ids"])
    assert losses["graphpeft"] == pytest.approx(losses["peft"], abs=1e-5)
    _assert_same_trained_params(pm, gm)


def test_an_eager_experts_loop_is_a_capture_error_that_names_the_fix():
    from graphpeft.engine.errors import CaptureError
    from tests.models import tiny_mixtral

    with pytest.raises(CaptureError, match="experts_implementation='batched_mm'"):
        graphpeft.rewrite(tiny_mixtral(experts_implementation="eager"),
                          graphpeft.LoraConfig(target_parameters=["down_proj"]))


@pytest.mark.parametrize("fields,match", [(dict(use_dora=True), "use_dora is not supported on a bare parameter"),
                                          (dict(lora_dropout=0.1), "lora_dropout is not supported on a bare parameter"),
                                          (dict(init_lora_weights="pissa"), "init_lora_weights is not supported on a bare")])
def test_expert_parameters_refuse_what_peft_refuses(mixtral, fields, match):
    model, _ = mixtral
    with pytest.raises(GraphPeftError, match=match):
        graphpeft.rewrite(copy.deepcopy(model), graphpeft.LoraConfig(target_parameters=["down_proj"], **fields))


# -- the command line and PEFT's adapter_config.json --------------------------------------------------

def test_variant_options_from_the_command_line():
    from graphpeft.cli import commands as cli

    args, method = cli.parse_args(["rewrite", "--use-dora", "--init", "pissa_niter_4", "--target-parameters",
                                   "experts.gate_up_proj", "experts.down_proj"])
    config = cli.build_config(method, args)
    assert config.use_dora is True and config.init_lora_weights == "pissa_niter_4"
    assert config.target_parameters == ["experts.gate_up_proj", "experts.down_proj"]
    args, method = cli.parse_args(["rewrite", "--lora-bias", "--init", "false"])
    config = cli.build_config(method, args)
    assert config.lora_bias is True and config.init_lora_weights is False


@pytest.mark.parametrize("flags,key", [(["--use-dora"], "lora_magnitude_vector"), (["--lora-bias"], "lora_B.bias"),
                                       (["--init", "olora"], "lora_A.weight")])
def test_rewrite_command_writes_variant_adapters_that_peft_loads(tiny_bert_dir, tmp_path, capsys, flags, key):
    from transformers import AutoModelForSequenceClassification

    from graphpeft.cli import commands as cli

    out = tmp_path / "out"
    code = cli.main(["rewrite", str(tiny_bert_dir), "-o", str(out), "--targets", "query", "value", "--r", "4", *flags])
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "adapter_config.json").read_text())
    assert {"--use-dora": config["use_dora"], "--lora-bias": config["lora_bias"],
            "--init": config["init_lora_weights"] == "olora"}[flags[0]] is True
    assert any(k.endswith(key) for k in load_file(out / "adapter_model.safetensors"))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    ids = torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(out)).eval()
    ours = graphpeft.from_pretrained(copy.deepcopy(model), str(out))
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=ATOL, rtol=0)


def test_a_peft_config_with_variants_reads_and_loftq_is_a_one_line_refusal(tiny_bert_dir, tmp_path, capsys):
    from graphpeft.cli import commands as cli

    peft.LoraConfig(r=4, target_modules=["query"], use_dora=True, init_lora_weights="pissa",
                    task_type="SEQ_CLS").save_pretrained(str(tmp_path / "cfg"))
    args, method = cli.parse_args(["rewrite", "--config", str(tmp_path / "cfg")])
    config = cli.build_config(method, args)
    assert config.use_dora is True and config.init_lora_weights == "pissa"
    code = cli.main(["rewrite", str(tiny_bert_dir), "-o", str(tmp_path / "out"), "--init", "loftq"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "LoftQ needs a quantized base" in err


# -- ONNX export and edge training of DoRA ---------------------------------------------------------------

def test_dora_exports_to_onnx_for_inference_and_refuses_training_artifacts_in_one_line(tmp_path):
    pytest.importorskip("onnxruntime.training.api", reason="needs the optional extra 'onnx': pip install 'graphpeft[onnx]'")
    pytest.importorskip("onnxscript", reason="needs the optional extra 'onnx': pip install 'graphpeft[onnx]'")
    import numpy as np
    import onnxruntime as ort

    from graphpeft.export import EdgeTrainer, export_onnx, export_training

    torch.manual_seed(0)
    model = graphpeft.rewrite(tiny_llama(), graphpeft.LoraConfig(r=4, use_dora=True,
                                                                  target_modules=["q_proj", "v_proj", "embed_tokens"]))
    _perturb(model)
    batch = inputs_for(model, batch=2, seq=6)
    want = model.eval()(**batch).logits.detach().numpy()
    result = export_onnx(model, tmp_path / "model.onnx", merged=False)     # the DoRA nodes themselves
    session = ort.InferenceSession(str(result.path))
    got = session.run(None, {i.name: batch[i.name].numpy() for i in session.get_inputs()})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    # DoRA holds its weight norm constant (detached); ONNX Runtime's gradient builder would differentiate through
    # it, so training artifacts are refused in one line rather than train a different gradient
    with pytest.raises(GraphPeftError, match="ONNX Runtime training cannot hold a value constant.*lora_"):
        export_training(model, tmp_path / "artifacts", optimizer="sgd")
