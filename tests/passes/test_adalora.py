"""AdaLoRA against the oracle, Hugging Face PEFT: the same training steps give the same masks, rank_pattern,
losses and logits; pruned adapters cross the file format both ways; an allocated adapter shrinks to plain LoRA."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import graphpeft
from graphpeft.cli import commands as cli
from graphpeft.engine.errors import GraphPeftError
from graphpeft.passes.adalora import shrink_to_lora
from graphpeft.runtime.svd_to_lora import save_as_lora
from tests.models import tiny_bert_cls, tiny_llama

ATOL = 1e-5
STEPS = 14            # total_step 12, tfinal 3: allocation up to step 9, then four steps with the mask fixed
SCHEDULE = dict(init_r=4, target_r=2, total_step=12, tinit=2, tfinal=3, deltaT=2, beta1=0.8, beta2=0.9, lora_alpha=16,
                lora_dropout=0.1)
CASES = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")),
    "bert": (tiny_bert_cls, dict(target_modules=["query", "value", "dense"], task_type="SEQ_CLS")),
}


def _batch(arch: str) -> dict:
    ids = torch.randint(3, 100, (4, 9), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": torch.tensor([0, 1, 1, 0]) if arch == "bert" else ids}


def _train(model, allocate, batch: dict) -> tuple[list[float], list]:
    """STEPS AdamW steps in train mode (model and adapter dropout on), PEFT's loop order; losses and rank_patterns."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    torch.manual_seed(7)
    losses, patterns = [], []
    for step in range(STEPS):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        allocate(step)
        opt.zero_grad()
        losses.append(loss.item())
        patterns.append(copy.deepcopy(model.peft_config["default"].rank_pattern))
    return losses, patterns


def _e_zeros(model, prefix: str) -> dict[str, list[bool]]:
    return {k[len(prefix):].replace(".default", ""): (p == 0).view(-1).tolist()
            for k, p in model.named_parameters() if ".lora_E." in k}


@pytest.fixture(scope="module", params=sorted(CASES))
def trained(request, tmp_path_factory):
    """PEFT and graphpeft, from the same initial adapter (PEFT's, loaded into graphpeft), trained side by side."""
    arch = request.param
    builder, fields = CASES[arch]
    model = builder()
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.AdaLoraConfig(**SCHEDULE, **fields))
    start = tmp_path_factory.mktemp(f"start-{arch}")
    pm.save_pretrained(start)
    gm = graphpeft.from_pretrained(copy.deepcopy(model), start, is_trainable=True)
    batch = _batch(arch)
    runs = {"peft": _train(pm, pm.base_model.update_and_allocate, batch),
            "graphpeft": _train(gm, gm.update_and_allocate, batch)}
    pm.eval(), gm.eval()
    return arch, model, pm, gm, runs, batch


def test_training_steps_give_peft_masks_rank_pattern_losses_and_logits(trained):
    arch, model, pm, gm, runs, batch = trained
    (p_losses, p_patterns), (g_losses, g_patterns) = runs["peft"], runs["graphpeft"]
    assert g_losses == pytest.approx(p_losses, abs=1e-6)          # the orthogonality loss is included
    assert g_patterns == p_patterns                                # after every step, keys with the adapter name
    final = p_patterns[-1]
    kept = sum(sum(mask) for mask in final.values())
    assert 0 < kept < SCHEDULE["init_r"] * len(final), "the budget pruned some triplets and kept some"
    assert kept <= SCHEDULE["target_r"] * len(final)
    assert _e_zeros(gm, "graph_module.") == _e_zeros(pm, "base_model.model.")
    for key, mask in final.items():                                # pruned singular values are exactly zero
        assert all(z for z, keep in zip(_e_zeros(gm, "graph_module.")[key.replace(".default", "")], mask) if not keep)
    ids = batch["input_ids"]
    torch.testing.assert_close(gm(input_ids=ids).logits, pm(input_ids=ids).logits, atol=ATOL, rtol=0)
    assert gm.progress() == {"budget": f"{SCHEDULE['target_r'] * len(final)}/{SCHEDULE['init_r'] * len(final)}"}


