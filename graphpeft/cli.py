"""The ``graphpeft`` command.

    graphpeft inspect [MODEL]                                   candidate sites, and which the method takes
    graphpeft rewrite [MODEL] [-o OUT] [--method lora --r 8 --alpha 16 --targets query value]
    graphpeft train OUT --data FILE.jsonl [MODEL] [--epochs 3 --lr 1e-3 ...]
    graphpeft export ADAPTER [MODEL] --onnx [--unmerged] | --onnx-training [--optimizer sgd ...]
    graphpeft edge-train ARTIFACTS --data FILE.jsonl [-o OUT]     ONNX Runtime training (extra 'onnx')

MODEL is a local Hugging Face model folder or a hub id; without it, the embedded default model
(sentence-transformers/all-MiniLM-L6-v2) is used. Methods are reached only through the registry:
``--method`` is parsed first, then the method's options are built from its config dataclass (fields
whose metadata names a ``"cli"`` flag).

Outputs are written to a temporary folder next to OUT and renamed into place at the end, so OUT is
never half-written; an existing non-empty OUT is refused unless ``--overwrite``.
Bad input prints ``graphpeft: error: <one line>`` and exits 2; an unexpected failure exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import traceback
import typing
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

from graphpeft import registry
from graphpeft.errors import GraphPeftError
from graphpeft.outputs import check_output, staged_output, write_json
from graphpeft.report import print_params, print_records, rewrite_report

PROG = "graphpeft"
DEFAULT_METHOD = "lora"
DEFAULT_OUT = "graphpeft-out"
_REGEX_CHARS = set("*+?[](){}|^$\\")


# -- argument parsing ---------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``graphpeft: error: ...``) and exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        raise GraphPeftError(f"{message}; see '{self.prog} --help'")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _number(text: str) -> float | int:
    """A float field's value; integral input stays an int so configs read ``16``, as PEFT writes them."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _targets(values: list[str], flag: str = "--targets") -> str | list[str]:
    """Values of ``--targets`` (or another module-list option): one or more module names (commas
    allowed), or a single regex / "all-linear"."""
    regexes = [v for v in values if _REGEX_CHARS & set(v) or v.lower() == "all-linear"]
    if regexes and len(values) > 1:
        raise GraphPeftError(f"{flag}: {regexes[0]!r} is a regex or 'all-linear', which must be the only value")
    if regexes:
        return values[0]
    names = [part.strip() for v in values for part in v.split(",") if part.strip()]
    if not names:
        raise GraphPeftError(f"{flag} needs at least one module name")
    return names


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


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _cli_fields(method: registry.Method) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(method.config_cls) if f.metadata.get("cli")]


def add_method_options(parser: argparse.ArgumentParser, method: registry.Method) -> None:
    """Add one option per config field that names a CLI flag; unset options keep the config's default."""
    group = parser.add_argument_group(f"{method.name} options", method.summary or None)
    hints = typing.get_type_hints(method.config_cls)
    for f in _cli_fields(method):
        kind, default = _field_kind(hints[f.name]), _field_default(f)
        help_text = f.metadata.get("help", f.name.replace("_", " "))
        shown = default if default is not None else ("the method's default sites" if kind == "targets" else "unset")
        flag = f.metadata["cli"]
        common = {"dest": f"method_{f.name}", "default": None, "help": f"{help_text} (default: {shown})"}
        if kind is not bool:
            common["metavar"] = "NAME" if kind == "targets" else flag.lstrip("-").upper().replace("-", "_")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif kind == "targets":
            group.add_argument(flag, nargs="+",
                               **{**common, "help": f"{help_text}: module names (suffix match), or one regex, "
                                                    f"or 'all-linear' (default: {shown})"})
        elif isinstance(kind, tuple):
            elem = {int: _int, float: _number}.get(kind[1], str)
            group.add_argument(flag, nargs="+", type=elem, **common)
        else:
            group.add_argument(flag, type={int: _int, float: _number}.get(kind, str), **common)


def build_config(method: registry.Method, args: argparse.Namespace, **extra: Any) -> Any:
    """The method's config from its CLI options (and ``extra`` fields the config has)."""
    names = {f.name for f in dataclasses.fields(method.config_cls)}
    hints = typing.get_type_hints(method.config_cls)
    values = {}
    for f in _cli_fields(method):
        value = getattr(args, f"method_{f.name}", None)
        if value is not None:
            values[f.name] = _targets(value, f.metadata["cli"]) if _field_kind(hints[f.name]) == "targets" else value
    # extras fill fields the command line left unset; an option the user gave wins
    values.update({k: v for k, v in extra.items() if k in names and v is not None and k not in values})
    try:
        return method.config_cls(**values)
    except TypeError as exc:
        raise GraphPeftError(f"invalid {method.name} options: {exc}") from None


