"""What the command line prints and writes about a rewrite: one line per site, parameter counts,
and the content of OUT/rewrite.json."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from graphpeft.engine import registry


def _param_label(rec: Any, attr: str) -> str:
    short = attr[len(rec.module_path) + 1:] if attr.startswith(rec.module_path + ".") else attr
    return short.replace(f".{rec.adapter}.", ".").replace(f".{rec.adapter}", "")


def print_records(records: Sequence[Any], sites: dict[str, Any]) -> None:
    """One line per rewritten site: module path, op kind, in -> out features, parameters added."""
    width = max((len(r.module_path) for r in records), default=10)
    for rec in records:
        site = sites.get(rec.anchor) if rec.kind != "module" else None
        shape = f"{site.in_features} -> {site.out_features}" if site is not None else "(whole module)"
        added = ", ".join(f"{_param_label(rec, a)} {list(s)}" for a, s in rec.params.items())
        print(f"  {rec.module_path:<{width}}  {rec.kind:<9} {shape:<14} + {added}")


def print_params(model: Any) -> tuple[int, int]:
    trainable, total = model.get_nb_trainable_parameters()
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
    return trainable, total


def rewrite_report(command: str, method: registry.Method, model_name: str, model: Any, config: Any,
                   peft_model: Any, n_candidates: int) -> dict:
    """What OUT/rewrite.json holds: method, model, config, counts and every Rewrite record."""
    from graphpeft import __version__

    trainable, total = peft_model.get_nb_trainable_parameters()
    module_records = [r for r in peft_model.records if r.kind == "module"]
    return {
        "graphpeft_version": __version__,
        "command": command,
        "method": method.name,
        "model": model_name,
        "model_class": type(model).__name__,
        "config": config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config),
        "counts": {
            "candidate_sites": n_candidates,
            "rewritten_sites": len(peft_model.records) - len(module_records),
            "modules_to_save": len(module_records),
            "trainable_params": trainable,
            "all_params": total,
        },
        "records": [r.to_json() for r in peft_model.records],
    }


