"""The bodies of ``graphpeft export`` and ``graphpeft edge-train`` (the parsers live in graphpeft/cli.py).

    graphpeft export ADAPTER [MODEL] --onnx [--unmerged]                    -> ADAPTER/onnx/
    graphpeft export ADAPTER [MODEL] --onnx-training [--optimizer sgd] ...  -> ADAPTER/onnx-training/
    graphpeft edge-train ARTIFACTS --data FILE.jsonl [-o OUT]               -> OUT/ (PEFT adapter)

ADAPTER is a folder written by ``graphpeft rewrite`` or ``graphpeft train``: its adapter files, and
rewrite.json / train.json, which name the base model and the task. Outputs are staged in a temporary
folder and renamed into place; an existing non-empty output is refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

from graphpeft.engine.errors import GraphPeftError
from graphpeft.runtime import progress
from graphpeft.runtime.outputs import check_output, staged_output, write_json

INFERENCE_DIR, TRAINING_DIR = "onnx", "onnx-training"
TOKENIZER_DIR = "tokenizer"
DEFAULT_EDGE_OUT = "graphpeft-edge-out"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GraphPeftError(f"{path} is not valid JSON ({exc}); write the folder again") from None
    return data if isinstance(data, dict) else {}


def _base_model(folder: Path, given: Optional[str], config: dict, report: dict) -> str:
    name = given or report.get("model") or config.get("base_model_name_or_path")
    if not name:
        raise GraphPeftError(f"{folder} does not name its base model (no rewrite.json, no base_model_name_or_path); "
                             f"pass MODEL")
    return str(name)


def load_adapter_folder(folder: str, model_name: Optional[str], trainable: bool,
                        trust_remote_code: bool = False) -> tuple[Any, str, Any]:
    """(GraphPeftModel with the folder's adapter, base model name, tokenizer or None)."""
    import graphpeft
    from graphpeft.runtime import hub
    from graphpeft.runtime.io import read_adapter

    path = Path(folder).expanduser()
    config, _ = read_adapter(path)                           # one-line errors for a bad folder
    report, log = _read_json(path / "rewrite.json"), _read_json(path / "train.json")
    name = _base_model(path, model_name, config, report)
    task = log.get("task") if log.get("task") in hub.TASKS else "auto"
    model = hub.load_model(name, task=task, num_labels=log.get("num_labels") or None,
                           trust_remote_code=trust_remote_code)
    try:
        tokenizer = hub.load_tokenizer(name, trust_remote_code=trust_remote_code)
    except GraphPeftError:
        tokenizer = None
    if tokenizer is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id   # as `graphpeft train` does for decoder classifiers
    gm = graphpeft.capture(model)
    return graphpeft.from_pretrained(gm, str(path), is_trainable=trainable), name, tokenizer


def run_export(args: argparse.Namespace) -> int:
    from graphpeft.export.extra import require

    training = bool(args.onnx_training)
    require("graphpeft export --onnx-training" if training else "graphpeft export --onnx", training=training)
    folder = Path(args.adapter).expanduser()
    out = Path(args.output).expanduser() if args.output else folder / (TRAINING_DIR if training else INFERENCE_DIR)
    check_output(out, args.overwrite)
    with progress.spinner(f"loading {folder} and capturing its base model"):
        peft_model, name, tokenizer = load_adapter_folder(args.adapter, args.model, training, args.trust_remote_code)
    print(f"model: {name} ({peft_model.capture_info.model_class}); adapter {folder} "
          f"({len(peft_model.records)} sites)")
    if training:
        return _export_training(args, peft_model, tokenizer, out)
    return _export_inference(args, peft_model, tokenizer, out)


def _export_inference(args: argparse.Namespace, peft_model: Any, tokenizer: Any, out: Path) -> int:
    from graphpeft.export.onnx import export_onnx

    with staged_output(out, args.overwrite) as tmp:
        with progress.spinner("exporting to ONNX"):
            result = export_onnx(peft_model, tmp / "model.onnx", merged=not args.unmerged)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        write_json(tmp / "export.json", {"kind": "onnx", "merged": result.merged, "inputs": list(result.input_names),
                                         "outputs": list(result.output_names)})
    adapters = len(result.adapter_initializers)
    how = "adapters merged into the weights" if result.merged else f"{adapters} adapter weights kept as initializers"
    if result.statement:
        print(result.statement)
    print(f"wrote {out}/model.onnx ({how}); inputs: {', '.join(result.input_names)}; "
          f"outputs: {', '.join(result.output_names)}")
    if result.external_data is not None:
        print(f"weights above 2 GB: external data in {out}/{result.external_data.name}")
    print(result.dynamic_statement)
    return 0


def _export_training(args: argparse.Namespace, peft_model: Any, tokenizer: Any, out: Path) -> int:
    from graphpeft.export.training import export_training

    if tokenizer is None:
        raise GraphPeftError("the base model has no tokenizer, which edge-train needs to read text; save the "
                             "tokenizer into the model folder (tokenizer.save_pretrained)")
    with staged_output(out, args.overwrite) as tmp:
        with progress.spinner("exporting ONNX Runtime training artifacts"):
            result = export_training(peft_model, tmp, optimizer=args.optimizer,
                                     nominal_checkpoint=args.nominal_checkpoint, max_grad_norm=args.max_grad_norm)
        tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        sizes = {p.name: _size(p) for p in tmp.iterdir() if p.name.endswith("checkpoint")}
    loss = "next-token cross-entropy (-100 ignored)" if result.task == "causal-lm" else "cross-entropy over labels"
    if result.statement:
        print(result.statement)
    print(f"wrote {out}/ (training_model.onnx, eval_model.onnx, optimizer_model.onnx, "
          f"{', '.join(sorted(sizes))}, edge.json, adapter files, tokenizer/)")
    print(f"task: {result.task}, loss: {loss}; optimizer: {result.optimizer}"
          f"{f', gradient norm clipped at {args.max_grad_norm}' if args.max_grad_norm else ''}")
    print(f"trainable: {len(result.trainable)} adapter parameters; frozen: {len(result.frozen)} base weights")
    print("checkpoints: " + ", ".join(f"{k} {_human(v)}" for k, v in sorted(sizes.items())))
    print(result.dynamic_statement)
    for note in result.notes:
        print(f"note: {note}")
    return 0


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def run_edge_train(args: argparse.Namespace) -> int:
    from graphpeft.runtime.data import SEQ_CLS, make_loader, read_jsonl
    from graphpeft.export.edge import EdgeTrainer, read_manifest
    from graphpeft.export.extra import require

    require("graphpeft edge-train")
    folder = Path(args.artifacts).expanduser()
    manifest = read_manifest(folder)
    data = read_jsonl(args.data)
    if data.task != manifest["task"]:
        raise GraphPeftError(f"{args.data} holds {data.task} rows but the artifacts train {manifest['task']}; "
                             f"{'give every row an integer label' if manifest['task'] == SEQ_CLS else 'drop the labels'}")
    if data.task == SEQ_CLS and data.num_labels > manifest["num_labels"]:
        raise GraphPeftError(f"{args.data} has {data.num_labels} labels but the model classifies into "
                             f"{manifest['num_labels']}")
    out = Path(args.output).expanduser()
    check_output(out, args.overwrite)
    tokenizer = _edge_tokenizer(folder)
    max_length = min(args.max_length, manifest.get("max_length") or args.max_length)
    loader = make_loader(data, tokenizer, batch_size=args.batch_size, max_length=max_length, seed=args.seed)
    import onnxruntime

    onnxruntime.set_seed(args.seed)
    trainer = EdgeTrainer(folder)
    print(f"data: {args.data} ({len(data)} rows, {data.task}); artifacts: {folder} "
          f"({len(manifest['trainable'])} trainable parameters, {manifest['optimizer']})")
    history = trainer.train(loader, epochs=args.epochs, lr=args.lr, progress=progress.enabled(),
                            on_epoch=lambda i, loss: print(f"epoch {i + 1}/{args.epochs}: mean loss {loss:.4f}",
                                                           flush=True))
    log = {"data": str(args.data), "rows": len(data), "task": data.task, "epochs": args.epochs, "lr": args.lr,
           "batch_size": args.batch_size, "max_length": max_length, "seed": args.seed,
           "optimizer": manifest["optimizer"], "epoch_losses": history.epoch_losses,
           "step_losses": history.step_losses, "artifacts": str(folder)}
    with staged_output(out, args.overwrite) as tmp:
        trainer.save_adapter(tmp)
        write_json(tmp / "edge_train.json", log)
    print(f"wrote {out}/ (adapter_config.json, adapter_model.safetensors, edge_train.json)")
    return 0


def _edge_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    path = folder / TOKENIZER_DIR
    if not path.is_dir():
        raise GraphPeftError(f"{folder} has no {TOKENIZER_DIR}/ folder; export the artifacts with "
                             f"'graphpeft export ADAPTER --onnx-training'")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise GraphPeftError(f"cannot load the tokenizer in {path}: {str(exc).splitlines()[0][:200]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer
