"""Bad input, in a table: every entry ends in one line that names the problem, never a traceback.

Python API: a ``GraphPeftError`` (a ValueError) whose message is one line and contains the expected
fragment. Command line (``graphpeft.cli.commands.main``, in-process): exit code 2 and exactly one line on stderr,
``graphpeft: error: ...`` with the expected fragment. Rows cover configs of every method, model ids and
folders, adapter folders (missing files, wrong keys, shapes, dtypes, truncated, corrupt or pickled
weights), output folders (present, a file, unwritable), data files with bad rows, and ONNX output
folders already present.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

import graphpeft
from graphpeft.cli import commands as cli
from graphpeft.engine.errors import GraphPeftError
from graphpeft.runtime.io import load_adapter_state, read_adapter

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


class Ctx:
    """Paths and objects the rows use; ``tmp`` is fresh for every row."""

    def __init__(self, model_dir: Path, adapter: Path, gm: Any, tmp: Path):
        self.model, self.adapter, self.gm, self.tmp = str(model_dir), adapter, gm, tmp
        self.out = str(tmp / "out")

    # -- adapter folders, broken one way each --------------------------------------------------
    def broken(self, how: str) -> str:
        folder = self.tmp / f"adapter-{how}"
        shutil.copytree(self.adapter, folder)
        weights, config = folder / WEIGHTS, folder / CONFIG
        data = json.loads(config.read_text())
        tensors = load_file(weights)
        if how == "no-config":
            config.unlink()
        elif how == "no-weights":
            weights.unlink()
        elif how == "bin-only":
            weights.unlink()
            torch.save(tensors, folder / "adapter_model.bin")
        elif how == "pickled":
            torch.save(tensors, weights)
        elif how == "truncated":
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        elif how == "garbage":
            weights.write_bytes(b"\x00\x13 not a safetensors header" * 10)
        elif how == "empty":
            weights.write_bytes(b"")
        elif how == "config-not-json":
            config.write_text("{'r': 8,")
        elif how == "config-list":
            config.write_text("[1, 2, 3]")
        else:
            edits: dict[str, Callable] = {
                "no-peft-type": lambda: data.pop("peft_type"),
                "unknown-peft-type": lambda: data.update(peft_type="FOO"),
                "unsupported-field": lambda: data.update(loftq_config={"loftq_bits": 4}),
                "config-r-string": lambda: data.update(r="8"),
                "config-bad-task": lambda: data.update(task_type="TRANSLATE"),
                "config-r-mismatch": lambda: data.update(r=4, lora_alpha=8),
                "extra-key": lambda: tensors.update({"base_model.model.model.nope.lora_A.weight": torch.zeros(8, 8)}),
                "missing-key": lambda: tensors.pop(Q_A),
                "wrong-shape": lambda: tensors.update({Q_A: tensors[Q_A].t().contiguous()}),
                "int-dtype": lambda: tensors.update({Q_A: tensors[Q_A].to(torch.int32)}),
            }
            edits[how]()
            config.write_text(json.dumps(data))
            save_file(tensors, weights)
        return str(folder)

    def load(self, how: str) -> Any:
        return graphpeft.from_pretrained(copy.deepcopy(self.gm), self.broken(how))

    # -- files --------------------------------------------------------------------------------
    def file(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def rows(self, *lines: str) -> str:
        return self.file("data.jsonl", "".join(line + "\n" for line in lines))

    def folder(self, name: str, *files: str) -> str:
        path = self.tmp / name
        path.mkdir()
        for f in files:
            (path / f).write_text("x")
        return str(path)

    def model_without_weights(self, replacement: bytes | None = None) -> str:
        folder = self.tmp / "model"
        folder.mkdir()
        shutil.copy(Path(self.model) / "config.json", folder / "config.json")
        if replacement is not None:
            (folder / "model.safetensors").write_bytes(replacement)
        return str(folder)

    def adapter_with(self, sub: str) -> str:
        folder = self.tmp / "adapter"
        shutil.copytree(self.adapter, folder)
        (folder / sub).mkdir()
        (folder / sub / "model.onnx").write_text("old")
        return str(folder)


GOOD = '{"text": "the cat sat on the mat"}'
L, A = graphpeft.LoraConfig, graphpeft.AdaLoraConfig

# (id, call(ctx) raising GraphPeftError, fragment of the one-line message)
API_ROWS = [
    # configs: wrong values and wrong types, every method
    ("lora-r-zero", lambda c: L(r=0), "r must be a positive integer, got 0"),
    ("lora-r-string", lambda c: L(r="8"), "r must be a positive integer, got '8'"),
    ("lora-alpha-string", lambda c: L(lora_alpha="x"), "lora_alpha must be a number, got 'x'"),
    ("lora-dropout-range", lambda c: L(lora_dropout=1.5), "lora_dropout must be in [0, 1)"),
    ("lora-dropout-string", lambda c: L(lora_dropout="a"), "lora_dropout must be a number"),
    ("lora-targets-int", lambda c: L(target_modules=7), "target_modules must be a list of module names or a regex"),
    ("lora-targets-ints", lambda c: L(target_modules=[1, 2]), "target_modules must be a list of strings"),
    ("lora-init", lambda c: L(init_lora_weights="eva"), "init_lora_weights='eva' is not supported"),
    ("lora-rslora-string", lambda c: L(use_rslora="yes"), "use_rslora must be True or False"),
    ("lora-layers-string", lambda c: L(layers_to_transform="0"), "layers_to_transform must be a list of integers"),
    ("lora-task-type", lambda c: L(task_type="TRANSLATE"), "task_type must be one of SEQ_CLS"),
    ("lora-bias", lambda c: L(bias="all"), "bias='all' is not supported yet"),
    ("lora-rank-pattern", lambda c: L(rank_pattern={"q_proj": 0}), "rank_pattern values must be positive integers"),
    ("adalora-no-total-step", lambda c: A(), "AdaLoRA needs total_step"),
    ("adalora-target-above-init", lambda c: A(total_step=10, init_r=4, target_r=8), "target_r=8 is larger than init_r=4"),
    ("adalora-beta1", lambda c: A(total_step=10, beta1=2.0), "beta1 must be in (0, 1)"),
    ("adalora-no-budget-phase", lambda c: A(total_step=10, tinit=8, tfinal=5), "leave no budgeting phase"),
    ("ia3-feedforward-not-target", lambda c: graphpeft.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"]),
     "feedforward_modules must be a subset of target_modules"),
    ("ia3-init-string", lambda c: graphpeft.IA3Config(init_ia3_weights="x"), "init_ia3_weights must be True or False"),
    ("prompt-tokens-zero", lambda c: graphpeft.PromptTuningConfig(num_virtual_tokens=0),
     "num_virtual_tokens must be a positive integer, got 0"),
    ("prompt-init", lambda c: graphpeft.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="FOO"),
     "prompt_tuning_init must be one of RANDOM"),
    ("prompt-text-no-tokenizer", lambda c: graphpeft.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT",
                                                                         prompt_tuning_init_text="hi"),
     "needs the model's tokenizer"),
    ("p-tuning-encoder", lambda c: graphpeft.PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type="GRU"),
     "encoder_reparameterization_type must be MLP or LSTM"),
    ("p-tuning-hidden", lambda c: graphpeft.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=-1),
     "encoder_hidden_size must be a positive integer"),
    ("prefix-no-tokens", lambda c: graphpeft.PrefixTuningConfig(), "num_virtual_tokens is required for prefix tuning"),
    ("prefix-init", lambda c: graphpeft.PrefixTuningConfig(num_virtual_tokens=4, init_weights="ones"),
     "init_weights must be None (random) or 'zero'"),
    ("multitask-tasks-zero", lambda c: graphpeft.MultitaskPromptTuningConfig(num_virtual_tokens=4, num_tasks=0),
     "num_tasks must be a positive integer"),
    ("multitask-source-no-path",
     lambda c: graphpeft.MultitaskPromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="AVERAGE_SOURCE_TASKS"),
     "needs prompt_tuning_init_state_dict_path"),
    # rewriting
    ("rewrite-not-a-config", lambda c: graphpeft.rewrite(copy.deepcopy(c.gm), {"r": 8}), "is not a graphpeft config"),
    ("rewrite-targets-match-nothing", lambda c: graphpeft.rewrite(copy.deepcopy(c.gm), L(target_modules=["nope_proj"])),
     "nope_proj"),
    ("multitask-source-missing",
     lambda c: graphpeft.rewrite(copy.deepcopy(c.gm), graphpeft.MultitaskPromptTuningConfig(
         num_virtual_tokens=4, prompt_tuning_init="AVERAGE_SOURCE_TASKS",
         prompt_tuning_init_state_dict_path=str(c.tmp / "missing.safetensors"))), "does not exist"),
    ("multitask-source-corrupt",
     lambda c: graphpeft.rewrite(copy.deepcopy(c.gm), graphpeft.MultitaskPromptTuningConfig(
         num_virtual_tokens=4, prompt_tuning_init="AVERAGE_SOURCE_TASKS",
         prompt_tuning_init_state_dict_path=c.file("src.safetensors", b"garbage"))), "cannot read source weights"),
    # adapter folders
    ("adapter-folder-missing", lambda c: graphpeft.from_pretrained(c.gm, str(c.tmp / "nope")), "does not exist"),
    ("adapter-no-config", lambda c: c.load("no-config"), "has no adapter_config.json"),
    ("adapter-no-weights", lambda c: c.load("no-weights"), "has no adapter_model.safetensors"),
    ("adapter-bin-only", lambda c: c.load("bin-only"), "holds adapter_model.bin (a pickle)"),
    ("adapter-pickled-safetensors", lambda c: c.load("pickled"), "is not a readable safetensors file"),
    ("adapter-truncated", lambda c: c.load("truncated"), "is not a readable safetensors file"),
    ("adapter-garbage", lambda c: c.load("garbage"), "is not a readable safetensors file"),
    ("adapter-empty-weights", lambda c: c.load("empty"), "is not a readable safetensors file"),
    ("adapter-config-not-json", lambda c: c.load("config-not-json"), "is not valid JSON"),
    ("adapter-config-a-list", lambda c: c.load("config-list"), "has no peft_type"),
    ("adapter-no-peft-type", lambda c: c.load("no-peft-type"), "has no peft_type"),
    ("adapter-unknown-peft-type", lambda c: c.load("unknown-peft-type"), "peft_type 'FOO', which graphpeft does not support"),
    ("adapter-unsupported-field", lambda c: c.load("unsupported-field"), "which graphpeft does not support yet"),
    ("adapter-config-wrong-type", lambda c: c.load("config-r-string"), "r must be a positive integer, got '8'"),
    ("adapter-config-bad-task", lambda c: c.load("config-bad-task"), "task_type must be one of"),
    ("adapter-rank-mismatch", lambda c: c.load("config-r-mismatch"), "has shape (8, 32) in the file but (4, 32)"),
    ("adapter-extra-key", lambda c: c.load("extra-key"), "key(s) the rewritten model does not have"),
    ("adapter-missing-key", lambda c: c.load("missing-key"), "lacks 1 key(s)"),
    ("adapter-wrong-shape", lambda c: c.load("wrong-shape"), "has shape (32, 8) in the file but (8, 32)"),
    ("adapter-int-dtype", lambda c: c.load("int-dtype"), "has dtype torch.int32; adapter weights must be floating point"),
    ("from-pretrained-not-a-module", lambda c: graphpeft.from_pretrained("gpt2", str(c.adapter)), "needs a torch.nn.Module"),
    # output folders
    ("save-under-a-file", lambda c: graphpeft.rewrite(copy.deepcopy(c.gm), L()).save_pretrained(
        str(Path(c.file("a-file", "x")) / "adapter")), "cannot create output folder"),
]

# (id, argv(ctx), fragment of the one-line message)
CLI_ROWS = [
    # options
    ("unknown-command", lambda c: ["frobnicate"], "invalid choice: 'frobnicate'"),
    ("unknown-option", lambda c: ["rewrite", c.model, "--bogus"], "unrecognized arguments: --bogus"),
    ("unknown-method", lambda c: ["rewrite", "--method", "loha", c.model], "unknown method 'loha'"),
    ("r-not-a-number", lambda c: ["rewrite", c.model, "--r", "x"], "expected an integer, got 'x'"),
    ("r-zero", lambda c: ["rewrite", c.model, "--r", "0", "-o", c.out], "r must be a positive integer, got 0"),
    ("alpha-not-a-number", lambda c: ["rewrite", c.model, "--alpha", "big"], "expected a number, got 'big'"),
    ("dropout-range", lambda c: ["rewrite", c.model, "--dropout", "1.5", "-o", c.out], "lora_dropout must be in [0, 1)"),
    ("targets-regex-and-names", lambda c: ["rewrite", c.model, "--targets", ".*q_proj", "v_proj"],
     "is a regex or 'all-linear', which must be the only value"),
    ("targets-match-nothing", lambda c: ["rewrite", c.model, "--targets", "nope_proj", "-o", c.out], "nope_proj"),
    ("adalora-no-total-step", lambda c: ["rewrite", "--method", "adalora", c.model, "-o", c.out], "needs total_step"),
    ("prefix-no-tokens", lambda c: ["rewrite", "--method", "prefix_tuning", c.model, "-o", c.out],
     "num_virtual_tokens is required"),
    ("p-tuning-encoder", lambda c: ["rewrite", "--method", "p_tuning", "--num-virtual-tokens", "4", "--encoder", "GRU",
                                    c.model, "-o", c.out], "encoder_reparameterization_type must be MLP or LSTM"),
    ("multitask-source-missing", lambda c: ["rewrite", "--method", "multitask_prompt_tuning", "--num-virtual-tokens", "4",
                                            "--init", "AVERAGE_SOURCE_TASKS", "--init-from", str(c.tmp / "no.safetensors"),
                                            c.model, "-o", c.out], "does not exist"),
    # models
    ("model-folder-missing", lambda c: ["rewrite", str(c.tmp / "no-such-model"), "-o", c.out], "does not exist"),
    ("model-is-a-file", lambda c: ["rewrite", c.file("model.bin", "x"), "-o", c.out], "is a file, not a model folder"),
    ("model-folder-no-config", lambda c: ["rewrite", c.folder("empty-model"), "-o", c.out], "no config.json"),
    ("model-config-corrupt", lambda c: ["rewrite", c.folder("corrupt-model", "config.json"), "-o", c.out],
     "cannot read the config"),
    ("model-no-weights", lambda c: ["inspect", c.model_without_weights()], "cannot load the weights of"),
    ("model-weights-corrupt", lambda c: ["inspect", c.model_without_weights(b"garbage" * 10)],
     "are not a readable safetensors file"),
    ("model-unknown-hub-id", lambda c: ["rewrite", "nobody-here/no-such-model", "-o", c.out], "not found locally"),
    # output folders
    ("output-not-empty", lambda c: ["rewrite", c.model, "-o", c.folder("full", "keep.txt")],
     "exists and is not empty; pass --overwrite"),
    ("output-is-a-file", lambda c: ["rewrite", c.model, "-o", c.file("out.txt", "x")], "exists and is not a folder"),
    ("output-unwritable", lambda c: ["rewrite", c.model, "-o", str(Path(c.file("blocker", "x")) / "sub" / "out")],
     "cannot write next to"),
    ("export-onnx-present", lambda c: ["export", c.adapter_with("onnx"), "--onnx"], "exists and is not empty"),
    ("export-training-present", lambda c: ["export", c.adapter_with("onnx-training"), "--onnx-training"],
     "exists and is not empty"),
    # data files
    ("data-missing", lambda c: ["train", c.out, "--data", str(c.tmp / "none.jsonl")], "does not exist"),
    ("data-is-a-folder", lambda c: ["train", c.out, "--data", c.folder("data-dir")], "is a folder"),
    ("data-empty", lambda c: ["train", c.out, "--data", c.rows()], "is empty"),
    ("data-not-utf8", lambda c: ["train", c.out, "--data", c.file("latin.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1"))],
     "is not UTF-8 text"),
    ("data-bad-json", lambda c: ["train", c.out, "--data", c.rows(GOOD, '{"text": "unclosed')], "data.jsonl:2: not valid JSON"),
    ("data-not-an-object", lambda c: ["train", c.out, "--data", c.rows(GOOD, '["a", "b"]')], "expected a JSON object"),
    ("data-no-text", lambda c: ["train", c.out, "--data", c.rows('{"label": 1}')], "data.jsonl:1: field 'text'"),
    ("data-text-not-string", lambda c: ["train", c.out, "--data", c.rows('{"text": 5}')], "field 'text'"),
    ("data-label-string", lambda c: ["train", c.out, "--data", c.rows('{"text": "a", "label": "pos"}')],
     "field 'label' must be an integer, got 'pos'"),
    ("data-label-negative", lambda c: ["train", c.out, "--data", c.rows('{"text": "a", "label": -1}')],
     "field 'label' must be >= 0"),
    ("data-mixed-rows", lambda c: ["train", c.out, "--data", c.rows('{"text": "a", "label": 0}', GOOD)], "data.jsonl:2"),
    ("data-one-label", lambda c: ["train", c.out, "--data", c.rows('{"text": "a", "label": 1}', '{"text": "b", "label": 1}')],
     "labels must be 0..K-1"),
    ("train-epochs-zero", lambda c: ["train", c.out, "--data", c.rows(GOOD), "--epochs", "0"], "expected a positive integer"),
    ("train-lr-negative", lambda c: ["train", c.out, "--data", c.rows(GOOD), "--lr", "-1"], "expected a positive number"),
    ("train-no-data", lambda c: ["train", c.out], "the following arguments are required: --data"),
    ("train-adapter-and-options", lambda c: ["train", c.out, c.model, "--data", c.rows(GOOD), "--adapter", str(c.adapter),
                                             "--r", "4"], "--adapter takes its options from its adapter_config.json"),
    ("train-adapter-wrong-shape", lambda c: ["train", c.out, c.model, "--data", c.rows(GOOD),
                                             "--adapter", c.broken("wrong-shape")], "has shape (32, 8) in the file"),
    ("train-adapter-truncated", lambda c: ["train", c.out, c.model, "--data", c.rows(GOOD),
                                           "--adapter", c.broken("truncated")], "is not a readable safetensors file"),
]


@pytest.fixture(scope="module")
def shared(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama folder (with tokenizer), a good LoRA adapter for it, and its captured graph."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    gm = graphpeft.capture(model)
    adapter = tmp_path_factory.mktemp("good") / "adapter"
    torch.manual_seed(0)
    graphpeft.rewrite(copy.deepcopy(gm), L(r=8)).save_pretrained(str(adapter))
    (adapter / "rewrite.json").write_text(json.dumps({"model": str(tiny_llama_dir)}))
    return tiny_llama_dir, adapter, gm


@pytest.fixture()
def ctx(shared, tmp_path) -> Ctx:
    return Ctx(*shared, tmp_path)


def test_the_table_is_large_enough():
    assert len(API_ROWS) + len(CLI_ROWS) >= 40
    ids = [r[0] for r in API_ROWS] + [f"cli-{r[0]}" for r in CLI_ROWS]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("call, fragment", [r[1:] for r in API_ROWS], ids=[r[0] for r in API_ROWS])
def test_api_bad_input_is_one_line(ctx, call, fragment):
    with pytest.raises(GraphPeftError) as info:
        call(ctx)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    assert fragment in message, message


@pytest.mark.parametrize("argv, fragment", [r[1:] for r in CLI_ROWS], ids=[r[0] for r in CLI_ROWS])
def test_cli_bad_input_is_one_line_and_exit_2(ctx, capsys, argv, fragment):
    args = argv(ctx)
    code = cli.main(args)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphpeft: error: "), err
    assert "Traceback" not in err
    assert fragment in lines[0], lines[0]
    # a refused run leaves no output and no temporary folder behind
    assert not (ctx.tmp / "out").exists()
    assert [p.name for p in ctx.tmp.iterdir() if p.name.startswith(".")] == []


def test_a_refused_adapter_leaves_the_model_unchanged(shared):
    """Shapes are checked for every tensor before any is copied: a bad file never half-loads."""
    _, adapter, gm = shared
    model = graphpeft.rewrite(copy.deepcopy(gm), L(r=8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, tensors = read_adapter(adapter)
    last = list(tensors)[-1]
    tensors = {k: v + 1.0 for k, v in tensors.items()}
    tensors[last] = tensors[last].t().contiguous()       # only the last tensor is wrong
    with pytest.raises(GraphPeftError, match="has shape"):
        load_adapter_state(model, tensors)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- every field of every config, odd values: a config or a one-line error, never a crash --------------

ODD_VALUES = [None, -1, 0, 3, 2.5, float("nan"), float("inf"), "x", "", "all-linear", [], [1], ["a"], {}, {"a": "b"},
              {"a": 1}, True, False, ("a",), object()]
REQUIRED = {"adalora": {"total_step": 10}, "prompt_tuning": {"num_virtual_tokens": 4},
            "p_tuning": {"num_virtual_tokens": 4}, "prefix_tuning": {"num_virtual_tokens": 4},
            "multitask_prompt_tuning": {"num_virtual_tokens": 4}}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", sorted(graphpeft.engine.registry.methods()))
def test_odd_field_values_never_crash_a_config(method):
    import dataclasses

    m = graphpeft.engine.registry.method(method)
    refused = accepted = 0
    for f in dataclasses.fields(m.config_cls):
        for value in ODD_VALUES:
            try:
                config = m.config_cls(**{**REQUIRED.get(method, {}), f.name: value})
                m.config_cls.from_dict(json.loads(json.dumps(config.to_dict(), default=repr)))
                accepted += 1
            except GraphPeftError as exc:
                assert "\n" not in str(exc)
                refused += 1
    assert refused > 20 and accepted > 20, (refused, accepted)    # the grid exercises both outcomes
