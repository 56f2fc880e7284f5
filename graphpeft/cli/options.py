"""Command-line options of ``graphpeft``: the per-method options generated from a config
dataclass's fields (metadata ``"cli"``), ``--config`` files, the click commands with their help, and
``parse_args`` / ``build_config``. The commands themselves and the entry point are in ``graphpeft.cli.commands``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

import click

from graphpeft.cli.params import (_CONTEXT, INT, NON_NEGATIVE_FLOAT, NUMBER, POSITIVE_FLOAT, POSITIVE_INT, _Command,
                                   _examples, _flag, _json_option, _opt)
from graphpeft.engine import registry
from graphpeft.engine.errors import GraphPeftError


PROG = "graphpeft"
DEFAULT_METHOD = "lora"
DEFAULT_OUT = "graphpeft-out"
DEFAULT_EDGE_OUT = "graphpeft-edge-out"
_REGEX_CHARS = set("*+?[](){}|^$\\")
_NUMBER = re.compile(r"^-\d|^-\.\d")


def _targets(values: Sequence[str], flag: str = "--targets") -> str | list[str]:
    """Values of ``--targets`` (or another module-list option): one or more module names (commas
    allowed), or a single regex / "all-linear"."""
    values = list(values)
    regexes = [v for v in values if _REGEX_CHARS & set(v) or v.lower() == "all-linear"]
    if regexes and len(values) > 1:
        raise GraphPeftError(f"{flag}: {regexes[0]!r} is a regex or 'all-linear', which must be the only value")
    if regexes:
        return values[0]
    names = [part.strip() for v in values for part in v.split(",") if part.strip()]
    if not names:
        raise GraphPeftError(f"{flag} needs at least one module name")
    return names


# -- method options, from the config dataclass --------------------------------------------------------

def _field_kind(annotation: Any) -> Any:
    """bool, int, float, str, "targets" (list-or-regex) or ("list", element type) for a config field type."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union:
        if len(args) == 1:
            return _field_kind(args[0])
        if str in args and any(typing.get_origin(a) is list for a in args):
            return "targets"
        return str
    if typing.get_origin(annotation) is list:
        return ("list", args[0] if args else str)
    return annotation if annotation in (bool, int, float, str) else str


def _kind_name(kind: Any) -> str:
    if isinstance(kind, tuple):
        return f"list[{getattr(kind[1], '__name__', 'str')}]"
    return kind if isinstance(kind, str) else kind.__name__


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _cli_fields(method: registry.Method) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(method.config_cls) if f.metadata.get("cli")]


def method_options(method: registry.Method) -> list[dict]:
    """One entry per option of ``method``: flag, config field, value kind, default and help."""
    hints = typing.get_type_hints(method.config_cls)
    rows = []
    for f in _cli_fields(method):
        kind, default = _field_kind(hints[f.name]), _field_default(f)
        rows.append({"flag": f.metadata["cli"], "field": f.name, "type": _kind_name(kind), "default": default,
                     "help": f.metadata.get("help", f.name.replace("_", " ")), "kind": kind})
    return rows


def _method_params(method: registry.Method) -> list[click.Option]:
    """One click option per config field that names a CLI flag; unset options stay None (the config's default)."""
    params = []
    for row in method_options(method):
        kind, flag, default, help_text = row["kind"], row["flag"], row["default"], row["help"]
        dest = f"method_{row['field']}"
        shown = default if default is not None else ("the method's default sites" if kind == "targets" else "unset")
        metavar = flag.lstrip("-").upper().replace("-", "_")
        if kind is bool:
            params.append(click.Option([f"{flag}/--no-{flag[2:]}", dest], default=None,
                                       help=f"{help_text} (default: {shown})"))
        elif kind == "targets":
            params.append(click.Option([flag, dest], multiple=True, metavar="NAME...",
                                       help=f"{help_text}: module names (suffix match), or one regex, or "
                                            f"'all-linear' (default: {shown})"))
        elif isinstance(kind, tuple):
            elem = {int: INT, float: NUMBER}.get(kind[1], click.STRING)
            params.append(click.Option([flag, dest], multiple=True, type=elem, metavar=f"{metavar}...",
                                       help=f"{help_text} (default: {shown})"))
        else:
            params.append(click.Option([flag, dest], type={int: INT, float: NUMBER}.get(kind, click.STRING),
                                       metavar=metavar, help=f"{help_text} (default: {shown})"))
    return params


