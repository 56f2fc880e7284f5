"""Building blocks of the command line's click parameters: checked value types, the command class whose
help has Arguments and method-option sections, and small makers for options and flags."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import click

from graphpeft.engine import registry

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


# -- option values ------------------------------------------------------------------------------------

def _parser(cast: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """A converter: ``cast(text)`` that must satisfy ``ok``, else ValueError("expected <expected>, got ...")."""
    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise ValueError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise ValueError(f"expected {expected}, got {text!r}")
        return value
    return parse


_int = _parser(int, lambda v: True, "an integer")
_positive_int = _parser(int, lambda v: v > 0, "a positive integer")
_positive_float = _parser(float, lambda v: v > 0, "a positive number")
_non_negative_float = _parser(float, lambda v: v >= 0, "a number >= 0")


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


def _opt(*decls: str, **kwargs: Any) -> click.Option:
    return click.Option(list(decls), **kwargs)


def _flag(*decls: str, help: str) -> click.Option:
    return click.Option(list(decls), is_flag=True, default=False, help=help)


def _json_option() -> click.Option:
    return _flag("--json", "json", help="print the result as one JSON object on stdout, and nothing else there "
                                        "(no progress bars)")
