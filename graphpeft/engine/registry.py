"""Method registry: method name / config type -> pass, and rule name -> rule.

The engine reaches rules only through this table, never by importing one. Rules register themselves
when ``graphpeft.passes`` is imported, which the package ``graphpeft`` does first of all (importing
any ``graphpeft.*`` module imports the package, so the table is full before anyone reads it).
"""

from __future__ import annotations

from dataclasses import dataclass

from graphpeft.engine.errors import GraphPeftError


@dataclass(frozen=True)
class Method:
    name: str            # CLI name, e.g. "lora"
    config_cls: type     # the dataclass config
    pass_cls: type       # PassBase subclass; built as pass_cls(config, adapter_name=...)
    summary: str


_METHODS: dict[str, Method] = {}
_RULES: dict[str, type] = {}


def register_method(name: str, config_cls: type, pass_cls: type, summary: str = "") -> None:
    _METHODS[name] = Method(name, config_cls, pass_cls, summary)


def register_rule(rule_cls: type) -> type:
    """Class decorator: makes a rule findable by the name stored in its Rewrite records."""
    _RULES[rule_cls.name] = rule_cls
    return rule_cls


def methods() -> dict[str, Method]:
    return dict(_METHODS)


def method(name: str) -> Method:
    key = name.lower().replace("-", "_")
    if key not in _METHODS:
        raise GraphPeftError(f"unknown method {name!r}; choose one of: {', '.join(sorted(_METHODS))}")
    return _METHODS[key]


def method_for_config(config: object) -> Method:
    for m in _METHODS.values():
        if type(config) is m.config_cls:
            return m
    raise GraphPeftError(f"{type(config).__name__} is not a graphpeft config; use one of "
                         f"{', '.join(m.config_cls.__name__ for m in _METHODS.values())}")


def method_for_peft_type(peft_type: str) -> Method:
    for m in _METHODS.values():
        if m.config_cls.peft_type == str(peft_type).upper():
            return m
    raise GraphPeftError(f"adapter_config.json has peft_type {peft_type!r}, which graphpeft does not support; "
                         f"supported: {', '.join(sorted(m.config_cls.peft_type for m in _METHODS.values()))}")


def rule(name: str) -> type:
    if name not in _RULES:
        raise GraphPeftError(f"no rule named {name!r} is registered")
    return _RULES[name]