def test_a_pruned_peft_adapter_loads_into_graphpeft_at_its_allocated_ranks(trained, tmp_path):
    arch, model, pm, gm, runs, batch = trained
    pm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    loaded = graphpeft.from_pretrained(copy.deepcopy(model), tmp_path)
    for key, mask in saved.items():
        path = key[: -len(".lora_E")]
        assert tuple(getattr_path(loaded, f"{path}.lora_E.default").shape) == (sum(mask), 1)
    ids = batch["input_ids"]
    torch.testing.assert_close(loaded(input_ids=ids).logits, pm(input_ids=ids).logits, atol=ATOL, rtol=0)


def test_graphpeft_saves_what_peft_saves_and_peft_loads_it(trained, tmp_path):
    arch, model, pm, gm, runs, batch = trained
    gm.save_pretrained(tmp_path / "g")
    pm.save_pretrained(tmp_path / "p")
    ours, theirs = (load_file(tmp_path / f"{w}/adapter_model.safetensors") for w in "gp")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert any(k.endswith(".lora_E") for k in ours) and not any(k.endswith(".weight") and ".lora_" in k for k in ours)
    ours_cfg, theirs_cfg = (json.loads((tmp_path / f"{w}/adapter_config.json").read_text()) for w in "gp")
    assert ours_cfg["peft_type"] == "ADALORA" and ours_cfg["rank_pattern"] == theirs_cfg["rank_pattern"]
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "g").eval()
    ids = batch["input_ids"]
    torch.testing.assert_close(back(input_ids=ids).logits, gm(input_ids=ids).logits, atol=ATOL, rtol=0)
    again = graphpeft.from_pretrained(copy.deepcopy(model), tmp_path / "g")
    torch.testing.assert_close(again(input_ids=ids).logits, gm(input_ids=ids).logits, atol=ATOL, rtol=0)


def test_an_allocated_adapter_shrinks_to_plain_lora_with_the_same_outputs(trained, tmp_path):
    arch, model, pm, gm, runs, batch = trained
    config, tensors = shrink_to_lora(gm)
    final = gm.peft_config["default"].rank_pattern
    kept = {k[: -len(".lora_E.default")]: sum(m) for k, m in final.items() if sum(m)}
    assert config["peft_type"] == "LORA" and config["rank_pattern"] == kept
    save_as_lora(gm, tmp_path / "lora")
    gm.save_pretrained(tmp_path / "adalora")
    size = {w: (tmp_path / w / "adapter_model.safetensors").stat().st_size for w in ("lora", "adalora")}
    assert size["lora"] < size["adalora"]
    ids = batch["input_ids"]
    want = gm(input_ids=ids).logits
    ours = graphpeft.from_pretrained(copy.deepcopy(model), tmp_path / "lora")
    assert {type(c).__name__ for c in ours.peft_config.values()} == {"LoraConfig"}
    torch.testing.assert_close(ours(input_ids=ids).logits, want, atol=ATOL, rtol=0)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "lora").eval()
    assert theirs.peft_config["default"].peft_type == peft.PeftType.LORA
    torch.testing.assert_close(theirs(input_ids=ids).logits, want, atol=ATOL, rtol=0)


def test_merge_and_unload_matches_the_adapter(trained):
    arch, model, pm, gm, runs, batch = trained
    ids = batch["input_ids"]
    merged = gm.merge_and_unload()
    assert not any("lora_" in k or "ranknum" in k for k, _ in merged.named_parameters())
    torch.testing.assert_close(merged(input_ids=ids).logits, gm(input_ids=ids).logits, atol=ATOL, rtol=0)