def _multi_flags(method: registry.Method) -> set[str]:
    """Flags that take several values (``--targets q_proj v_proj``)."""
    return {r["flag"] for r in method_options(method) if r["kind"] == "targets" or isinstance(r["kind"], tuple)}


def _spread(argv: list[str], flags: set[str]) -> list[str]:
    """``--targets a b c`` -> ``--targets a --targets b --targets c``: a flag of ``flags`` takes every value
    up to the next option, as argparse's nargs="+" does (click options take a fixed number)."""
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        out.append(token)
        i += 1
        if token not in flags:
            continue
        taken = 0
        while i < len(argv) and (not argv[i].startswith("-") or _NUMBER.match(argv[i])):
            if taken:
                out.append(token)
            out.append(argv[i])
            i, taken = i + 1, taken + 1
    return out


# -- --config: a PEFT adapter_config.json ----------------------------------------------------------------

def read_config_file(path: str) -> dict:
    """The dict of a PEFT adapter_config.json (``path`` may be the folder that holds it)."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "adapter_config.json"
    if not file.exists():
        raise GraphPeftError(f"--config: {file} does not exist; pass a PEFT adapter_config.json")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GraphPeftError(f"--config: {file} is not valid JSON ({' '.join(str(exc).split())})") from None
    except OSError as exc:
        raise GraphPeftError(f"--config: cannot read {file}: {exc.strerror or exc}") from None
    if not isinstance(data, dict) or "peft_type" not in data:
        raise GraphPeftError(f"--config: {file} has no peft_type; pass an adapter_config.json written by PEFT "
                             f"or graphpeft")
    return data


def _option_value(argv: Sequence[str], flag: str) -> Optional[str]:
    """The value of ``flag`` in argv (``--flag V`` or ``--flag=V``), the last one given; None if absent."""
    value = None
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith(flag + "="):
            value = token[len(flag) + 1:]
    return value


def _choose_method(argv: Sequence[str]) -> registry.Method:
    """``--method``, or the peft_type of ``--config``; both given must agree."""
    name, config = _option_value(argv, "--method"), _option_value(argv, "--config")
    if config is None:
        return registry.method(name or DEFAULT_METHOD)
    from_file = registry.method_for_peft_type(read_config_file(config)["peft_type"])
    if name is not None and registry.method(name) is not from_file:
        raise GraphPeftError(f"--method {name} does not match --config {config}, whose peft_type is "
                             f"{from_file.config_cls.peft_type} ({from_file.name}); drop --method")
    return from_file


# -- commands' parameters ------------------------------------------------------------------------------------

_MODEL_HELP = ("local Hugging Face model folder or hub id; not right after an option that takes several values "
               "(--targets) (default: the embedded sentence-transformers/all-MiniLM-L6-v2)")


def _method_common(method: registry.Method) -> list[click.Parameter]:
    names = ", ".join(sorted(registry.methods()))
    return [
        _opt("--method", "method", default=method.name, metavar="NAME",
             help=f"PEFT method, one of: {names} (default: {DEFAULT_METHOD}, or --config's peft_type); "
                  f"its options are listed below"),
        _opt("--config", "config", metavar="FILE", default=None,
             help="a PEFT adapter_config.json (or its folder) to build the method's config from; options given "
                  "beside it override its fields"),
        _flag("--trust-remote-code", "trust_remote_code",
              help="allow the model folder's own Python code to run (off by default)"),
        _json_option(),
    ]


def _overwrite() -> click.Option:
    return _flag("--overwrite", "overwrite",
                 help="replace OUT if it exists and is not empty (the old folder is swapped out atomically)")


def _quantize_option() -> click.Option:
    from graphpeft.engine.quantized import QUANTIZE_CHOICES

    return _opt("--quantize", "quantize", type=click.Choice(QUANTIZE_CHOICES), default=None,
                help="load the base with its linear layers quantized and frozen (QLoRA): nf4 / fp4 (bitsandbytes 4-bit), "
                     "int8 (bitsandbytes 8-bit), torchao-int8 (torchao int8 weight-only); the output head stays "
                     "float; needs the 'graphpeft[quant]' extra")


def _training_options(seed_help: str) -> list[click.Parameter]:
    return [
        _opt("--data", "data", required=True, metavar="FILE", help="JSONL training data"),
        _opt("--epochs", "epochs", type=POSITIVE_INT, default=3, metavar="N", help="passes over the data (default: 3)"),
        _opt("--lr", "lr", type=POSITIVE_FLOAT, default=1e-3, metavar="LR",
             help="AdamW learning rate (default: 1e-3)"),
        _opt("--batch-size", "batch_size", type=POSITIVE_INT, default=8, metavar="N",
             help="rows per step (default: 8)"),
        _opt("--max-length", "max_length", type=POSITIVE_INT, default=128, metavar="N",
             help="truncate rows to this many tokens, at most the model's max_position_embeddings (default: 128)"),
        _opt("--seed", "seed", type=INT, default=0, metavar="N", help=seed_help),
    ]


def _trainer_options() -> list[click.Parameter]:
    """What ``graphpeft train`` hands transformers' Trainer (its TrainingArguments of the same names)."""
    from graphpeft.runtime.train import LR_SCHEDULERS

    return [
        _opt("--grad-accum", "grad_accum", type=POSITIVE_INT, default=1, metavar="N",
             help="batches per optimizer step (gradient accumulation; default: 1)"),
        _opt("--lr-scheduler", "lr_scheduler", type=click.Choice(LR_SCHEDULERS), default="constant",
             help="learning-rate schedule (default: constant, as before; 'linear' is transformers' Trainer's)"),
        _opt("--warmup-ratio", "warmup_ratio", type=NON_NEGATIVE_FLOAT, default=0.0, metavar="R",
             help="fraction of the steps spent warming the learning rate up (default: 0)"),
        _flag("--gradient-checkpointing", "gradient_checkpointing",
              help="recompute each layer's activations in the backward pass: less memory, slower steps"),
        _opt("--eval-data", "eval_data", metavar="FILE", default=None,
             help="JSONL rows (same form as --data) evaluated after every epoch: loss, and accuracy for labels"),
        _opt("--save-steps", "save_steps", type=POSITIVE_INT, default=None, metavar="N",
             help="write a checkpoint every N optimizer steps to --checkpoint-dir (adapter, optimizer, schedule)"),
        _opt("--checkpoint-dir", "checkpoint_dir", metavar="DIR", default=None,
             help="where --save-steps writes checkpoint-N folders (default: OUT-checkpoints, beside OUT)"),
        _opt("--resume", "resume", metavar="CHECKPOINT", default=None,
             help="continue an interrupted run from a checkpoint-N folder written by --save-steps"),
    ]


