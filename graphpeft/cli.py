"""The ``graphpeft`` command (click; progress with rich, on stderr).

    graphpeft inspect [MODEL]                                   candidate sites, and which the method takes
    graphpeft rewrite [MODEL] [-o OUT] [--method lora --r 8 --alpha 16 --targets query value] [--report]
    graphpeft train OUT --data FILE.jsonl [MODEL] [--epochs 3 --lr 1e-3 ...]
    graphpeft export ADAPTER [MODEL] --onnx [--unmerged] | --onnx-training [--optimizer sgd ...]
    graphpeft edge-train ARTIFACTS --data FILE.jsonl [-o OUT]     ONNX Runtime training (extra 'onnx')
    graphpeft methods                                           the methods and their options
    graphpeft --version

MODEL is a local Hugging Face model folder or a hub id; without it, the embedded default model
(sentence-transformers/all-MiniLM-L6-v2) is used. Methods are reached only through the registry:
``--method`` (or the peft_type of ``--config FILE``) is read first, then the command is built with the
method's options, one per config dataclass field whose metadata names a ``"cli"`` flag.

``--config FILE`` takes a PEFT adapter_config.json (or a folder holding one); options given beside it
override its fields. ``--json`` prints one JSON object on stdout (the command's result) and nothing else.

Outputs are written to a temporary folder next to OUT and renamed into place at the end, so OUT is
never half-written; an existing non-empty OUT is refused unless ``--overwrite``.
Exit codes: 0 ok; 2 bad input (``graphpeft: error: <one line>`` on stderr, usage errors included);
1 unexpected failure (one line asking to report it; ``GRAPHPEFT_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import re
import sys
import traceback
import typing
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import click

from graphpeft import progress, registry
from graphpeft.errors import GraphPeftError
from graphpeft.outputs import check_output, staged_output, write_json
from graphpeft.report import print_params, print_records, rewrite_report

PROG = "graphpeft"
DEFAULT_METHOD = "lora"
DEFAULT_OUT = "graphpeft-out"
DEFAULT_EDGE_OUT = "graphpeft-edge-out"
_REGEX_CHARS = set("*+?[](){}|^$\\")
_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
_NUMBER = re.compile(r"^-\d|^-\.\d")


# -- option values ------------------------------------------------------------------------------------

def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise ValueError(f"expected a positive number, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise ValueError(f"expected a number >= 0, got {text!r}")
    return value


def _number(text: str) -> float | int:
    """A float field's value; integral input stays an int so configs read ``16``, as PEFT writes them."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None


