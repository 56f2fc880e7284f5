"""Nothing lost, nothing run: interrupted saves, reproducible outputs, no unpickling, no remote code.

- A save killed midway (SIGKILL while the new weights are half written) leaves the previous adapter's
  files byte for byte and loadable; the half-written file only ever exists under a hidden temporary name.
- The same inputs and seed give byte-identical adapter files and rewrite.json, for every method and across
  processes with different hash seeds; another seed gives other weights.
- Loading never unpickles: a pickle under either adapter file name is refused with one line and its
  payload never runs; the source calls torch.load only with weights_only=True and never imports pickle.
- trust_remote_code is False unless ``--trust-remote-code`` is given, and a model folder with custom code
  is refused without running it.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import graphpeft
from graphpeft.cli import commands as cli
from graphpeft.engine.errors import AdapterFormatError, GraphPeftError
import graphpeft.runtime.io as gio
from tests.models import tiny_llama

ROOT = Path(__file__).resolve().parents[2]
FILES = ("adapter_config.json", "adapter_model.safetensors")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _digests(folder: Path, names=FILES) -> dict[str, str]:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


def _visible(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if not p.name.startswith(".")}


def _lora(r: int = 8):
    return graphpeft.LoraConfig(r=r, lora_alpha=16, target_modules="all-linear", init_lora_weights="gaussian")


# -- a save killed midway -------------------------------------------------------------------------------

_KILLED_SAVE = r"""
import hashlib, sys, time
import torch, graphpeft
import graphpeft.runtime.io as gio
from tests.models import tiny_llama
out = sys.argv[1]
torch.manual_seed(0)
first = graphpeft.rewrite(tiny_llama(), graphpeft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                             init_lora_weights="gaussian"))
first.save_pretrained(out)
print("saved", flush=True)
second = graphpeft.rewrite(tiny_llama(), graphpeft.LoraConfig(r=4, target_modules="all-linear",
                                                              init_lora_weights="gaussian"))
real = gio.save_file
def half_then_hang(state, path, metadata=None):   # the new weights are half on disk when the kill comes
    real(state, path, metadata=metadata)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    print("mid-write", path, flush=True)
    time.sleep(120)
