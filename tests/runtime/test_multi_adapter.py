"""Several adapters on one graph, as PEFT has them: add_adapter, set_adapter, disable_adapter, save/load.

PEFT is the oracle: a peft.PeftModel with two LoRA adapters on the same weights gives the same outputs
with each adapter active, both directions through the file format (PEFT's layout: "default" at the
root of the folder, every other adapter in its own sub-folder).
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import graphpeft
from graphpeft.engine.errors import GraphPeftError
from tests.models import inputs_for, tiny_llama

ATOL = 1e-5
# two LoRA adapters with different sites, ranks and scalings; init_lora_weights=False so both change outputs
FIRST = dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=False)
SECOND = dict(target_modules=["k_proj", "o_proj", "down_proj"], r=2, lora_alpha=6, use_rslora=True,
              init_lora_weights=False)


@pytest.fixture(scope="module")
def base():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def batch(base):
    return inputs_for(base, batch=2, seq=7, pad=2)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _peft_two(base):
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**FIRST))
    pm.add_adapter("other", peft.LoraConfig(**SECOND))
    return pm.eval()


def _ours_two(base):
    torch.manual_seed(2)
    model = graphpeft.rewrite(copy.deepcopy(base), graphpeft.LoraConfig(**FIRST))
    model.add_adapter("other", graphpeft.LoraConfig(**SECOND))
    return model.eval()


@pytest.fixture(scope="module")
def peft_saved(base, tmp_path_factory):
    """A PEFT model with adapters "default" and "other", and the folder PEFT saved them to."""
    pm = _peft_two(base)
    folder = tmp_path_factory.mktemp("peft-two")
    pm.save_pretrained(str(folder))
    return pm, folder


@pytest.fixture(scope="module")
def ours_saved(base, tmp_path_factory):
    """A graphpeft model with adapters "default" and "other", and the folder it saved them to."""
    model = _ours_two(base)
    folder = tmp_path_factory.mktemp("ours-two")
    model.save_pretrained(str(folder))
    return model, folder


def _active_adapters_in_graph(model) -> set:
    return {n.meta["graphpeft"]["adapter"] for n in model.graph_module.graph.nodes if "graphpeft" in n.meta}


def test_peft_adapters_load_and_switch_as_in_peft(base, batch, peft_saved):
    pm, folder = peft_saved
    ours = graphpeft.from_pretrained(copy.deepcopy(base), str(folder))
    ours.load_adapter(str(folder / "other"), "other")
    assert sorted(ours.peft_config) == ["default", "other"] and ours.active_adapter == "default"
    outputs = {}
    for name in ("default", "other", "default", "other"):       # back and forth
        pm.set_adapter(name)
        ours.set_adapter(name)
        assert ours.active_adapter == name and _active_adapters_in_graph(ours) == {name}
        outputs[name] = _logits(ours, batch)
        torch.testing.assert_close(outputs[name], _logits(pm, batch), atol=ATOL, rtol=0)
    assert not torch.allclose(outputs["default"], outputs["other"], atol=1e-3)
    with ours.disable_adapter():
        torch.testing.assert_close(_logits(ours, batch), _logits(base, batch), atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(ours, batch), outputs["other"], atol=0, rtol=0)   # on again after the block


def test_saved_layout_is_peft_and_peft_loads_each(base, batch, ours_saved):
    model, folder = ours_saved
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert (folder / "other" / "adapter_config.json").is_file()
    assert json.loads((folder / "other" / "adapter_config.json").read_text())["r"] == 2
    saved = load_file(str(folder / "other" / "adapter_model.safetensors"))
    assert saved and all(".k_proj." in k or ".o_proj." in k or ".down_proj." in k for k in saved)
    assert not any(".other." in k for k in saved)           # PEFT strips the adapter name from file keys

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder))
    pm.load_adapter(str(folder / "other"), "other")
    for name in ("other", "default"):
        pm.set_adapter(name)
        model.set_adapter(name)
        torch.testing.assert_close(_logits(pm.eval(), batch), _logits(model, batch), atol=ATOL, rtol=0)


def test_saved_adapters_load_back(base, batch, ours_saved, tmp_path):
    model, folder = ours_saved
    again = graphpeft.from_pretrained(copy.deepcopy(base), str(folder))
    again.load_adapter(str(folder / "other"), "other")
    for name in ("other", "default"):
        model.set_adapter(name)
        again.set_adapter(name)
        torch.testing.assert_close(_logits(again, batch), _logits(model, batch), atol=0, rtol=0)
    # one adapter alone, named: it goes to its sub-folder; from_pretrained can give it its name back
    model.save_pretrained(str(tmp_path), selected_adapters=["other"])
    assert not (tmp_path / "adapter_config.json").exists() and (tmp_path / "other" / "adapter_config.json").is_file()
    alone = graphpeft.from_pretrained(copy.deepcopy(base), str(tmp_path / "other"), adapter_name="other")
    assert alone.active_adapter == "other"
    model.set_adapter("other")
    torch.testing.assert_close(_logits(alone, batch), _logits(model, batch), atol=0, rtol=0)


def test_only_the_active_adapter_trains(base, batch):
    model, pm = _ours_two(base), _peft_two(base)
    assert all(".default." in n for n, p in model.named_parameters() if p.requires_grad)   # added: not trainable
    for name in ("other", "default", "other"):
        model.set_adapter(name)
        pm.set_adapter(name)
        mine = {n for n, p in model.graph_module.named_parameters() if p.requires_grad}
        theirs = {n.removeprefix("base_model.model.") for n, p in pm.named_parameters() if p.requires_grad}
        assert mine == theirs and mine
        assert model.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    # a training step moves the active adapter only; the other one's outputs stay as they were
    model.set_adapter("default")
    before_default = _logits(model, batch)
    model.set_adapter("other")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".default." in n)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model.eval()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    model.set_adapter("default")
    torch.testing.assert_close(_logits(model, batch), before_default, atol=0, rtol=0)
    model.set_adapter("other", inference_mode=True)
    assert not any(p.requires_grad for p in model.parameters())


def test_merge_takes_the_active_adapter_only(base, batch):
    model = _ours_two(base)
    for name in ("other", "default"):
        model.set_adapter(name)
        expected = _logits(model, batch)
        merged = model.merge_and_unload()
        assert type(merged) is type(base)
        assert not any("graphpeft" in n.meta for n in model.merged_graph().graph_module.graph.nodes)   # no adapter nodes
        torch.testing.assert_close(_logits(merged, batch), expected, atol=ATOL, rtol=0)


def test_lora_and_ia3_side_by_side(base, batch, tmp_path):
    torch.manual_seed(4)
    model = graphpeft.rewrite(copy.deepcopy(base), graphpeft.LoraConfig(**FIRST))
    model.add_adapter("scales", graphpeft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                    feedforward_modules=["down_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".ia3_l." in n:
                p.uniform_(0.5, 1.5)
    model.eval().save_pretrained(str(tmp_path))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "scales")).eval()
    assert pm.peft_config["default"].peft_type == "IA3"
    model.set_adapter("scales")
    assert _active_adapters_in_graph(model) == {"scales"}
    torch.testing.assert_close(_logits(model, batch), _logits(pm, batch), atol=ATOL, rtol=0)
    lora = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    model.set_adapter("default")
    torch.testing.assert_close(_logits(model, batch), _logits(lora, batch), atol=ATOL, rtol=0)


def test_prompt_tuning_beside_lora(base, batch):
    """A token-adding adapter has its own graph: the sequence grows only while it is active."""
    torch.manual_seed(5)
    config = graphpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    model = graphpeft.rewrite(copy.deepcopy(base), graphpeft.LoraConfig(**FIRST)).eval()
    lora_out = _logits(model, batch)
    model.add_adapter("prompt", config)
    model.set_adapter("prompt")
    alone = graphpeft.rewrite(copy.deepcopy(base), config).eval()
    with torch.no_grad():
        alone.graph_module.get_parameter("prompt_encoder.default.embedding.weight").copy_(model.graph_module.get_parameter("prompt_encoder.prompt.embedding.weight"))
    out = _logits(model, batch)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3
    torch.testing.assert_close(out, _logits(alone, batch), atol=ATOL, rtol=0)
    model.set_adapter("default")
    torch.testing.assert_close(_logits(model, batch), lora_out, atol=0, rtol=0)


def _one_line_error(fn, *words):
    with pytest.raises(GraphPeftError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_bad_names_and_files_are_one_line_errors(base, ours_saved, tmp_path):
    model, folder = ours_saved
    config = graphpeft.LoraConfig(target_modules=["q_proj"])
    _one_line_error(lambda: model.set_adapter("nope"), "'nope'", "default", "other")
    _one_line_error(lambda: model.add_adapter("other", config), "'other'", "already exists")
    _one_line_error(lambda: model.add_adapter("a.b", config), "'a.b'")
    _one_line_error(lambda: model.save_pretrained(str(tmp_path), selected_adapters=["nope"]), "'nope'")
    _one_line_error(lambda: model.delete_adapter("nope"), "'nope'")
    # a file that lacks keys: the half-added adapter is rolled back
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    save_file(dict(list(tensors.items())[1:]), str(broken / "adapter_model.safetensors"))
    n_records, n_params = len(model.records), len(list(model.parameters()))
    _one_line_error(lambda: model.load_adapter(str(broken), "broken"), "lacks")
    assert "broken" not in model.peft_config and len(model.records) == n_records
    assert len(list(model.parameters())) == n_params


def test_load_adapter_into_an_existing_name_loads_its_weights(base, batch, ours_saved):
    model, folder = ours_saved
    model.set_adapter("other")
    saved = _logits(model, batch)
    with torch.no_grad():
        for n, p in model.graph_module.named_parameters():
            if ".other." in n:
                p.mul_(3)
    assert not torch.allclose(_logits(model, batch), saved, atol=1e-3)
    model.load_adapter(str(folder / "other"), "other")
    torch.testing.assert_close(_logits(model, batch), saved, atol=0, rtol=0)


def test_delete_adapter(base, batch):
    model = _ours_two(base)
    model.set_adapter("other")
    other_out = _logits(model, batch)
    model.delete_adapter("default")
    assert list(model.peft_config) == ["other"] and model.active_adapter == "other"
    assert not any(".default." in n for n, _ in model.named_parameters())
    assert all(r.adapter == "other" for r in model.records)
    torch.testing.assert_close(_logits(model, batch), other_out, atol=0, rtol=0)
    _one_line_error(lambda: model.delete_adapter("other"), "only adapter")