def make_commands(method: registry.Method) -> dict[str, click.Command]:
    """Every subcommand, with ``method``'s options on inspect, rewrite and train."""
    model_arg = click.Argument(["model"], required=False, metavar="[MODEL]")
    commands: dict[str, click.Command] = {}

    mp = _method_params(method)
    commands["inspect"] = _Command(
        "inspect", arguments={"MODEL": _MODEL_HELP}, method=method, method_params=mp,
        params=[model_arg, *_method_common(method), *mp],
        short_help="list candidate sites and which ones the method takes",
        help="List the model's candidate sites (module path, op kind, in/out features) and mark the ones the "
             "method takes with the given options; nothing is written.",
        epilog=_examples("graphpeft inspect path/to/model",
                         "graphpeft inspect path/to/model --targets all-linear",
                         "graphpeft inspect --method ia3 path/to/model --json"))

    mp = _method_params(method)
    commands["rewrite"] = _Command(
        "rewrite", arguments={"MODEL": _MODEL_HELP}, method=method, method_params=mp,
        params=[click.Argument(["model"], required=False, metavar="[MODEL]"), *_method_common(method),
                _opt("-o", "--output", "output", default=DEFAULT_OUT, metavar="OUT",
                     help=f"output folder (default: ./{DEFAULT_OUT}); must be absent or empty unless --overwrite"),
                _overwrite(),
                _flag("--meta", "meta", help="build the model from its config on the meta device (no weights are "
                                             "read) and write OUT/adapter_config.json and OUT/rewrite.json only; "
                                             "graphpeft.materialize loads weights later"),
                _flag("--report", "report", help="also write OUT/report.html: a summary table and a before/after "
                                                 "drawing of the graph around each kind of rewritten site"),
                _opt("--seed", "seed", type=INT, default=0, metavar="N",
                     help="seed for the adapters' initial weights; the same seed gives the same files (default: 0)"),
                _quantize_option(), *mp],
        short_help="insert adapters and save them (PEFT format)",
        help="Capture the model, insert the method's adapters and write OUT/adapter_config.json, "
             "OUT/adapter_model.safetensors and OUT/rewrite.json.",
        epilog=_examples("graphpeft rewrite path/to/model -o adapter --r 16 --alpha 32 --targets all-linear",
                         "graphpeft rewrite path/to/model -o adapter --config peft-adapter/adapter_config.json --r 4",
                         "graphpeft rewrite path/to/model -o adapter --method ia3 --report --json"))

    mp = _method_params(method)
    commands["train"] = _Command(
        "train", arguments={"OUT": "output folder for the trained adapter", "MODEL": _MODEL_HELP},
        method=method, method_params=mp,
        params=[click.Argument(["output"], metavar="OUT"), click.Argument(["model"], required=False, metavar="[MODEL]"),
                *_method_common(method),
                _opt("--adapter", "adapter", metavar="DIR", default=None,
                     help="continue training a saved adapter (its adapter_config.json replaces the method options)"),
                *_training_options("seed for weights init and data order (default: 0)"), *_trainer_options(),
                _quantize_option(), _overwrite(), *mp],
        short_help="train an adapter on a JSONL file and save it",
        help="Train an adapter on JSON Lines data: rows {\"text\": ...} train a causal LM, rows "
             "{\"text\": ..., \"label\": int} a sequence classifier (labels 0..K-1).",
        epilog=_examples("graphpeft train adapter --data train.jsonl path/to/model --epochs 3 --lr 1e-3",
                         "graphpeft train adapter --data train.jsonl model --grad-accum 4 --gradient-checkpointing "
                         "--eval-data test.jsonl",
                         "graphpeft train adapter --data train.jsonl model --save-steps 50 "
                         "--resume adapter-checkpoints/checkpoint-50",
                         "graphpeft train adapter --data train.jsonl path/to/model --method adalora --init-r 12",
                         "graphpeft train adapter2 --data more.jsonl path/to/model --adapter adapter"))

    commands["export"] = _Command(
        "export", arguments={"ADAPTER": "adapter folder written by 'graphpeft rewrite' or 'graphpeft train'",
                             "MODEL": "base model folder or hub id (default: the model named in ADAPTER/rewrite.json)"},
        params=[click.Argument(["adapter"], metavar="ADAPTER"), click.Argument(["model"], required=False,
                                                                                metavar="[MODEL]"),
                _flag("--onnx", "onnx", help="an ONNX inference model"),
                _flag("--onnx-training", "onnx_training", help="ONNX Runtime training artifacts"),
                _flag("--unmerged", "unmerged",
                      help="--onnx: keep the adapter weights as named initializers instead of merging them"),
                _opt("--optimizer", "optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw",
                     help="--onnx-training: the optimizer model (default: adamw, Hugging Face's AdamW formula)"),
                _opt("--max-grad-norm", "max_grad_norm", type=NON_NEGATIVE_FLOAT, default=1.0, metavar="NORM",
                     help="--onnx-training: clip the gradient norm (default: 1.0, as 'graphpeft train'; 0: off)"),
                _flag("--nominal-checkpoint", "nominal_checkpoint",
                      help="--onnx-training: also write nominal_checkpoint (names and shapes, no weights)"),
                _opt("-o", "--output", "output", default=None, metavar="DIR",
                     help="output folder (default: ADAPTER/onnx or ADAPTER/onnx-training); absent or empty unless "
                          "--overwrite"),
                _flag("--trust-remote-code", "trust_remote_code",
                      help="allow the model folder's own Python code to run (off by default)"),
                _overwrite(), _json_option()],
        short_help="export an adapter folder to ONNX (inference or training)",
        help="Export the rewritten graph of an adapter folder (written by rewrite or train) to ONNX: --onnx writes "
             "ADAPTER/onnx/model.onnx (adapters merged, or kept as named initializers with --unmerged); "
             "--onnx-training writes ONNX Runtime training artifacts to ADAPTER/onnx-training/ in which only the "
             "adapter is trainable. Needs the optional extra: pip install 'graphpeft[onnx]'.",
        epilog=_examples("graphpeft export adapter --onnx",
                         "graphpeft export adapter --onnx-training --optimizer sgd --nominal-checkpoint"))

    commands["edge-train"] = _Command(
        "edge-train", arguments={"ARTIFACTS": "folder written by 'graphpeft export ADAPTER --onnx-training'"},
        params=[click.Argument(["artifacts"], metavar="ARTIFACTS"),
                _opt("-o", "--output", "output", default=DEFAULT_EDGE_OUT, metavar="OUT",
                     help=f"output folder for the trained adapter (default: ./{DEFAULT_EDGE_OUT})"),
                *_training_options("seed for data order and dropout (default: 0)"), _overwrite(), _json_option()],
        short_help="train with ONNX Runtime on exported artifacts",
        help="Train the adapter with the ONNX Runtime training API on the artifacts of 'graphpeft export "
             "--onnx-training', on JSONL rows as 'graphpeft train' reads them, and write the trained adapter in "
             "PEFT's format (the learning rate decays linearly to 0). Needs the optional extra: "
             "pip install 'graphpeft[onnx]'.",
        epilog=_examples("graphpeft edge-train adapter/onnx-training --data train.jsonl -o edge-adapter"))

    commands["methods"] = _Command(
        "methods", arguments={}, params=[_json_option()],
        short_help="list the methods and their options",
        help="List every registered method: its name for --method, PEFT's peft_type, the config class, and the "
             "options that set the config's fields.",
        epilog=_examples("graphpeft methods", "graphpeft methods --json"))
    from graphpeft.cli.generate import commands as generation_commands   # generate, merge
    commands.update(generation_commands())
    return commands