gio.save_file = half_then_hang
second.save_pretrained(out)
print("not killed", flush=True)
"""


def test_save_killed_midway_leaves_the_previous_adapter(tmp_path):
    out = tmp_path / "adapter"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(out)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "saved", proc.stderr.read()
        before = _digests(out)
        line = proc.stdout.readline().split()
        assert line[:1] == ["mid-write"], proc.stderr.read()
        partial = Path(line[1])
        assert partial.is_file() and partial.stat().st_size > 0
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # the final names hold the previous adapter, byte for byte; the partial file only under a hidden name
    assert _visible(out) == set(FILES)
    assert _digests(out) == before
    assert partial.parent == out and partial.name.startswith(".") and partial.name.endswith(".tmp")
    config, tensors = gio.read_adapter(out)
    assert config["r"] == 8
    torch.manual_seed(0)
    expected = graphpeft.rewrite(tiny_llama(), _lora(8))
    loaded = graphpeft.from_pretrained(tiny_llama(), str(out))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected(input_ids=ids).logits, rtol=0, atol=0)
    # a later save over the leftovers works
    expected.save_pretrained(str(out))
    assert _digests(out) == before


@pytest.mark.parametrize("fail_in", ["weights", "config"])
def test_save_interrupted_in_process_changes_nothing_and_leaves_no_temporary(tmp_path, monkeypatch, fail_in):
    """Weights and config are both written before either is renamed: a failure in either keeps both old files."""
    torch.manual_seed(0)
    model = graphpeft.rewrite(tiny_llama(), _lora(8))
    model.save_pretrained(str(tmp_path))
    before = _digests(tmp_path)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    if fail_in == "weights":
        real = gio.save_file

        def interrupted(state, path, metadata=None):
            real(state, path, metadata=metadata)
            raise KeyboardInterrupt
        monkeypatch.setattr(gio, "save_file", interrupted)
    else:
        def no_space(*args, **kwargs):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(gio.json, "dumps", no_space)
    with pytest.raises((KeyboardInterrupt, OSError)):
        model.save_pretrained(str(tmp_path))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)      # no temporary left behind
    assert _digests(tmp_path) == before


# -- same inputs and seed, same bytes -------------------------------------------------------------------

METHOD_ARGS = {
    "lora": ["--targets", "all-linear"],
    "adalora": ["--total-step", "10"],
    "ia3": [],
    "prompt_tuning": ["--num-virtual-tokens", "4"],
    "p_tuning": ["--num-virtual-tokens", "4"],
    "prefix_tuning": ["--num-virtual-tokens", "4"],
    "multitask_prompt_tuning": ["--num-virtual-tokens", "4"],
}
REPORT_FILES = (*FILES, "rewrite.json")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(folder)
    return folder


def test_every_method_is_covered():
    assert set(METHOD_ARGS) == set(graphpeft.engine.registry.methods())


@pytest.mark.parametrize("method", sorted(METHOD_ARGS))
def test_same_inputs_and_seed_give_identical_files(method, llama_dir, tmp_path, capsys):
    outs = []
    for i in range(2):
        torch.manual_seed(1234 + i)        # the global RNG state before the command must not matter
        out = tmp_path / f"run{i}"
        assert cli.main(["rewrite", "--method", method, str(llama_dir), "-o", str(out), *METHOD_ARGS[method]]) == 0
        outs.append(out)
    capsys.readouterr()
    assert _visible(outs[0]) == set(REPORT_FILES)
    assert _digests(outs[0], REPORT_FILES) == _digests(outs[1], REPORT_FILES)


def test_identical_across_processes_and_hash_seeds_and_the_seed_matters(llama_dir, tmp_path, capsys):
    """A fresh process with a fixed hash seed writes what this one (random hash seed) writes; --seed 1 does not."""
    argv = ["rewrite", str(llama_dir), "--targets", "all-linear", "-o"]
    proc = subprocess.run([sys.executable, "-m", "graphpeft", *argv, str(tmp_path / "fresh")], cwd=tmp_path,
                          env={**ENV, "PYTHONHASHSEED": "12345"}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert cli.main([*argv, str(tmp_path / "here")]) == 0
    assert cli.main([*argv, str(tmp_path / "seed1"), "--seed", "1"]) == 0
    capsys.readouterr()
    fresh, here, seed1 = (_digests(tmp_path / name, REPORT_FILES) for name in ("fresh", "here", "seed1"))
    assert fresh == here
    assert seed1["adapter_model.safetensors"] != here["adapter_model.safetensors"]
    assert (seed1["adapter_config.json"], seed1["rewrite.json"]) == (here["adapter_config.json"], here["rewrite.json"])


# -- loading never unpickles ----------------------------------------------------------------------------

class _Payload:
    """A pickle that creates a marker file when it is unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickled_adapter(folder: Path, name: str, marker: Path) -> Path:
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 8,
                                                            "target_modules": ["q_proj", "v_proj"]}))
    (folder / name).write_bytes(pickle.dumps({"w": _Payload(marker)}))
    return folder


@pytest.mark.parametrize("name, fragment", [
    ("adapter_model.bin", "holds adapter_model.bin (a pickle), which graphpeft does not load"),
    ("adapter_model.safetensors", "is not a readable safetensors file"),
])
def test_a_pickled_adapter_is_refused_unopened(tmp_path, name, fragment):
    marker = tmp_path / "unpickled"
    folder = _pickled_adapter(tmp_path / "adapter", name, marker)
    with pytest.raises(AdapterFormatError) as info:
        gio.read_adapter(folder)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(AdapterFormatError):
        graphpeft.from_pretrained(tiny_llama(), str(folder))
    assert not marker.exists()