class _Value(click.ParamType):
    """A click type from a converter that raises ValueError with the message to show."""

    def __init__(self, name: str, convert: Callable[[str], Any]) -> None:
        self.name, self._convert = name, convert

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self._convert(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


INT, POSITIVE_INT, POSITIVE_FLOAT = _Value("integer", _int), _Value("integer", _positive_int), \
    _Value("number", _positive_float)
NON_NEGATIVE_FLOAT, NUMBER = _Value("number", _non_negative_float), _Value("number", _number)


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

class _Command(click.Command):
    """A click command whose help has an Arguments section and the method's options in their own section."""

    def __init__(self, name: str, *, arguments: dict[str, str], method: Optional[registry.Method] = None,
                 method_params: Sequence[click.Parameter] = (), **kwargs: Any) -> None:
        super().__init__(name, context_settings=_CONTEXT, **kwargs)
        self.arguments, self.method = arguments, method
        self.method_names = {p.name for p in method_params}

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        if self.arguments:
            with formatter.section("Arguments"):
                formatter.write_dl(list(self.arguments.items()))
        records = [(p, p.get_help_record(ctx)) for p in self.get_params(ctx) if isinstance(p, click.Option)]
        common = [r for p, r in records if r and p.name not in self.method_names]
        own = [r for p, r in records if r and p.name in self.method_names]
        with formatter.section("Options"):
            formatter.write_dl(common)
        if self.method is not None:
            with formatter.section(f"{self.method.name} options ({self.method.summary})" if self.method.summary
                                   else f"{self.method.name} options"):
                if own:
                    formatter.write_dl(own)
                else:
                    formatter.write_text("(none)")


def _examples(*lines: str) -> str:
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


_MODEL_HELP = ("local Hugging Face model folder or hub id; not right after an option that takes several values "
               "(--targets) (default: the embedded sentence-transformers/all-MiniLM-L6-v2)")


def _opt(*decls: str, **kwargs: Any) -> click.Option:
    return click.Option(list(decls), **kwargs)


def _flag(*decls: str, help: str) -> click.Option:
    return click.Option(list(decls), is_flag=True, default=False, help=help)


def _json_option() -> click.Option:
    return _flag("--json", "json", help="print the result as one JSON object on stdout, and nothing else there "
                                        "(no progress bars)")


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
                *mp],
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
                *_training_options("seed for weights init and data order (default: 0)"), _overwrite(), *mp],
        short_help="train an adapter on a JSONL file and save it",
        help="Train an adapter on JSON Lines data: rows {\"text\": ...} train a causal LM, rows "
             "{\"text\": ..., \"label\": int} a sequence classifier (labels 0..K-1).",
        epilog=_examples("graphpeft train adapter --data train.jsonl path/to/model --epochs 3 --lr 1e-3",
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

def _usage_message(exc: click.ClickException, command: str = PROG) -> str:
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
        raise GraphPeftError(_usage_message(exc, f"{PROG} {argv[0]}")) from None
    params = dict(ctx.params)
    for key, value in params.items():
        if key.startswith("method_") and isinstance(value, tuple):
            params[key] = list(value) or None
    args = argparse.Namespace(command=argv[0], **params)
    if argv[0] == "export" and args.onnx == args.onnx_training:
        raise GraphPeftError(("argument --onnx-training: not allowed with argument --onnx" if args.onnx else
                              "one of the arguments --onnx --onnx-training is required") + f"; see '{PROG} export --help'")
    return args, method


def _method_options_given(method: registry.Method, args: argparse.Namespace) -> list[str]:
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


# -- commands ------------------------------------------------------------------------------------

def _task_type(model: Any) -> Optional[str]:
    """PEFT's task_type for a transformers class whose head PEFT treats specially (else None)."""
    from transformers.models.auto import modeling_auto as auto

    name = type(model).__name__
    if name in auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values():
        return "SEQ_CLS"
    if name in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return "CAUSAL_LM"
    return None


def _model_name(model: Any, given: Optional[str]) -> str:
    return getattr(model.config, "_name_or_path", None) or given or "?"


def _load_model(name: Optional[str], **kwargs: Any) -> Any:
    from graphpeft import hub

    with progress.spinner(f"loading {name or 'the default model'}"):
        return hub.load_model(name, **kwargs)


def _capture(model: Any, name: str) -> Any:
    """graphpeft.capture, with the model's name in the error a user sees (and a spinner while it runs)."""
    from graphpeft import capture
    from graphpeft.errors import CaptureError

    try:
        with progress.spinner(f"capturing {name} ({type(model).__name__}) as a graph"):
            return capture(model)
    except CaptureError as exc:
        raise CaptureError(f"model {name} cannot be captured as a graph: {exc}") from None


def _rewrite(gm: Any, config: Any, method: registry.Method) -> Any:
    import graphpeft

    with progress.spinner(f"rewriting the graph with {method.name}"):
        return graphpeft.rewrite(gm, config)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def cmd_inspect(args: argparse.Namespace, method: registry.Method) -> dict:
    from graphpeft.match import find_sites

    config = build_config(method, args)
    model = _load_model(args.model, task="auto", trust_remote_code=args.trust_remote_code)
    name = _model_name(model, args.model)
    gm = _capture(model, name)
    sites = find_sites(gm)
    rule = getattr(method.pass_cls(config), "rule", None)
    taken = {s.node for s in rule.sites(gm)} if rule is not None and hasattr(rule, "sites") else set()
    print(f"model: {name} ({type(model).__name__})")
    print(f"{len(sites)} candidate sites; * = taken by {method.name} with these options ({len(taken)} sites)")
    width = max((len(s.module_path) for s in sites), default=10)
    print(f"  {'module path':<{width}}  {'kind':<9} {'in':>7} {'out':>7}")
    for s in sites:
        mark = "*" if s.node in taken else " "
        print(f"{mark} {s.module_path:<{width}}  {s.kind:<9} {s.in_features:>7} {s.out_features:>7}")
    return {"command": "inspect", "method": method.name, "model": name, "model_class": type(model).__name__,
            "candidate_sites": len(sites), "taken_sites": len(taken),
            "sites": [{"module_path": s.module_path, "kind": s.kind, "in_features": s.in_features,
                       "out_features": s.out_features, "taken": s.node in taken} for s in sites]}


def cmd_rewrite(args: argparse.Namespace, method: registry.Method) -> dict:
    import torch
    from graphpeft.match import find_sites

    build_config(method, args)                      # bad options fail before the model is loaded
    out = Path(args.output).expanduser()
    check_output(out, args.overwrite)
    torch.manual_seed(args.seed)                    # adapter initialisation: same seed, same files
    if args.meta:
        from graphpeft.meta import meta_model
        model = meta_model(args.model, trust_remote_code=args.trust_remote_code)
    else:
        model = _load_model(args.model, task="auto", trust_remote_code=args.trust_remote_code)
    name = _model_name(model, args.model)
    config = build_config(method, args, task_type=_task_type(model), base_model_name_or_path=name)
    gm = _capture(model, name)
    candidates = {s.node.name: s for s in find_sites(gm)}
    peft_model = _rewrite(gm, config, method)
    print(f"model: {name} ({type(model).__name__}, {len(candidates)} candidate sites)")
    print(f"rewrote {len(peft_model.records)} sites with {method.name}:")
    print_records(peft_model.records, candidates)
    print_params(peft_model)
    report = rewrite_report("rewrite", method, name, model, config, peft_model, len(candidates))
    with staged_output(out, args.overwrite) as tmp:
        if args.meta:             # no weights exist yet: the resolved config and the records only
            from graphpeft.meta import save_config
            save_config(peft_model, tmp)
        else:
            peft_model.save_pretrained(str(tmp))
        write_json(tmp / "rewrite.json", report)
        if args.report:
            from graphpeft.pictures import write_report_html

            with progress.spinner("drawing report.html"):
                write_report_html(peft_model, tmp / "report.html")
        files = _files(tmp)
    print(f"wrote {Path(args.output)}/ ({', '.join(files)}{'; no weights, --meta' if args.meta else ''})")
    return {**report, "output": str(out), "files": files}


def _check_row_fields(peft_model: Any, data: Any) -> None:
    """Inputs a pass added to the graph (task ids) must come from an integer field of every row."""
    from graphpeft.data import integer_fields
    from graphpeft.rewriter import EXTRA_INPUTS

    missing = sorted(set(peft_model.graph_module.meta.get(EXTRA_INPUTS, {})) - integer_fields(data))
    if missing:
        raise GraphPeftError(f"the adapter needs {missing[0]} for every row: add an integer field "
                             f"\"{missing[0]}\" to each line of {data.path}")


def cmd_train(args: argparse.Namespace, method: registry.Method) -> dict:
    import torch

    import graphpeft
    from graphpeft import hub
    from graphpeft.data import SEQ_CLS, make_loader, read_jsonl
    from graphpeft.match import find_sites
    from graphpeft.train import train

    data = read_jsonl(args.data)
    # a config that needs the training length (a field total_step) gets the number of optimizer steps
    steps = args.epochs * math.ceil(len(data) / args.batch_size)
    if args.adapter:
        given = _method_options_given(method, args) + (["--config"] if args.config else [])
        if given:
            raise GraphPeftError(f"--adapter takes its options from its adapter_config.json; drop {' '.join(given)}")
    else:
        build_config(method, args, total_step=steps)
    out = Path(args.output).expanduser()
    check_output(out, args.overwrite)
    torch.manual_seed(args.seed)
    tokenizer = hub.load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    model = _load_model(args.model, task=data.task, num_labels=data.num_labels or None,
                        trust_remote_code=args.trust_remote_code)
    if data.task == SEQ_CLS and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id   # decoder classifiers pool the last non-pad token
    name = _model_name(model, args.model)
    gm = _capture(model, name)
    candidates = {s.node.name: s for s in find_sites(gm)}
    if args.adapter:
        with progress.spinner(f"loading the adapter {args.adapter}"):
            peft_model = graphpeft.from_pretrained(gm, args.adapter, is_trainable=True)
        config = next(iter(peft_model.peft_config.values()))
        method = registry.method_for_config(config)
    else:
        config = build_config(method, args, task_type=_task_type(model), base_model_name_or_path=name,
                              total_step=steps)
        peft_model = _rewrite(gm, config, method)
    _check_row_fields(peft_model, data)
    task = f"{data.task}, {data.num_labels} labels" if data.task == SEQ_CLS else data.task
    print(f"data: {args.data} ({len(data)} rows, {task})")
    print(f"model: {name} ({type(model).__name__}); {method.name} on {len(peft_model.records)} sites:")
    print_records(peft_model.records, candidates)
    print_params(peft_model)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions:   # virtual tokens a method puts in front of the text take positions too
        max_positions -= getattr(config, "num_virtual_tokens", None) or 0
    max_length = min(args.max_length, max_positions or args.max_length)
    loader = make_loader(data, tokenizer, batch_size=args.batch_size, max_length=max_length, seed=args.seed)
    history = train(peft_model, loader, epochs=args.epochs, lr=args.lr,
                    on_epoch=lambda i, loss: print(f"epoch {i + 1}/{args.epochs}: mean loss {loss:.4f}", flush=True))
    report = rewrite_report("train", method, name, model, config, peft_model, len(candidates))
    log = {"data": str(args.data), "rows": len(data), "task": data.task, "num_labels": data.num_labels,
           "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "max_length": max_length,
           "seed": args.seed, "epoch_losses": history.epoch_losses, "step_losses": history.step_losses}
    with staged_output(out, args.overwrite) as tmp:
        peft_model.save_pretrained(str(tmp))
        write_json(tmp / "rewrite.json", report)
        write_json(tmp / "train.json", log)
        files = _files(tmp)
    print(f"wrote {Path(args.output)}/ ({', '.join(files)})")
    return {**report, "train": log, "output": str(out), "files": files}


def cmd_export(args: argparse.Namespace, method: registry.Method) -> dict:
    from graphpeft.export.commands import INFERENCE_DIR, TRAINING_DIR, run_export

    run_export(args)
    kind = "onnx-training" if args.onnx_training else "onnx"
    out = Path(args.output).expanduser() if args.output else \
        Path(args.adapter).expanduser() / (TRAINING_DIR if args.onnx_training else INFERENCE_DIR)
    return {"command": "export", "kind": kind, "adapter": str(args.adapter), "output": str(out), "files": _files(out)}


def cmd_edge_train(args: argparse.Namespace, method: registry.Method) -> dict:
    from graphpeft.export.commands import run_edge_train

    run_edge_train(args)
    out = Path(args.output).expanduser()
    log_file = out / "edge_train.json"
    log = json.loads(log_file.read_text(encoding="utf-8")) if log_file.is_file() else {}
    return {"command": "edge-train", "artifacts": str(args.artifacts), "output": str(out), "files": _files(out),
            "train": log}


def cmd_methods(args: argparse.Namespace, method: registry.Method) -> dict:
    rows = []
    for m in registry.methods().values():
        options = [{k: v for k, v in o.items() if k != "kind"} for o in method_options(m)]
        rows.append({"name": m.name, "peft_type": m.config_cls.peft_type, "config_class": m.config_cls.__name__,
                     "summary": m.summary, "options": options})
    for row in rows:
        print(f"{row['name']}  ({row['peft_type']}, graphpeft.{row['config_class']})  {row['summary']}")
        width = max((len(o["flag"]) for o in row["options"]), default=0)
        for o in row["options"]:
            default = "" if o["default"] is None else f" (default: {o['default']})"
            print(f"    {o['flag']:<{width}}  {o['type']:<9} {o['field']}: {o['help']}{default}")
        print()
    print("'graphpeft rewrite --method NAME --help' shows a method's options with the command's.")
    return {"command": "methods", "methods": rows}


_COMMANDS: dict[str, Callable[[argparse.Namespace, registry.Method], dict]] = {
    "inspect": cmd_inspect, "rewrite": cmd_rewrite, "train": cmd_train, "export": cmd_export,
    "edge-train": cmd_edge_train, "methods": cmd_methods}


# -- entry point ----------------------------------------------------------------------------------

def quiet_libraries() -> None:
    """Library chatter (load reports, progress bars of weight loading, deprecations) stays out of the output."""
    if os.environ.get("GRAPHPEFT_DEBUG") == "1":
        return
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def _run(args: argparse.Namespace, method: registry.Method) -> int:
    """Run a command; with --json its human-readable lines are dropped and its result printed as JSON."""
    command = _COMMANDS[args.command]
    if not getattr(args, "json", False):
        command(args, method)
        return 0
    with progress.silenced(), contextlib.redirect_stdout(io.StringIO()):
        result = command(args, method)
    sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    sys.stdout.flush()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 bad input, 1 unexpected error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = os.environ.get("GRAPHPEFT_DEBUG") == "1"
    try:
        with warnings.catch_warnings():
            quiet_libraries()
            args, method = parse_args(argv)
            return _run(args, method)
    except GraphPeftError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except click.exceptions.Exit as exc:      # --help, --version
        return exc.exit_code
    except click.ClickException as exc:
        print(f"{PROG}: error: {_usage_message(exc)}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:              # the reader of stdout went away (graphpeft methods | head)
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:  # noqa: BLE001 - the last resort: one line, and how to get the rest
        if debug:
            traceback.print_exc()
        reason = " ".join(str(exc).split())[:300] or "(no message)"
        print(f"{PROG}: internal error: {type(exc).__name__}: {reason} -- this is a bug; please report it with the "
              f"command you ran{'' if debug else ' (GRAPHPEFT_DEBUG=1 shows the traceback)'}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