def getattr_path(model, attr: str):
    obj = model.graph_module
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


# -- a fresh adapter: init, counts, the branch itself -------------------------------------------------

def test_fresh_adapter_matches_peft_counts_starts_at_the_base_model_and_ranknum_is_frozen():
    model = tiny_llama()
    fields = dict(total_step=10, target_modules=["q_proj", "v_proj"])
    gm = graphpeft.rewrite(copy.deepcopy(model), graphpeft.AdaLoraConfig(**fields)).eval()
    pm = peft.get_peft_model(copy.deepcopy(model), peft.AdaLoraConfig(**fields))
    assert gm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    ours = {k.replace("graph_module.", ""): (tuple(p.shape), p.requires_grad) for k, p in gm.named_parameters()
            if ".lora_" in k or ".ranknum." in k}
    theirs = {k.replace("base_model.model.", ""): (tuple(p.shape), p.requires_grad) for k, p in pm.named_parameters()
              if ".lora_" in k or ".ranknum." in k}
    assert ours == theirs                                          # names, shapes (init_r=12) and frozen ranknum
    ids = torch.randint(3, 100, (2, 7))
    torch.testing.assert_close(gm(input_ids=ids).logits, model(input_ids=ids).logits, atol=ATOL, rtol=0)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


def _tame(model):
    """Random (init_lora_weights=False) triplets scaled down, so the adapter's change is of the outputs' size."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.mul_(0.2)
    return model


def test_conv2d_and_linear_sites_match_peft_both_ways_and_shrink(tmp_path):
    torch.manual_seed(0)
    net, x = ConvNet().eval(), torch.randn(2, 3, 8, 8)
    fields = dict(target_modules=["c1", "c2", "head"], init_r=3, target_r=2, total_step=10, init_lora_weights=False)
    torch.manual_seed(1)
    pm = _tame(peft.get_peft_model(copy.deepcopy(net), peft.AdaLoraConfig(**fields)).eval())
    pm.save_pretrained(tmp_path / "p")
    ours = graphpeft.from_pretrained(copy.deepcopy(net), tmp_path / "p", example_inputs=(x,))
    assert sorted(r.kind for r in ours.records) == ["conv", "conv", "linear"]
    assert not torch.allclose(pm(x), net(x), atol=1e-3)
    torch.testing.assert_close(ours(x), pm(x), atol=ATOL, rtol=0)
    gm = _tame(graphpeft.rewrite(copy.deepcopy(net), graphpeft.AdaLoraConfig(**fields), example_inputs=(x,)).eval())
    gm.save_pretrained(tmp_path / "g")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path / "g").eval()
    torch.testing.assert_close(theirs(x), gm(x), atol=ATOL, rtol=0)
    torch.testing.assert_close(gm.merge_and_unload()(x), gm(x), atol=ATOL, rtol=0)
    save_as_lora(gm, tmp_path / "lora")                            # no allocation yet: every rank is kept
    lora = peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path / "lora").eval()
    torch.testing.assert_close(lora(x), gm(x), atol=ATOL, rtol=0)


def test_update_and_allocate_needs_gradients_and_loss_adds_the_orthogonality_term():
    model = tiny_llama()
    gm = graphpeft.rewrite(model, graphpeft.AdaLoraConfig(total_step=10, init_r=4, target_r=2,
                                                          target_modules=["q_proj"]))
    ids = torch.randint(3, 100, (2, 7))
    with pytest.raises(GraphPeftError, match="after loss.backward"):
        gm.update_and_allocate(0)
    plain = model(input_ids=ids, labels=ids).loss                  # B and A start near 0: ||A A^T - I|| ~ sqrt(r)
    assert gm(input_ids=ids, labels=ids).loss.item() == pytest.approx(plain.item() + 0.5 * 2.0, abs=2e-2)
    gm.peft_config["default"].orth_reg_weight = 0.0
    assert gm(input_ids=ids, labels=ids).loss.item() == pytest.approx(plain.item(), abs=1e-6)


def test_the_training_loop_allocates_and_its_bar_shows_the_budget(monkeypatch):
    """train() calls update_and_allocate and hands the model's progress() to the bar at every step.

    (The bar's fields are recorded where train() passes them: what rich draws, and when it refreshes,
    is rich's business and timing-dependent.)"""
    import contextlib

    from graphpeft.runtime import progress
    from graphpeft.runtime.train import train

    shown: list[dict] = []

    @contextlib.contextmanager
    def recording_bar(total, description, show=True):
        yield lambda **fields: shown.append(fields)

    gm = graphpeft.rewrite(tiny_llama(), graphpeft.AdaLoraConfig(total_step=4, init_r=4, target_r=2, tinit=1,
                                                                 target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(3, 100, (2, 7))
    monkeypatch.setattr(progress, "bar", recording_bar)
    train(gm, [{"input_ids": ids, "labels": ids}] * 3, epochs=2, lr=1e-2)
    budgets = [fields.get("budget") for fields in shown]
    assert len(shown) == 6 and "16/16" in budgets and "8/16" in budgets     # 4 sites x init_r 4 -> 4 x target_r 2
    pattern = gm.peft_config["default"].rank_pattern
    assert sum(sum(m) for m in pattern.values()) <= 8 and len(pattern) == 4


# -- bad input ------------------------------------------------------------------------------------------

BAD = {
    "total_step missing": (dict(), "needs total_step"),
    "total_step zero": (dict(total_step=0), "needs total_step"),
    "no budgeting phase": (dict(total_step=10, tinit=6, tfinal=4), "leave no budgeting phase"),
    "target_r above init_r": (dict(total_step=10, init_r=4, target_r=8), "larger than init_r"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_is_a_one_line_error(case):
    fields, message = BAD[case]
    with pytest.raises(GraphPeftError, match=message) as info:
        graphpeft.AdaLoraConfig(**fields)
    assert "\n" not in str(info.value)
    if case != "target_r above init_r":                            # PEFT refuses these too (not this one)
        with pytest.raises(ValueError):
            peft.AdaLoraConfig(**fields)


CLI_BAD = {
    "total_step missing": ([], "needs total_step"),
    "no budgeting phase": (["--total-step", "10", "--tinit", "8", "--tfinal", "2"], "no budgeting phase"),
    "target_r above init_r": (["--total-step", "10", "--init-r", "4", "--target-r", "8"], "larger than init_r"),
}


@pytest.mark.parametrize("case", sorted(CLI_BAD))
def test_cli_bad_options_exit_2_with_one_line(case, tmp_path, capsys):
    options, message = CLI_BAD[case]
    code = cli.main(["rewrite", "--method", "adalora", "-o", str(tmp_path / "out"), *options])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("graphpeft: error: ")
    assert not (tmp_path / "out").exists()


# -- the command line ---------------------------------------------------------------------------------------

def test_cli_trains_with_allocation_and_counts_total_step(tiny_bert_dir, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    rows = [{"text": t, "label": int("good" in t)} for t in
            ("a good film", "a bad film", "good food", "bad food", "good day", "bad day", "so good", "so bad")]
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    code = cli.main(["train", str(out), "--data", str(data), str(tiny_bert_dir), "--method", "adalora",
                     "--init-r", "4", "--target-r", "2", "--tinit", "1", "--tfinal", "1", "--targets", "query,value",
                     "--epochs", "3", "--batch-size", "4", "--lr", "2e-2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == 6      # 3 epochs x 2 batches
    assert sum(sum(m) for m in config["rank_pattern"].values()) <= 2 * 4       # target_r x 4 sites
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    ids = torch.randint(1000, 2000, (2, 6))
    ours = graphpeft.from_pretrained(copy.deepcopy(base), str(out))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=ATOL, rtol=0)