def _main_help(commands: dict[str, click.Command]) -> str:
    from graphpeft import __version__

    group = click.Group(PROG, commands=commands, context_settings=_CONTEXT,
                        params=[_flag("--version", "version", help="print the version and exit")],
                        help=f"Parameter-efficient fine-tuning by rewriting the model's captured graph "
                             f"(graphpeft {__version__}).",
                        epilog="\b\n" + "methods (--method):\n" + "\n".join(
                            f"  {m.name:<24} {m.summary}" for m in registry.methods().values()) + "\n\n"
                        + _examples("graphpeft inspect path/to/model",
                                    "graphpeft rewrite path/to/model -o adapter --r 16 --alpha 32 --targets all-linear",
                                    "graphpeft train adapter --data train.jsonl path/to/model --epochs 3 --lr 1e-3",
                                    "graphpeft export adapter --onnx-training && "
                                    "graphpeft edge-train adapter/onnx-training --data train.jsonl",
                                    "graphpeft methods --json")
                        + "\n\n\b\nWithout MODEL the embedded sentence-transformers/all-MiniLM-L6-v2 is used.\n"
                          "'graphpeft COMMAND --help' lists a command's options.\n"
                          "Exit codes: 0 ok, 2 bad input, 1 internal error.")
    with click.Context(group, info_name=PROG) as ctx:
        return group.get_help(ctx)


