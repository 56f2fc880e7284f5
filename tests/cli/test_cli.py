"""The `graphpeft` command: rewrite / inspect on tiny saved models, option building, errors, atomic output.

Most runs call ``graphpeft.cli.commands.main([...])`` in-process (it returns the exit code); one runs the command
in a subprocess, end to end.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import graphpeft
from graphpeft.cli import commands as cli
from graphpeft.engine import registry
from graphpeft.runtime import hub
from graphpeft.engine.config import TargetingConfig
from graphpeft.engine.rule import RulePass

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
    from graphpeft.engine.match import find_sites

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


@pytest.fixture()
def toy_method(monkeypatch):
    """A method registered for the test only (config with one CLI field, --width); returns its config class."""
    @dataclasses.dataclass
    class ToyConfig(TargetingConfig):
        peft_type = "TOY"
        width: int = dataclasses.field(default=3, metadata={"cli": "--width", "help": "toy width"})

    class ToyPass(RulePass):
        rule_cls = None

    monkeypatch.setitem(registry._METHODS, "toy", registry.Method("toy", ToyConfig, ToyPass, "a toy method"))
    return ToyConfig


def test_help_lists_method_options_and_a_new_method_brings_its_own(capsys, toy_method):
    code, stdout, _ = run(capsys, "rewrite", "--help")
    assert code == 0
    for flag in ("--r", "--alpha", "--dropout", "--targets", "--rslora", "--overwrite", cli.DEFAULT_OUT):
        assert flag in stdout

    code, stdout, _ = run(capsys, "train", "--method", "toy", "--help")
    assert code == 0
    assert "--width" in stdout and "toy width (default: 3)" in stdout and "--targets" in stdout
    assert "--alpha" not in stdout and "--r " not in stdout
    args, method = cli.parse_args(["rewrite", "--method", "toy", "--width", "5"])
    assert cli.build_config(method, args) == toy_method(width=5)


# -- bad input: exit 2, one line, nothing left behind ---------------------------------------------

@pytest.fixture(scope="module")
def wav2vec_dir(tmp_path_factory) -> Path:
    """A model graphpeft cannot capture as saved: SpecAugment on (its default), whose random masks steer
    the model's Python code in train mode."""
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
    "uncapturable model": (["rewrite", "{wav2vec}"], "layerdrop=0.0 and apply_spec_augment=False"),
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

    monkeypatch.setattr(hub, "load_model", broken)
    code, _, err = run(capsys, "inspect", tiny_bert_dir)
    assert_one_line_error(code, err, expected_code=1)
    assert "RuntimeError: something deep broke" in err and "GRAPHPEFT_DEBUG=1" in err

    monkeypatch.setenv("GRAPHPEFT_DEBUG", "1")
    code, _, err = run(capsys, "inspect", tiny_bert_dir)
    assert code == 1 and "Traceback" in err and "please report it" in err


# -- conventions: --version, help with examples, methods, --json, --config, --report, progress -------------

COMMANDS = ("inspect", "rewrite", "train", "export", "edge-train", "methods")


def test_version_and_an_example_in_every_commands_help(capsys):
    code, stdout, err = run(capsys, "--version")
    assert code == 0 and stdout == f"graphpeft {graphpeft.__version__}\n" and err == ""
    code, stdout, _ = run(capsys, "--help")
    assert code == 0 and all(name in stdout for name in COMMANDS) and "--version" in stdout
    assert all(name in stdout for name in registry.methods())
    for name in COMMANDS:
        code, stdout, _ = run(capsys, name, "--help")
        assert code == 0, name
        examples = stdout.split("Examples:", 1)
        assert len(examples) == 2 and f"graphpeft {name} " in examples[1], stdout


def _option_rows(method: registry.Method) -> list[tuple[str, str, object]]:
    rows = []
    for f in dataclasses.fields(method.config_cls):
        if f.metadata.get("cli"):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            rows.append((f.metadata["cli"], f.name, default))
    return rows


def test_methods_lists_every_registered_method_with_its_options(capsys, toy_method):
    code, stdout, err = run(capsys, "methods")
    assert code == 0, err
    blocks = {b.split()[0]: b for b in stdout.strip().split("\n\n") if b.strip()}
    for name, method in registry.methods().items():
        assert method.config_cls.__name__ in blocks[name]
        for flag, field, _ in _option_rows(method):
            assert any(ln.split()[:1] == [flag] and f"{field}:" in ln for ln in blocks[name].splitlines()), (name, flag)
    assert "toy width (default: 3)" in blocks["toy"]

    code, stdout, err = run(capsys, "methods", "--json")
    assert code == 0, err
    listed = {m["name"]: m for m in json.loads(stdout)["methods"]}
    assert set(listed) == set(registry.methods())
    for name, method in registry.methods().items():
        assert listed[name]["peft_type"] == method.config_cls.peft_type
        got = [(o["flag"], o["field"], o["default"]) for o in listed[name]["options"]]
        assert got == [(flag, field, json.loads(json.dumps(default, default=str)))
                       for flag, field, default in _option_rows(method)]
    assert listed["toy"]["options"][-1]["type"] == "int"


def test_inspect_json_is_the_only_thing_on_stdout_and_holds_the_sites(tiny_bert_dir, capsys):
    from graphpeft.engine.match import find_sites

    code, stdout, err = run(capsys, "inspect", tiny_bert_dir, "--json", "--targets", "query")
    assert code == 0, err
    result = json.loads(stdout)                                  # the whole of stdout is one JSON object
    sites = find_sites(graphpeft.capture(_bert(tiny_bert_dir)))
    assert result["method"] == "lora" and result["candidate_sites"] == len(sites) == len(result["sites"])
    assert [(s["module_path"], s["kind"], s["in_features"], s["out_features"]) for s in result["sites"]] == \
        [(s.module_path, s.kind, s.in_features, s.out_features) for s in sites]
    taken = sorted(s["module_path"] for s in result["sites"] if s["taken"])
    assert taken == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]
    assert result["taken_sites"] == 2


