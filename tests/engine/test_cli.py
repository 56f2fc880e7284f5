"""The `graphpeft` command: rewrite / inspect on tiny saved models, option building, errors, atomic output.

Most runs call ``graphpeft.cli.main([...])`` in-process (it returns the exit code); one runs the command
in a subprocess, end to end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import graphpeft
from graphpeft import cli, registry
from graphpeft.config import TargetingConfig
from graphpeft.rule import RulePass

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "rewrite.json"}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, expected_code: int = 2) -> None:
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    prefix = "graphpeft: error: " if expected_code == 2 else "graphpeft: internal error: "
    assert lines[0].startswith(prefix), err


@pytest.fixture()
def runs(tmp_path) -> Path:
    """An empty parent folder for OUT, so a test can check that a failed run leaves nothing in it."""
    folder = tmp_path / "runs"
    folder.mkdir()
    return folder


def _bert_inputs(folder: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    batch = tok(["a fine film", "the soup was cold and the staff rude"], padding=True, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _bert(folder: Path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(folder).eval()


# -- rewrite --------------------------------------------------------------------------------------

def test_rewrite_writes_an_adapter_that_graphpeft_and_peft_load_alike(tiny_bert_dir, runs, capsys):
    import peft

    out = runs / "out"
    code, stdout, err = run(capsys, "rewrite", tiny_bert_dir, "-o", out, "--r", "4", "--alpha", "8",
                            "--targets", "query", "value")
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == ADAPTER_FILES
    assert os.listdir(runs) == ["out"]                       # no temporary folder left beside it
    umask = os.umask(0)
    os.umask(umask)
    assert {(p.stat().st_mode & 0o777) for p in out.iterdir()} == {0o666 & ~umask}   # not mkstemp's 0600
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask

    paths = [f"bert.encoder.layer.{i}.attention.self.{n}" for i in range(2) for n in ("query", "value")]
    for path in paths:
        line = next(ln for ln in stdout.splitlines() if ln.split()[:1] == [path])
        assert "linear" in line and "32 -> 32" in line and "lora_A.weight [4, 32]" in line
    assert "trainable params: " in stdout and " || all params: " in stdout and " || trainable%: " in stdout

    report = json.loads((out / "rewrite.json").read_text())
    assert report["method"] == "lora" and report["model"] == str(tiny_bert_dir)
    assert report["counts"]["rewritten_sites"] == 4 and report["counts"]["modules_to_save"] == 1
    assert sorted(r["module_path"] for r in report["records"]) == sorted(paths + ["classifier"])
    assert report["config"]["r"] == 4 and report["config"]["lora_alpha"] == 8
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and sorted(config["target_modules"]) == sorted(paths)
    assert isinstance(config["lora_alpha"], int)             # "--alpha 8" is written as 8, like PEFT

    # give the adapter a non-zero B and a new head so that loading it changes the outputs; load it both ways
    weights = load_file(out / "adapter_model.safetensors")
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(weights)
    gen = torch.Generator().manual_seed(0)
    weights = {k: (v if "lora_A" in k else torch.randn(v.shape, generator=gen)) for k, v in weights.items()}
    save_file(weights, out / "adapter_model.safetensors", metadata={"format": "pt"})
    inputs = _bert_inputs(tiny_bert_dir)
    ours = graphpeft.from_pretrained(_bert(tiny_bert_dir), str(out))
    theirs = peft.PeftModel.from_pretrained(_bert(tiny_bert_dir), str(out)).eval()
    with torch.no_grad():
        base, got, want = _bert(tiny_bert_dir)(**inputs).logits, ours(**inputs).logits, theirs(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 0.1


def test_rewrite_end_to_end_in_a_subprocess_on_a_causal_lm(tiny_llama_dir, runs):
    out = runs / "llama-adapter"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-m", "graphpeft.cli", "rewrite", str(tiny_llama_dir), "-o", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} == ADAPTER_FILES
    config = json.loads((out / "adapter_config.json").read_text())
    expected = [f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "v_proj")]
    assert sorted(config["target_modules"]) == sorted(expected)   # LoRA's default: query and value
    assert config["task_type"] == "CAUSAL_LM" and config["r"] == 8
    assert all(path in proc.stdout for path in expected)
    assert "trainable params: 2,048 ||" in proc.stdout           # 4 sites x (8x32 + 32x8)


def test_overwrite_replaces_out_and_refuses_without_the_flag(tiny_bert_dir, runs, capsys):
    out = runs / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    code, _, err = run(capsys, "rewrite", tiny_bert_dir, "-o", out, "--targets", "query")
    assert_one_line_error(code, err)
    assert "not empty" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["old.txt"]

    code, _, err = run(capsys, "rewrite", tiny_bert_dir, "-o", out, "--targets", "query", "--overwrite")
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == ADAPTER_FILES    # the old folder is gone, not merged
    assert os.listdir(runs) == ["out"]


def test_a_failure_while_writing_leaves_the_old_output_and_no_temporary_folder(tiny_bert_dir, runs, capsys,
                                                                                monkeypatch):
    out = runs / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")

    def half_write(self, directory, adapter_name=None):
        Path(directory, "adapter_model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(graphpeft.GraphPeftModel, "save_pretrained", half_write)
    code, _, err = run(capsys, "rewrite", tiny_bert_dir, "-o", out, "--targets", "query", "--overwrite")
    assert_one_line_error(code, err, expected_code=1)
    assert "please report it" in err and "No space left on device" in err
    assert os.listdir(runs) == ["out"] and [p.name for p in out.iterdir()] == ["old.txt"]


# -- inspect --------------------------------------------------------------------------------------

def test_inspect_lists_every_candidate_site_and_marks_the_methods_choice(tiny_bert_dir, capsys):
    from graphpeft.match import find_sites

    sites = find_sites(graphpeft.capture(_bert(tiny_bert_dir)))
    code, stdout, err = run(capsys, "inspect", tiny_bert_dir)
    assert code == 0, err
    rows = {ln[2:].split()[0]: ln for ln in stdout.splitlines() if ln[:1] in ("*", " ") and ln[2:].split()[:1]}
    for site in sites:
        row = rows[site.module_path].split()
        assert site.kind in row and str(site.in_features) in row and str(site.out_features) in row
    marked = sorted(p for p, ln in rows.items() if ln.startswith("*"))
    assert marked == sorted(f"bert.encoder.layer.{i}.attention.self.{n}" for i in range(2) for n in ("query", "value"))

    code, stdout, err = run(capsys, "inspect", tiny_bert_dir, "--targets", "all-linear")
    assert code == 0, err
    marked = {ln[2:].split()[0] for ln in stdout.splitlines() if ln.startswith("* ")}
    linear = {s.module_path for s in sites if s.kind == "linear"}
    assert marked == linear - {"classifier"}                     # all-linear leaves the output head alone


# -- options come from the method's config, through the registry ------------------------------------

def test_method_options_are_built_from_the_config_fields():
    args, method = cli.parse_args(["rewrite", "--targets", "query,value", "key", "--alpha", "16", "--dropout", "0.1"])
    config = cli.build_config(method, args)
    assert method is registry.method("lora")
    assert config.target_modules == ["query", "value", "key"]
    assert config.lora_alpha == 16 and isinstance(config.lora_alpha, int) and config.lora_dropout == 0.1
    assert config.r == 8                                          # unset options keep the config default
    args, method = cli.parse_args(["rewrite", "--targets", r"bert\.encoder\.layer\.0\..*"])
    assert cli.build_config(method, args).target_modules == r"bert\.encoder\.layer\.0\..*"
    args, method = cli.parse_args(["rewrite", "--targets", "all-linear", "--rslora"])
    config = cli.build_config(method, args)
    assert config.target_modules == "all-linear" and config.use_rslora is True


def test_help_lists_method_options_and_a_new_method_brings_its_own(capsys, monkeypatch):
    code, stdout, _ = run(capsys, "rewrite", "--help")
    assert code == 0
    for flag in ("--r", "--alpha", "--dropout", "--targets", "--rslora", "--overwrite", cli.DEFAULT_OUT):
        assert flag in stdout

    @dataclasses.dataclass
    class ToyConfig(TargetingConfig):
        peft_type = "TOY"
        width: int = dataclasses.field(default=3, metadata={"cli": "--width", "help": "toy width"})

    class ToyPass(RulePass):
        rule_cls = None

    monkeypatch.setitem(registry._METHODS, "toy", registry.Method("toy", ToyConfig, ToyPass, "a toy method"))
    code, stdout, _ = run(capsys, "train", "--method", "toy", "--help")
    assert code == 0
    assert "--width" in stdout and "toy width (default: 3)" in stdout and "--targets" in stdout
    assert "--alpha" not in stdout and "--r " not in stdout
    args, method = cli.parse_args(["rewrite", "--method", "toy", "--width", "5"])
    assert cli.build_config(method, args) == ToyConfig(width=5)


# -- bad input: exit 2, one line, nothing left behind ---------------------------------------------

@pytest.fixture(scope="module")
def wav2vec_dir(tmp_path_factory) -> Path:
    """A model graphpeft cannot capture without example inputs (main input 'input_values')."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    config = Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                            conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
                            num_conv_pos_embedding_groups=2)
    folder = tmp_path_factory.mktemp("wav2vec")
    Wav2Vec2Model(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def other_bert_adapter(tmp_path_factory) -> Path:
    """A LoRA adapter saved for a BERT of another width (hidden 48): same keys, other shapes."""
    from tests.models import tiny_bert_cls

    model = tiny_bert_cls(vocab_size=30522, hidden_size=48)
    folder = tmp_path_factory.mktemp("other-adapter")
    config = graphpeft.LoraConfig(target_modules=["query", "value"], task_type="SEQ_CLS")
    graphpeft.rewrite(model, config).save_pretrained(str(folder))
    return folder


BAD_INPUTS = {
    "unknown method": (["rewrite", "{bert}", "--method", "nope"], "unknown method 'nope'"),
    "targets match nothing": (["rewrite", "{bert}", "--targets", "no_such_layer"], "matched no site"),
    "r <= 0": (["rewrite", "{bert}", "--r", "0"], "r must be a positive integer"),
    "r not a number": (["rewrite", "{bert}", "--r", "eight"], "argument --r"),
    "regex among names": (["rewrite", "{bert}", "--targets", "query", "val.*"], "must be the only value"),
    "uncapturable model": (["rewrite", "{wav2vec}"], "cannot synthesize example inputs"),
    "missing hub id offline": (["rewrite", "nobody/no-such-model"], "not found locally (offline)"),
    "missing folder": (["rewrite", "./no/such/folder"], "does not exist"),
    "not a model folder": (["inspect", "{runs}"], "no config.json"),
    "unknown command": (["rewrap", "{bert}"], "invalid choice"),
    "adapter does not fit": (["train", "{out}", "--data", "{data}", "{bert}", "--adapter", "{adapter}"],
                             "in the file but"),
    "adapter with options": (["train", "{out}", "--data", "{data}", "{bert}", "--adapter", "{adapter}", "--r", "2"],
                             "drop --r"),
    "bad data file": (["train", "{out}", "--data", "{bad_data}", "{bert}"], "bad.jsonl:2:"),
    "missing data file": (["train", "{out}", "--data", "{runs}/none.jsonl", "{bert}"], "does not exist"),
    "epochs <= 0": (["train", "{out}", "--data", "{data}", "{bert}", "--epochs", "0"], "positive integer"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, tiny_bert_dir, wav2vec_dir, other_bert_adapter,
                                                        runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    data, bad_data = tmp_path / "data.jsonl", tmp_path / "bad.jsonl"
    data.write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n')
    bad_data.write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": "zero"}\n')
    names = {"bert": tiny_bert_dir, "wav2vec": wav2vec_dir, "adapter": other_bert_adapter, "runs": runs,
             "out": runs / "out", "data": data, "bad_data": bad_data}
    argv, expected = BAD_INPUTS[case]
    argv = [a.format(**names) for a in argv]
    if argv[0] == "rewrite":
        argv += ["-o", str(runs / "out")]
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err)
    assert expected in err
    assert os.listdir(runs) == []
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "data.jsonl", "runs"]   # no ./graphpeft-out either


def test_an_unexpected_error_is_one_line_exit_1_with_a_traceback_only_in_debug_mode(tiny_bert_dir, capsys,
                                                                                     monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something deep\nbroke")

    monkeypatch.setattr(graphpeft.hub, "load_model", broken)
    code, _, err = run(capsys, "inspect", tiny_bert_dir)
    assert_one_line_error(code, err, expected_code=1)
    assert "RuntimeError: something deep broke" in err and "GRAPHPEFT_DEBUG=1" in err

    monkeypatch.setenv("GRAPHPEFT_DEBUG", "1")
    code, _, err = run(capsys, "inspect", tiny_bert_dir)
    assert code == 1 and "Traceback" in err and "please report it" in err