# -- parsing --------------------------------------------------------------------------------------------

def usage_message(exc: click.ClickException, command: str = PROG) -> str:
    """A click usage error, worded as argparse words it (the messages users and tests know)."""
    def name(param: Any) -> str:
        if param is None:
            return "?"
        if isinstance(param, click.Argument):
            return param.human_readable_name
        return max(param.opts, key=len)

    if isinstance(exc, click.NoSuchOption):
        message = f"unrecognized arguments: {exc.option_name}"
    elif isinstance(exc, click.MissingParameter):
        message = f"the following arguments are required: {name(exc.param)}"
    elif isinstance(exc, click.BadParameter):
        message = f"argument {name(exc.param)}: {exc.message}"
    elif isinstance(exc, click.BadOptionUsage):
        message = f"argument {exc.option_name}: expected a value" if "requires an argument" in exc.message \
            else exc.message
    elif isinstance(exc, click.UsageError) and exc.message.startswith("Got unexpected extra argument"):
        message = "unrecognized arguments: " + exc.message.split("(", 1)[-1].rstrip(")")
    else:
        message = exc.format_message()
    where = getattr(getattr(exc, "ctx", None), "command_path", None) or command
    return f"{' '.join(message.split()).rstrip('.')}; see '{where} --help'"


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, registry.Method]:
    """Read ``--method`` / ``--config`` first, then parse everything with that method's options.

    Positionals may follow options (``graphpeft train OUT --data FILE MODEL``). ``--help`` and
    ``--version`` print and raise ``click.exceptions.Exit``; bad usage raises GraphPeftError (one line).
    """
    from graphpeft import __version__

    argv = list(argv)
    if argv[:1] == ["--version"]:
        click.echo(f"{PROG} {__version__}")
        raise click.exceptions.Exit(0)
    method = _choose_method(argv) if argv[:1] and argv[0] in ("inspect", "rewrite", "train") else \
        registry.method(DEFAULT_METHOD)
    commands = make_commands(method)
    if not argv:
        raise GraphPeftError(f"the following arguments are required: COMMAND; see '{PROG} --help'")
    if argv[0] in ("-h", "--help"):
        click.echo(_main_help(commands))
        raise click.exceptions.Exit(0)
    if argv[0] not in commands:
        if argv[0].startswith("-"):
            raise GraphPeftError(f"unrecognized arguments: {argv[0]}; see '{PROG} --help'")
        choices = ", ".join(repr(c) for c in commands)
        raise GraphPeftError(f"argument COMMAND: invalid choice: {argv[0]!r} (choose from {choices}); "
                             f"see '{PROG} --help'")
    command = commands[argv[0]]
    rest = _spread(argv[1:], _multi_flags(method)) if isinstance(command, _Command) and command.method else argv[1:]
    parent = click.Context(click.Group(PROG), info_name=PROG)
    try:
        ctx = command.make_context(argv[0], rest, parent=parent)
    except click.ClickException as exc:
        raise GraphPeftError(usage_message(exc, f"{PROG} {argv[0]}")) from None
    params = dict(ctx.params)
    for key, value in params.items():
        if key.startswith("method_") and isinstance(value, tuple):
            params[key] = list(value) or None
    args = argparse.Namespace(command=argv[0], **params)
    if argv[0] == "export" and args.onnx == args.onnx_training:
        raise GraphPeftError(("argument --onnx-training: not allowed with argument --onnx" if args.onnx else
                              "one of the arguments --onnx --onnx-training is required") + f"; see '{PROG} export --help'")
    return args, method


