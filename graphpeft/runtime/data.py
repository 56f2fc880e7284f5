"""Training data: JSON Lines files read, checked and turned into padded batches.

One object per line:

    {"text": "a review ..."}                 causal language modelling (task "causal-lm")
    {"text": "a review ...", "label": 1}     sequence classification (task "seq-cls"), labels 0..K-1
    {"text": "...", "task_ids": 2}           other integer fields are kept and batched under their name:
                                             inputs a pass added to the graph (task ids) read them

Every line must have the same form. A bad row is a GraphPeftError naming the file and the line.
Blank lines are skipped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from graphpeft.engine.errors import GraphPeftError

CAUSAL_LM, SEQ_CLS = "causal-lm", "seq-cls"


@dataclass(frozen=True)
class Example:
    text: str
    label: Optional[int] = None
    extras: tuple[tuple[str, int], ...] = ()     # other integer fields, e.g. ("task_ids", 2)


@dataclass(frozen=True)
class Dataset:
    """Rows of one file, the task they call for, and the number of labels (0 for causal LM)."""

    path: str
    examples: tuple[Example, ...]
    task: str
    num_labels: int = 0

    def __len__(self) -> int:
        return len(self.examples)


def read_jsonl(path: str | os.PathLike) -> Dataset:
    """Read and check a JSONL data file; the task follows from whether rows carry a label."""
    name = str(path)
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise GraphPeftError(f"data file {name} does not exist") from None
    except IsADirectoryError:
        raise GraphPeftError(f"data file {name} is a folder; pass a .jsonl file") from None
    except UnicodeDecodeError:
        raise GraphPeftError(f"data file {name} is not UTF-8 text; pass a JSON Lines file") from None
    except OSError as exc:
        raise GraphPeftError(f"cannot read data file {name}: {exc.strerror}") from None
    examples: list[Example] = []
    labelled: Optional[bool] = None
    first = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        example = _parse_row(name, number, line)
        has_label = example.label is not None
        if labelled is None:
            labelled, first = has_label, number
        elif has_label != labelled:
            mine, theirs = ("has a 'label'", "has none") if has_label else ("has no 'label'", "has one")
            raise GraphPeftError(f"{name}:{number}: this row {mine} but line {first} {theirs}; "
                                 f"either every row has an integer label or none has")
        examples.append(example)
    if not examples:
        raise GraphPeftError(f"data file {name} is empty; write one JSON object per line with a 'text' field")
    if not labelled:
        return Dataset(name, tuple(examples), CAUSAL_LM)
    labels = sorted({e.label for e in examples})
    if labels != list(range(len(labels))):
        raise GraphPeftError(f"{name}: labels must be 0..K-1 with every value present, found {labels[:10]}")
    if len(labels) < 2:
        raise GraphPeftError(f"{name}: every row has label {labels[0]}; classification needs at least two labels")
    return Dataset(name, tuple(examples), SEQ_CLS, len(labels))


def _parse_row(name: str, number: int, line: str) -> Example:
    where = f"{name}:{number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise GraphPeftError(f"{where}: not valid JSON ({exc.msg}); write one JSON object per line") from None
    if not isinstance(row, dict):
        raise GraphPeftError(f"{where}: expected a JSON object like {{\"text\": ...}}, got {type(row).__name__}")
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        what = "is missing" if "text" not in row else "must be a non-empty string"
        raise GraphPeftError(f"{where}: field 'text' {what}")
    label = row.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
        raise GraphPeftError(f"{where}: field 'label' must be an integer, got {label!r}")
    if label is not None and label < 0:
        raise GraphPeftError(f"{where}: field 'label' must be >= 0, got {label}")
    extras = tuple(sorted((k, v) for k, v in row.items() if k not in ("text", "label")
                          and isinstance(v, int) and not isinstance(v, bool)))
    return Example(text, label, extras)


def integer_fields(dataset: Dataset) -> set[str]:
    """The extra integer fields every row of ``dataset`` carries."""
    fields = [dict(e.extras).keys() for e in dataset.examples]
    return set.intersection(*(set(f) for f in fields)) if fields else set()


class Collator:
    """Tokenizes a list of examples into one padded batch.

    input_ids / attention_mask come from the tokenizer (padding to the longest row, truncation to
    ``max_length``); labels are the class ids (seq-cls) or the input ids with pad positions set to -100
    (causal-lm, so padding does not count in the loss).
    """

    def __init__(self, tokenizer: Any, task: str, max_length: int = 128):
        if max_length <= 0:
            raise GraphPeftError(f"max_length must be a positive integer, got {max_length}")
        self.tokenizer, self.task, self.max_length = tokenizer, task, max_length

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer([e.text for e in examples], padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        batch = dict(batch)
        if self.task == SEQ_CLS:
            batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
        else:
            labels = batch["input_ids"].clone()
            labels[batch["attention_mask"] == 0] = -100
            batch["labels"] = labels
        shared = set.intersection(*(set(dict(e.extras)) for e in examples)) if examples else set()
        for name in sorted(shared - set(batch)):
            batch[name] = torch.tensor([dict(e.extras)[name] for e in examples], dtype=torch.long)
        return batch


def make_loader(dataset: Dataset, tokenizer: Any, batch_size: int = 8, max_length: int = 128,
                shuffle: bool = True, seed: int = 0) -> DataLoader:
    """A DataLoader of padded batches; shuffled with its own seeded generator (reproducible order)."""
    if batch_size <= 0:
        raise GraphPeftError(f"batch_size must be a positive integer, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(list(dataset.examples), batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=Collator(tokenizer, dataset.task, max_length))