def test_a_pickled_adapter_is_refused_by_the_command_line(tmp_path, capsys):
    marker = tmp_path / "unpickled"
    folder = _pickled_adapter(tmp_path / "adapter", "adapter_model.safetensors", marker)
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a b c"}\n')
    code = cli.main(["train", str(tmp_path / "out"), "--data", str(data), "--adapter", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("graphpeft: error: "), err
    assert not marker.exists()


def test_source_weights_of_multitask_prompt_tuning_are_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    source = tmp_path / "source.bin"
    source.write_bytes(pickle.dumps({"prompt_embeddings": _Payload(marker)}))
    config = graphpeft.MultitaskPromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="AVERAGE_SOURCE_TASKS",
                                                   prompt_tuning_init_state_dict_path=str(source))
    with pytest.raises(GraphPeftError, match="cannot read source weights"):
        graphpeft.rewrite(tiny_llama(), config)
    assert not marker.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def test_source_never_unpickles():
    """torch.load only with weights_only=True; no pickle, dill, joblib or cloudpickle import anywhere."""
    sources = sorted((ROOT / "graphpeft").rglob("*.py")) + sorted((ROOT / "passes").rglob("*.py"))
    assert len(sources) > 20
    problems = []
    for path in sources:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle", "_pickle") for n in names):
                    problems.append(f"{path.name}:{node.lineno} imports a pickle module")
        for call in _calls(tree):
            name = ast.unparse(call.func)
            if name.endswith("torch.load") or name == "load" and "torch" in ast.unparse(call):
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in call.keywords)
                if not safe:
                    problems.append(f"{path.name}:{call.lineno} {ast.unparse(call)}")
    assert not problems, problems


# -- remote code ----------------------------------------------------------------------------------------

class _Spy:
    """Stands in for a transformers from_pretrained: records trust_remote_code, then reports the model missing."""

    def __init__(self):
        self.seen: list = []

    def __call__(self, *args, **kwargs):
        self.seen.append(kwargs.get("trust_remote_code", "not passed"))
        raise OSError("spy: stop here")


@pytest.mark.parametrize("flag, expected", [([], False), (["--trust-remote-code"], True)])
@pytest.mark.parametrize("command", ["inspect", "rewrite", "train"])
def test_trust_remote_code_reaches_from_pretrained_only_when_asked(command, flag, expected, llama_dir, tmp_path,
                                                                   monkeypatch, capsys):
    import transformers

    spies = {name: _Spy() for name in ("AutoConfig", "AutoTokenizer")}
    for name, spy in spies.items():
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", spy)
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a b c"}\n')
    argv = {"inspect": ["inspect", str(llama_dir)],
            "rewrite": ["rewrite", str(llama_dir), "-o", str(tmp_path / "out")],
            "train": ["train", str(tmp_path / "out"), str(llama_dir), "--data", str(data)]}[command]
    assert cli.main(argv + flag) == 2
    capsys.readouterr()
    seen = spies["AutoConfig"].seen + spies["AutoTokenizer"].seen
    assert seen and all(v is expected for v in seen), seen


def test_hub_loaders_default_to_no_remote_code(llama_dir, monkeypatch):
    import transformers

    from graphpeft.runtime import hub

    config_spy = _Spy()
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", config_spy)
    for load in (hub.load_config, hub.load_model):
        with pytest.raises(GraphPeftError):
            load(str(llama_dir))
    # the model class itself: with the real config, a spy on the class the checkpoint names
    monkeypatch.undo()
    model_spy = _Spy()
    monkeypatch.setattr(transformers.LlamaForCausalLM, "from_pretrained", model_spy)
    with pytest.raises(GraphPeftError):
        hub.load_model(str(llama_dir))
    assert config_spy.seen == [False, False] and model_spy.seen == [False]


def test_a_model_with_custom_code_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "remote-code-ran"
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "graphpeft_custom", "architectures": ["CustomModel"],
        "auto_map": {"AutoConfig": "custom.CustomConfig", "AutoModel": "custom.CustomModel"}}))
    (folder / "custom.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    code = cli.main(["inspect", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("graphpeft: error: "), err
    assert not marker.exists()