def method_options_given(method: registry.Method, args: argparse.Namespace) -> list[str]:
    return [f.metadata["cli"] for f in _cli_fields(method) if getattr(args, f"method_{f.name}", None) is not None]


# fields the command line fills from the model it rewrites, even over --config's value
_FROM_MODEL = ("base_model_name_or_path",)


def build_config(method: registry.Method, args: argparse.Namespace, **extra: Any) -> Any:
    """The method's config: ``--config``'s fields, then the options given (which win), then ``extra``
    fields the config has and neither set (``base_model_name_or_path`` always names the model rewritten)."""
    names = {f.name for f in dataclasses.fields(method.config_cls)}
    hints = typing.get_type_hints(method.config_cls)
    values = {}
    for f in _cli_fields(method):
        value = getattr(args, f"method_{f.name}", None)
        if value is not None:
            values[f.name] = _targets(value, f.metadata["cli"]) if _field_kind(hints[f.name]) == "targets" else value
    config_file = getattr(args, "config", None)
    base = read_config_file(config_file) if config_file else {}
    for key, value in extra.items():
        if key in names and value is not None and key not in values and (key in _FROM_MODEL or base.get(key) is None):
            values[key] = value
    if config_file:
        merged = {**base, **values, "inference_mode": False}   # a new adapter, to train
        return method.config_cls.from_dict(merged)
    try:
        return method.config_cls(**values)
    except TypeError as exc:
        raise GraphPeftError(f"invalid {method.name} options: {exc}") from None