def test_rewrite_json_and_report_html(tiny_bert_dir, runs, capsys):
    out = runs / "out"
    code, stdout, err = run(capsys, "rewrite", tiny_bert_dir, "-o", out, "--r", "4", "--targets", "query", "value",
                            "--report", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["files"] == sorted(ADAPTER_FILES | {"report.html"}) == sorted(p.name for p in out.iterdir())
    assert os.listdir(runs) == ["out"]                         # the report was written in the staged folder
    assert result["output"] == str(out) and result["method"] == "lora" and result["config"]["r"] == 4
    assert result["counts"]["rewritten_sites"] == 4
    assert result["counts"] == json.loads((out / "rewrite.json").read_text())["counts"]
    html = (out / "report.html").read_text()
    assert html.count("<svg") >= 2                              # before and after drawings of the linear site
    for rec in result["records"]:
        assert rec["module_path"] in html


def _saved_peft_config(folder: Path, config) -> Path:
    config.save_pretrained(str(folder))
    return folder / "adapter_config.json"


def test_config_takes_a_peft_adapter_config_and_options_beside_it_override_it(tiny_bert_dir, runs, tmp_path, capsys):
    import peft
    from peft.utils import get_peft_model_state_dict

    file = _saved_peft_config(tmp_path / "peft", peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, use_rslora=True,
                                                                target_modules=["query", "value"],
                                                                task_type="SEQ_CLS"))
    out = runs / "out"
    code, _, err = run(capsys, "rewrite", tiny_bert_dir, "--config", file, "--r", "2", "-o", out)
    assert code == 0, err
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["r"] == 2                                     # the option given beside --config wins
    assert written["lora_alpha"] == 16 and written["lora_dropout"] == 0.1 and written["use_rslora"] is True
    assert written["base_model_name_or_path"] == str(tiny_bert_dir)
    # the same config in PEFT gives the same keys and shapes
    theirs = peft.get_peft_model(_bert(tiny_bert_dir), peft.LoraConfig(r=2, lora_alpha=16, lora_dropout=0.1,
                                                                        use_rslora=True, task_type="SEQ_CLS",
                                                                        target_modules=["query", "value"]))
    want = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(theirs).items()}
    got = {k: tuple(v.shape) for k, v in load_file(out / "adapter_model.safetensors").items()}
    assert got == want


def test_config_brings_its_method_and_refuses_a_contradicting_method(tmp_path, capsys):
    import peft

    file = _saved_peft_config(tmp_path / "ia3", peft.IA3Config(target_modules=["key", "value", "output.dense"],
                                                              feedforward_modules=["output.dense"]))
    args, method = cli.parse_args(["rewrite", "--config", str(file.parent), "--feedforward", "output.dense"])
    config = cli.build_config(method, args)
    assert method is registry.method("ia3") and type(config).__name__ == "IA3Config"
    assert sorted(config.target_modules) == ["key", "output.dense", "value"]
    assert config.feedforward_modules == ["output.dense"]

    code, stdout, err = run(capsys, "rewrite", "--method", "lora", "--config", file, "--json")
    assert_one_line_error(code, err)
    assert "does not match --config" in err and "IA3" in err and stdout == ""
    (tmp_path / "bad.json").write_text("{not json")
    code, _, err = run(capsys, "inspect", "--config", tmp_path / "bad.json")
    assert_one_line_error(code, err)
    assert "is not valid JSON" in err


def test_a_usage_error_and_an_internal_error_keep_stdout_empty_under_json(tiny_bert_dir, capsys, monkeypatch):
    code, stdout, err = run(capsys, "inspect", tiny_bert_dir, "--json", "--r", "x")
    assert_one_line_error(code, err)
    assert "argument --r: expected an integer, got 'x'" in err and stdout == ""

    def broken(*args, **kwargs):
        raise RuntimeError("capture exploded")

    monkeypatch.setattr(graphpeft, "capture", broken)
    code, stdout, err = run(capsys, "inspect", tiny_bert_dir, "--json")
    assert_one_line_error(code, err, expected_code=1)
    assert "RuntimeError: capture exploded" in err and "please report it" in err and stdout == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_drawn_on_a_terminal_stderr_only_and_never_when_silenced(monkeypatch):
    from graphpeft.runtime import progress

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with progress.bar(3, "epoch 1/1") as advance:
        for _ in range(3):
            advance(loss="0.5000", budget="11/16")
    with progress.spinner("capturing the graph"):
        pass
    drawn = terminal.getvalue()
    assert "epoch 1/1" in drawn and "budget=11/16" in drawn and "capturing the graph" in drawn

    terminal.seek(0)
    terminal.truncate()
    with progress.silenced(), progress.bar(3, "epoch 1/1") as advance, progress.spinner("capturing"):
        advance(loss="1")
    with progress.bar(3, "epoch 1/1", show=False) as advance:
        advance(loss="1")
    assert terminal.getvalue() == ""
    monkeypatch.setattr(sys, "stderr", io.StringIO())   # not a terminal: nothing drawn
    assert not progress.enabled()


def test_methods_json_in_a_subprocess_prints_only_json(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-m", "graphpeft", "methods", "--json"], capture_output=True, text=True,
                          env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert {m["name"] for m in json.loads(proc.stdout)["methods"]} == set(registry.methods())
