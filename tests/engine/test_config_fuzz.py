"""Fuzzing every method's config: any value either builds a config or is refused with one line.

hypothesis draws field values of every kind (numbers, strings, lists, dicts, None, booleans) for a
random subset of a config's fields, through the constructor and through ``from_dict`` (the path an
adapter_config.json takes); the only exception allowed is a one-line GraphPeftError.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphpeft.engine import registry
from graphpeft.engine.errors import GraphPeftError

METHODS = sorted(registry.methods())

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-5, max_value=5000),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["all-linear", ".*proj", "q_proj", "RANDOM", "TEXT", "MLP", "LSTM", "SEQ_CLS", "CAUSAL_LM",
                     "gaussian", "none", "SAMPLE_VOCAB", "EXACT_SOURCE_TASK"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)


def _fields(method: str) -> list[str]:
    return [f.name for f in dataclasses.fields(registry.method(method).config_cls)]


def _one_line_or_config(build) -> None:
    try:
        build()
    except GraphPeftError as exc:
        message = str(exc)
        assert message and "\n" not in message, f"not one line: {message!r}"


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_field_values_build_a_config_or_one_line_error(method, data):
    config_cls = registry.method(method).config_cls
    names = data.draw(st.lists(st.sampled_from(_fields(method)), max_size=4, unique=True))
    kwargs = {name: data.draw(values, label=name) for name in names}
    _one_line_or_config(lambda: config_cls(**kwargs))


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_adapter_config_json_loads_or_one_line_error(method, data):
    config_cls = registry.method(method).config_cls
    try:                                          # a default config's dict, as adapter_config.json holds it
        saved = config_cls(**({"num_virtual_tokens": 4} if "num_virtual_tokens" in _fields(method) else {}),
                           **({"total_step": 100} if "total_step" in _fields(method) else {})).to_dict()
    except GraphPeftError:
        pytest.skip(f"{method}: no default config to start from")
    keys = data.draw(st.lists(st.sampled_from(sorted(saved) + ["unknown_field", "peft_type"]), max_size=3, unique=True))
    for key in keys:
        saved[key] = data.draw(values, label=key)
    _one_line_or_config(lambda: config_cls.from_dict(saved))
