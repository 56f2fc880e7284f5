"""The adapter folder: atomic writes, and one-line errors for folders that do not fit the model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import graphpeft
from graphpeft.engine.errors import AdapterFormatError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    folder = tmp_path_factory.mktemp("adapter")
    graphpeft.rewrite(copy.deepcopy(model), graphpeft.LoraConfig(r=4, init_lora_weights=False)).save_pretrained(folder)
    return model, folder


def _copy(folder, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    for f in folder.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_weights(folder, edit):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_save_writes_no_temporary_files(saved):
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_save_over_an_existing_adapter_keeps_other_files(saved, tmp_path):
    model, folder = saved
    out = _copy(folder, tmp_path)
    (out / "README.md").write_text("mine")
    graphpeft.rewrite(copy.deepcopy(model), graphpeft.LoraConfig(r=2)).save_pretrained(out)
    assert (out / "README.md").read_text() == "mine"
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2


@pytest.mark.parametrize("breakage, message", [
    (lambda f: _edit_config(f, r=8), "shape"),
    (lambda f: _edit_config(f, target_modules=["q_proj"]), "does not have"),
    (lambda f: _edit_config(f, target_modules=["q_proj", "v_proj", "o_proj"]), "lacks"),
    (lambda f: _edit_weights(f, lambda t: t.update({k: v.long() for k, v in t.items()})), "dtype"),
    (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x00" * 20), "safetensors"),
    (lambda f: (f / "adapter_model.safetensors").write_bytes((f / "adapter_model.safetensors").read_bytes()[:100]), "safetensors"),
    (lambda f: (f / "adapter_config.json").write_text("{not json"), "JSON"),
    (lambda f: _edit_config(f, peft_type="NOPE"), "peft_type"),
    (lambda f: _edit_config(f, loftq_config={"loftq_bits": 4}), "loftq_config="),
    (lambda f: _edit_config(f, r=0), "positive integer"),
    (lambda f: (f / "adapter_model.safetensors").rename(f / "adapter_model.bin"), "pickle"),
    (lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json"),
])
def test_a_folder_that_does_not_fit_gives_one_line(saved, tmp_path, breakage, message):
    model, folder = saved
    out = _copy(folder, tmp_path)
    breakage(out)
    with pytest.raises(graphpeft.GraphPeftError) as info:
        graphpeft.from_pretrained(copy.deepcopy(model), out)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_a_missing_folder_is_named(saved, tmp_path):
    model, _ = saved
    with pytest.raises(AdapterFormatError, match="does not exist"):
        graphpeft.from_pretrained(copy.deepcopy(model), tmp_path / "nowhere")


def test_loaded_adapter_is_frozen_unless_trainable(saved):
    model, folder = saved
    frozen = graphpeft.from_pretrained(copy.deepcopy(model), folder)
    assert not frozen.training and frozen.get_nb_trainable_parameters()[0] == 0
    live = graphpeft.from_pretrained(copy.deepcopy(model), folder, is_trainable=True)
    names = [n for n, p in live.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n for n in names)
