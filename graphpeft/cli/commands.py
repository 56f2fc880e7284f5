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
import io
import json
import logging
import math
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import click

from graphpeft.runtime import progress

from graphpeft.cli.options import (DEFAULT_EDGE_OUT, DEFAULT_METHOD, DEFAULT_OUT, PROG, build_config,  # noqa: F401
                                  method_options, method_options_given, parse_args, usage_message)
from graphpeft.cli.report import print_params, print_records, rewrite_report
from graphpeft.engine import registry
from graphpeft.engine.errors import GraphPeftError
from graphpeft.runtime.outputs import check_output, staged_output, write_json


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


def _load_model(name: Optional[str], quantize: Optional[str] = None, **kwargs: Any) -> Any:
    from graphpeft.runtime import hub

    with progress.spinner(f"loading {name or 'the default model'}"):
        model = hub.load_model(name, **kwargs)
    if quantize:
        from graphpeft.engine.quantized import quantize_model

        with progress.spinner(f"quantizing its linear layers ({quantize})"):
            quantize_model(model, quantize)
    return model


def _check_quantize(args: argparse.Namespace) -> None:
    """--quantize fails before any model is loaded when its library is missing."""
    if getattr(args, "quantize", None):
        from graphpeft.engine.quantized import require_for

        require_for(args.quantize)
        if getattr(args, "meta", False):
            raise GraphPeftError("--quantize needs the model's weights; drop --meta")


def _capture(model: Any, name: str) -> Any:
    """graphpeft.capture, with the model's name in the error a user sees (and a spinner while it runs)."""
    from graphpeft import capture
    from graphpeft.engine.errors import CaptureError

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
    from graphpeft.engine.match import find_sites

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
    from graphpeft.engine.match import find_sites

    build_config(method, args)                      # bad options fail before the model is loaded
    _check_quantize(args)
    out = Path(args.output).expanduser()
    check_output(out, args.overwrite)
    torch.manual_seed(args.seed)                    # adapter initialisation: same seed, same files
    if args.meta:
        from graphpeft.runtime.meta import meta_model
        model = meta_model(args.model, trust_remote_code=args.trust_remote_code)
    else:
        model = _load_model(args.model, task="auto", trust_remote_code=args.trust_remote_code, quantize=args.quantize)
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
            from graphpeft.runtime.meta import save_config
            save_config(peft_model, tmp)
        else:
            peft_model.save_pretrained(str(tmp))
        write_json(tmp / "rewrite.json", report)
        if args.report:
            from graphpeft.cli.pictures import write_report_html

            with progress.spinner("drawing report.html"):
                write_report_html(peft_model, tmp / "report.html")
        files = _files(tmp)
    print(f"wrote {Path(args.output)}/ ({', '.join(files)}{'; no weights, --meta' if args.meta else ''})")
    return {**report, "output": str(out), "files": files}


def _check_row_fields(peft_model: Any, data: Any) -> None:
    """Inputs a pass added to the graph (task ids) must come from an integer field of every row."""
    from graphpeft.runtime.data import integer_fields
    from graphpeft.engine.rewriter import EXTRA_INPUTS

    missing = sorted(set(peft_model.graph_module.meta.get(EXTRA_INPUTS, {})) - integer_fields(data))
    if missing:
        raise GraphPeftError(f"the adapter needs {missing[0]} for every row: add an integer field "
                             f"\"{missing[0]}\" to each line of {data.path}")


def cmd_train(args: argparse.Namespace, method: registry.Method) -> dict:
    import torch

    import graphpeft
    from graphpeft.runtime import hub
    from graphpeft.runtime.data import SEQ_CLS, Collator, read_jsonl
    from graphpeft.engine.match import find_sites
    from graphpeft.runtime.train import train

    data = read_jsonl(args.data)
    eval_data = read_jsonl(args.eval_data) if args.eval_data else None
    if eval_data is not None and (eval_data.task, eval_data.num_labels) != (data.task, data.num_labels):
        raise GraphPeftError(f"--eval-data {args.eval_data} is {eval_data.task} with {eval_data.num_labels} labels, "
                             f"but --data is {data.task} with {data.num_labels}; give rows of the same form")
    if args.resume and not Path(args.resume).is_dir():
        raise GraphPeftError(f"--resume {args.resume} is not a folder; pass a checkpoint-N folder written by --save-steps")
    # a config that needs the training length (a field total_step) gets the number of optimizer steps
    steps = args.epochs * math.ceil(math.ceil(len(data) / args.batch_size) / args.grad_accum)
    if args.adapter:
        given = method_options_given(method, args) + (["--config"] if args.config else [])
        if given:
            raise GraphPeftError(f"--adapter takes its options from its adapter_config.json; drop {' '.join(given)}")
    else:
        build_config(method, args, total_step=steps)
    _check_quantize(args)
    out = Path(args.output).expanduser()
    check_output(out, args.overwrite)
    torch.manual_seed(args.seed)
    tokenizer = hub.load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    model = _load_model(args.model, task=data.task, num_labels=data.num_labels or None,
                        trust_remote_code=args.trust_remote_code, quantize=args.quantize)
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
    checkpoints = None
    if args.save_steps:
        checkpoints = Path(args.checkpoint_dir or f"{out}-checkpoints").expanduser()
    history = train(peft_model, data.examples, Collator(tokenizer, data.task, max_length), epochs=args.epochs,
                    lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum, lr_scheduler=args.lr_scheduler,
                    warmup_ratio=args.warmup_ratio, gradient_checkpointing=args.gradient_checkpointing,
                    eval_rows=eval_data.examples if eval_data else None, save_steps=args.save_steps,
                    checkpoint_dir=str(checkpoints) if checkpoints else None, resume=args.resume, seed=args.seed,
                    on_epoch=lambda i, loss: print(f"epoch {i + 1}/{args.epochs}: mean loss {loss:.4f}", flush=True))
    for i, result in enumerate(history.evaluations):
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k in ("loss", "accuracy"))
        print(f"eval after epoch {i + 1}: {shown} ({args.eval_data})")
    report = rewrite_report("train", method, name, model, config, peft_model, len(candidates))
    log = {"data": str(args.data), "rows": len(data), "task": data.task, "num_labels": data.num_labels,
           "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "max_length": max_length,
           "grad_accum": args.grad_accum, "lr_scheduler": args.lr_scheduler, "warmup_ratio": args.warmup_ratio,
           "gradient_checkpointing": args.gradient_checkpointing, "seed": args.seed,
           "epoch_losses": history.epoch_losses, "step_losses": history.step_losses,
           "evaluations": history.evaluations, "checkpoints": str(checkpoints) if checkpoints else None,
           "resumed_from": args.resume}
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
_COMMANDS.update(__import__("graphpeft.cli.generate", fromlist=["COMMANDS"]).COMMANDS)   # generate, merge


# -- entry point ----------------------------------------------------------------------------------

def quiet_libraries() -> None:
    """Library chatter (load reports, progress bars of weight loading, deprecations) stays out of the output."""
    if os.environ.get("GRAPHPEFT_DEBUG") == "1":
        return
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # the quant extra's import-time chatter (torchao's optional CUDA kernels, bitsandbytes' optional kernel hub)
    for name in ("torchao", "bitsandbytes", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
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
        print(f"{PROG}: error: {usage_message(exc)}", file=sys.stderr)
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