def _method_options_given(method: registry.Method, args: argparse.Namespace) -> list[str]:
    return [f.metadata["cli"] for f in _cli_fields(method) if getattr(args, f"method_{f.name}", None) is not None]


def _common(parser: argparse.ArgumentParser, method: registry.Method) -> None:
    names = ", ".join(sorted(registry.methods()))
    parser.add_argument("--method", default=DEFAULT_METHOD,
                        help=f"PEFT method, one of: {names} (default: {DEFAULT_METHOD}); its options are listed below")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the model folder's own Python code to run (off by default)")
    parser.add_argument("model", nargs="?", metavar="MODEL",
                        help="local Hugging Face model folder or hub id; not right after --targets, which "
                             "takes several values (default: the embedded sentence-transformers/all-MiniLM-L6-v2)")
    add_method_options(parser, method)


def _out_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT if it exists and is not empty (the old folder is swapped out atomically)")


def make_parser(method: registry.Method) -> argparse.ArgumentParser:
    """The full parser, with ``method``'s options on every subcommand."""
    from graphpeft import __version__

    methods = "\n".join(f"  {m.name:<10} {m.summary}" for m in registry.methods().values())
    epilog = (f"methods (--method):\n{methods}\n\nexamples:\n"
              f"  graphpeft inspect path/to/model\n"
              f"  graphpeft rewrite path/to/model -o adapter --r 16 --alpha 32 --targets all-linear\n"
              f"  graphpeft train adapter --data train.jsonl path/to/model --epochs 3 --lr 1e-3\n"
              f"  graphpeft export adapter --onnx-training && graphpeft edge-train adapter/onnx-training --data train.jsonl\n\n"
              f"Without MODEL the embedded sentence-transformers/all-MiniLM-L6-v2 is used.\n"
              f"'graphpeft COMMAND --help' lists a command's options.")
    parser = _Parser(prog=PROG, allow_abbrev=False, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="Parameter-efficient fine-tuning by rewriting the model's captured graph.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    p = sub.add_parser("inspect", allow_abbrev=False, help="list candidate sites and which ones the method takes",
                       description="List the model's candidate sites (module path, op kind, in/out features) and "
                                   "mark the ones the method takes with the given options; nothing is written.")
    _common(p, method)

    p = sub.add_parser("rewrite", allow_abbrev=False, help="insert adapters and save them (PEFT format)",
                       description="Capture the model, insert the method's adapters and write OUT/adapter_config.json, "
                                   "OUT/adapter_model.safetensors and OUT/rewrite.json.")
    _common(p, method)
    p.add_argument("-o", "--output", metavar="OUT", default=DEFAULT_OUT,
                   help=f"output folder (default: ./{DEFAULT_OUT}); must be absent or empty unless --overwrite")
    _out_options(p)
    p.add_argument("--meta", action="store_true",
                   help="build the model from its config on the meta device (no weights are read) and write "
                        "OUT/adapter_config.json and OUT/rewrite.json only; graphpeft.materialize loads weights later")

    p = sub.add_parser("train", allow_abbrev=False, help="train an adapter on a JSONL file and save it",
                       description="Train an adapter on JSON Lines data: rows {\"text\": ...} train a causal LM, rows "
                                   "{\"text\": ..., \"label\": int} a sequence classifier (labels 0..K-1).")
    p.add_argument("output", metavar="OUT", help="output folder for the trained adapter")
    _common(p, method)
    p.add_argument("--data", required=True, metavar="FILE", help="JSONL training data")
    p.add_argument("--adapter", metavar="DIR",
                   help="continue training a saved adapter (its adapter_config.json replaces the method options)")
    p.add_argument("--epochs", type=_positive_int, default=3, help="passes over the data (default: 3)")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="rows per step (default: 8)")
    p.add_argument("--max-length", type=_positive_int, default=128,
                   help="truncate rows to this many tokens, at most the model's max_position_embeddings (default: 128)")
    p.add_argument("--seed", type=_int, default=0, help="seed for weights init and data order (default: 0)")
    _out_options(p)
    _add_edge_commands(sub)
    return parser


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _add_edge_commands(sub: Any) -> None:
    """``export`` (ONNX inference model / ONNX Runtime training artifacts) and ``edge-train`` (needs the 'onnx' extra)."""
    p = sub.add_parser("export", allow_abbrev=False, help="export an adapter folder to ONNX (inference or training)",
                       description="Export the rewritten graph of an adapter folder (written by rewrite or train) "
                                   "to ONNX: --onnx writes ADAPTER/onnx/model.onnx (adapters merged, or kept as named "
                                   "initializers with --unmerged); --onnx-training writes ONNX Runtime training "
                                   "artifacts to ADAPTER/onnx-training/ in which only the adapter is trainable. "
                                   "Needs the optional extra: pip install 'graphpeft[onnx]'.")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter folder written by 'graphpeft rewrite' or 'graphpeft train'")
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="base model folder or hub id (default: the model named in ADAPTER/rewrite.json)")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--onnx", action="store_true", help="an ONNX inference model")
    kind.add_argument("--onnx-training", action="store_true", help="ONNX Runtime training artifacts")
    p.add_argument("--unmerged", action="store_true",
                   help="--onnx: keep the adapter weights as named initializers instead of merging them")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                   help="--onnx-training: the optimizer model (default: adamw, Hugging Face's AdamW formula)")
    p.add_argument("--max-grad-norm", type=_non_negative_float, default=1.0,
                   help="--onnx-training: clip the gradient norm (default: 1.0, as 'graphpeft train'; 0: off)")
    p.add_argument("--nominal-checkpoint", action="store_true",
                   help="--onnx-training: also write nominal_checkpoint (names and shapes, no weights)")
    p.add_argument("-o", "--output", metavar="DIR",
                   help="output folder (default: ADAPTER/onnx or ADAPTER/onnx-training); absent or empty unless "
                        "--overwrite")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model folder's own Python code to run (off by default)")
    _out_options(p)

    p = sub.add_parser("edge-train", allow_abbrev=False, help="train with ONNX Runtime on exported artifacts",
                       description="Train the adapter with the ONNX Runtime training API on the artifacts of "
                                   "'graphpeft export --onnx-training', on JSONL rows as 'graphpeft train' reads "
                                   "them, and write the trained adapter in PEFT's format. Needs the optional extra: "
                                   "pip install 'graphpeft[onnx]'.")
    p.add_argument("artifacts", metavar="ARTIFACTS", help="folder written by 'graphpeft export ADAPTER --onnx-training'")
    p.add_argument("--data", required=True, metavar="FILE", help="JSONL training data")
    p.add_argument("-o", "--output", metavar="OUT", default="graphpeft-edge-out",
                   help="output folder for the trained adapter (default: ./graphpeft-edge-out)")
    p.add_argument("--epochs", type=_positive_int, default=3, help="passes over the data (default: 3)")
    p.add_argument("--lr", type=_positive_float, default=1e-3,
                   help="initial learning rate, decayed linearly to 0 (default: 1e-3)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="rows per step (default: 8)")
    p.add_argument("--max-length", type=_positive_int, default=128,
                   help="truncate rows to this many tokens, at most the model's max_position_embeddings (default: 128)")
    p.add_argument("--seed", type=_int, default=0, help="seed for data order and dropout (default: 0)")
    _out_options(p)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, registry.Method]:
    """Parse ``--method`` first, then everything with that method's options.

    The subcommand's arguments are parsed intermixed, so positionals may follow options
    (``graphpeft train OUT --data FILE MODEL``).
    """
    argv = list(argv)
    pre = _Parser(prog=PROG, add_help=False, allow_abbrev=False)
    pre.add_argument("--method", default=DEFAULT_METHOD)
    known, _ = pre.parse_known_args(argv)
    method = registry.method(known.method)
    parser = make_parser(method)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if not argv or argv[0] not in subparsers:
        return parser.parse_args(argv), method       # --help, --version, or a usage error
    args = subparsers[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args, method


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


def _capture(model: Any, name: str) -> Any:
    """graphpeft.capture, with the model's name in the error a user sees."""
    from graphpeft import capture
    from graphpeft.errors import CaptureError

    try:
        return capture(model)
    except CaptureError as exc:
        raise CaptureError(f"model {name} cannot be captured as a graph: {exc}") from None


def cmd_inspect(args: argparse.Namespace, method: registry.Method) -> int:
    from graphpeft import hub
    from graphpeft.match import find_sites

    config = build_config(method, args)
    model = hub.load_model(args.model, task="auto", trust_remote_code=args.trust_remote_code)
    gm = _capture(model, _model_name(model, args.model))
    sites = find_sites(gm)
    rule = getattr(method.pass_cls(config), "rule", None)
    taken = {s.node for s in rule.sites(gm)} if rule is not None and hasattr(rule, "sites") else set()
    print(f"model: {_model_name(model, args.model)} ({type(model).__name__})")
    print(f"{len(sites)} candidate sites; * = taken by {method.name} with these options ({len(taken)} sites)")
    width = max((len(s.module_path) for s in sites), default=10)
    print(f"  {'module path':<{width}}  {'kind':<9} {'in':>7} {'out':>7}")
    for s in sites:
        mark = "*" if s.node in taken else " "
        print(f"{mark} {s.module_path:<{width}}  {s.kind:<9} {s.in_features:>7} {s.out_features:>7}")
    return 0


def cmd_rewrite(args: argparse.Namespace, method: registry.Method) -> int:
    import graphpeft
    from graphpeft import hub
    from graphpeft.match import find_sites

    build_config(method, args)                      # bad options fail before the model is loaded
    check_output(Path(args.output).expanduser(), args.overwrite)
    if args.meta:
        from graphpeft.meta import meta_model
        model = meta_model(args.model, trust_remote_code=args.trust_remote_code)
    else:
        model = hub.load_model(args.model, task="auto", trust_remote_code=args.trust_remote_code)
    name = _model_name(model, args.model)
    config = build_config(method, args, task_type=_task_type(model), base_model_name_or_path=name)
    gm = _capture(model, name)
    candidates = {s.node.name: s for s in find_sites(gm)}
    peft_model = graphpeft.rewrite(gm, config)
    print(f"model: {name} ({type(model).__name__}, {len(candidates)} candidate sites)")
    print(f"rewrote {len(peft_model.records)} sites with {method.name}:")
    print_records(peft_model.records, candidates)
    print_params(peft_model)
    report = rewrite_report("rewrite", method, name, model, config, peft_model, len(candidates))
    with staged_output(args.output, args.overwrite) as tmp:
        if args.meta:             # no weights exist yet: the resolved config and the records only
            from graphpeft.meta import save_config
            save_config(peft_model, tmp)
        else:
            peft_model.save_pretrained(str(tmp))
        write_json(tmp / "rewrite.json", report)
    files = "adapter_config.json, rewrite.json; no weights (--meta)" if args.meta else \
        "adapter_config.json, adapter_model.safetensors, rewrite.json"
    print(f"wrote {Path(args.output)}/ ({files})")
    return 0


def cmd_train(args: argparse.Namespace, method: registry.Method) -> int:
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
        given = _method_options_given(method, args)
        if given:
            raise GraphPeftError(f"--adapter takes its options from its adapter_config.json; drop {' '.join(given)}")
    else:
        build_config(method, args, total_step=steps)
    check_output(Path(args.output).expanduser(), args.overwrite)
    torch.manual_seed(args.seed)
    tokenizer = hub.load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    model = hub.load_model(args.model, task=data.task, num_labels=data.num_labels or None,
                           trust_remote_code=args.trust_remote_code)
    if data.task == SEQ_CLS and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id   # decoder classifiers pool the last non-pad token
    name = _model_name(model, args.model)
    gm = _capture(model, name)
    candidates = {s.node.name: s for s in find_sites(gm)}
    if args.adapter:
        peft_model = graphpeft.from_pretrained(gm, args.adapter, is_trainable=True)
        config = next(iter(peft_model.peft_config.values()))
        method = registry.method_for_config(config)
    else:
        config = build_config(method, args, task_type=_task_type(model), base_model_name_or_path=name,
                              total_step=steps)
        peft_model = graphpeft.rewrite(gm, config)
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
    with staged_output(args.output, args.overwrite) as tmp:
        peft_model.save_pretrained(str(tmp))
        write_json(tmp / "rewrite.json", report)
        write_json(tmp / "train.json", log)
    print(f"wrote {Path(args.output)}/ (adapter_config.json, adapter_model.safetensors, rewrite.json, train.json)")
    return 0


def cmd_export(args: argparse.Namespace, method: registry.Method) -> int:
    from graphpeft.export.commands import run_export

    return run_export(args)


def cmd_edge_train(args: argparse.Namespace, method: registry.Method) -> int:
    from graphpeft.export.commands import run_edge_train

    return run_edge_train(args)


_COMMANDS = {"inspect": cmd_inspect, "rewrite": cmd_rewrite, "train": cmd_train, "export": cmd_export,
             "edge-train": cmd_edge_train}


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 bad input, 1 unexpected error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = os.environ.get("GRAPHPEFT_DEBUG") == "1"
    try:
        with warnings.catch_warnings():
            quiet_libraries()
            args, method = parse_args(argv)
            return _COMMANDS[args.command](args, method)
    except GraphPeftError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:            # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last resort: one line, and how to get the rest
        if debug:
            traceback.print_exc()
        reason = " ".join(str(exc).split())[:300] or "(no message)"
        print(f"{PROG}: internal error: {type(exc).__name__}: {reason} -- this is a bug; please report it with the "
              f"command you ran{'' if debug else ' (GRAPHPEFT_DEBUG=1 shows the traceback)'}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
