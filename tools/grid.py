"""Every method, with default settings, on every architecture of the grid: a table of pass / fail with the reason.

    PYTHONPATH=. .venv/bin/python tools/grid.py                          # all architectures x all methods
    PYTHONPATH=. .venv/bin/python tools/grid.py --archs llama,vit --methods lora,prompt --json grid.json
    PYTHONPATH=. .venv/bin/python tools/grid.py --archs 14               # the 14 architectures of issue 14

Architectures are the tiny, seeded models of ``tests/grid_models.py`` (built from transformers configs,
nothing downloaded), captured once each. A cell passes when, on a copy of the captured graph:

1. rewrite   ``graphpeft.rewrite`` with the method's config class and its defaults (only what PEFT
             requires is set: ``num_virtual_tokens=4`` for the methods that add tokens, AdaLoRA's
             ``total_step=10``; ``task_type`` from the model's head);
2. forward   a train-mode forward with the head's targets (labels, or start/end positions) gives a
             finite loss;
3. step      one AdamW step moves some of the adapter's trainable parameters and nothing else;
4. reload    ``save_pretrained`` then ``graphpeft.from_pretrained`` on a fresh copy of the graph gives
             equal outputs (eval mode, atol 1e-5).

A failing cell records the stage and the exception (type and first line).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphpeft  # noqa: E402
from tests import grid_models as G  # noqa: E402

V = 4
TASK_TYPES = {"causal": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "sequence": "SEQ_CLS", "audio": "SEQ_CLS",
              "token": "TOKEN_CLS", "question": "QUESTION_ANS", "masked": None, "multiple_choice": None}
METHODS: dict[str, Callable[[Optional[str]], Any]] = {
    "lora": lambda task: graphpeft.LoraConfig(task_type=task),
    "lora-all-linear": lambda task: graphpeft.LoraConfig(task_type=task, target_modules="all-linear"),
    "ia3": lambda task: graphpeft.IA3Config(task_type=task),
    "prompt": lambda task: graphpeft.PromptTuningConfig(task_type=task, num_virtual_tokens=V),
    "p-tuning": lambda task: graphpeft.PromptEncoderConfig(task_type=task, num_virtual_tokens=V),
    "prefix": lambda task: graphpeft.PrefixTuningConfig(task_type=task, num_virtual_tokens=V),
    "mpt": lambda task: graphpeft.MultitaskPromptTuningConfig(task_type=task, num_virtual_tokens=V),
    "adalora": lambda task: graphpeft.AdaLoraConfig(task_type=task, total_step=10),
}


class CellError(Exception):
    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage, self.reason = stage, reason


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:160] if text else ''}".rstrip(": ")


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, dict):
        for key in ("logits", "start_logits"):
            if key in out:
                return out[key]
        out = tuple(out.values())
    return next(t for t in out if isinstance(t, torch.Tensor) and t.dim() > 0)


def _extras(peft_model: Any, batch: dict) -> dict:
    """Inputs a pass added (multitask prompt tuning's task_ids): task 0 for every row."""
    params = inspect.signature(peft_model.forward).parameters
    b = next(iter(batch.values())).shape[0]
    return {"task_ids": torch.zeros(b, dtype=torch.long)} if "task_ids" in params else {}


def run_cell(gm: Any, model: Any, method: str, batch: dict, targets: dict) -> None:
    """One cell on a copy of the captured graph ``gm``; raises CellError(stage, reason) when a stage fails."""
    task = TASK_TYPES.get(G.head_kind(model))
    stage = "rewrite"
    try:
        torch.manual_seed(0)
        peft_model = graphpeft.rewrite(copy.deepcopy(gm), METHODS[method](task))
        peft_model.train()
        extras = _extras(peft_model, batch)
        stage = "forward"
        loss = peft_model(**batch, **targets, **extras).loss
        if loss is None or not torch.isfinite(loss):
            raise CellError(stage, f"loss is {loss}")
        stage = "step"
        names = {n for n, p in peft_model.named_parameters() if p.requires_grad}
        if not names:
            raise CellError(stage, "no trainable parameter")
        before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
        loss.backward()
        opt.step()
        peft_model.update_and_allocate(0)
        moved = {n for n, p in peft_model.named_parameters() if not torch.equal(p.detach(), before[n])}
        if not moved:
            raise CellError(stage, "no parameter moved")
        if moved - names:
            raise CellError(stage, f"frozen parameter moved: {sorted(moved - names)[0]}")
        stage = "reload"
        peft_model.eval()
        with torch.no_grad():
            expected = _first_tensor(peft_model(**batch, **extras))
        with tempfile.TemporaryDirectory() as folder:
            peft_model.save_pretrained(folder)
            again = graphpeft.from_pretrained(copy.deepcopy(gm), folder).eval()
            with torch.no_grad():
                got = _first_tensor(again(**batch, **extras))
        if got.shape != expected.shape or not torch.allclose(got, expected, atol=1e-5, rtol=0):
            diff = (got - expected).abs().max().item() if got.shape == expected.shape else "shape"
            raise CellError(stage, f"outputs differ after reload (max |diff| {diff})")
    except CellError:
        raise
    except Exception as exc:      # every failure is a finding of the grid: record it
        raise CellError(stage, _reason(exc)) from exc


def run_grid(archs: list[str], methods: list[str], progress: bool = False) -> list[dict]:
    """One row per cell: {arch, method, ok, stage, reason, seconds}."""
    rows = []
    for arch in archs:
        start = time.perf_counter()
        try:
            model = G.ARCHS[arch]()
            gm = graphpeft.capture(model)
            batch = G.batch_for(model)                  # the same inputs for every method
            targets = G.targets_for(model, batch)
            failure: Optional[CellError] = None
        except Exception as exc:
            model, gm, failure = None, None, CellError("capture", _reason(exc))
        for method in methods:
            t0 = time.perf_counter()
            if failure is None:
                try:
                    run_cell(gm, model, method, batch, targets)
                    cell = dict(ok=True, stage="", reason="")
                except CellError as err:
                    cell = dict(ok=False, stage=err.stage, reason=err.reason)
            else:
                cell = dict(ok=False, stage=failure.stage, reason=failure.reason)
            rows.append(dict(arch=arch, method=method, seconds=round(time.perf_counter() - t0, 2), **cell))
            if progress:
                print(f"  {arch:15s} {method:16s} {'pass' if cell['ok'] else 'FAIL ' + cell['stage'] + ': ' + cell['reason']}",
                      file=sys.stderr, flush=True)
        if progress:
            print(f"{arch}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: architectures x methods, ✓ or ✗n with the reasons listed below (one per distinct reason)."""
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cells = {(r["arch"], r["method"]): r for r in rows}
    reasons: dict[str, int] = {}
    lines = ["| architecture | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for arch in archs:
        marks = []
        for method in methods:
            r = cells[(arch, method)]
            if r["ok"]:
                marks.append("✓")
            else:
                key = f"{r['stage']}: {r['reason']}"
                marks.append(f"✗{reasons.setdefault(key, len(reasons) + 1)}")
        lines.append(f"| {arch} | " + " | ".join(marks) + " |")
    passed = sum(r["ok"] for r in rows)
    lines += ["", f"{passed}/{len(rows)} cells pass."]
    if reasons:
        lines += [""] + [f"{n}. {key}" for key, n in reasons.items()]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="all", help="comma-separated names, or 'all', '14' (issue 14's), 'more'")
    parser.add_argument("--methods", default="all", help=f"comma-separated, of: {', '.join(METHODS)}")
    parser.add_argument("--json", help="also write the cells to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)     # torch's pytree deprecation, once per copy
    groups = {"all": list(G.ARCHS), "14": list(G.GRID_14), "more": list(G.GRID_MORE)}
    archs = groups.get(args.archs) or [a.strip() for a in args.archs.split(",") if a.strip()]
    methods = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [a for a in archs if a not in G.ARCHS] + [m for m in methods if m not in METHODS]
    if unknown:
        print(f"error: unknown architecture or method {unknown[0]!r}; architectures: {', '.join(G.ARCHS)}; "
              f"methods: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    rows = run_grid(archs, methods, progress=not args.quiet)
    print(table(rows))
    print(f"\n({time.perf_counter() - start:.0f} s, torch {torch.__version__})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
