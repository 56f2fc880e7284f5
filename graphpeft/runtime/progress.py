"""Progress on the terminal (rich), on stderr only, and only when stderr is a terminal.

    with spinner("capturing the graph"):          # an indeterminate spinner while a step runs
        ...
    with bar(total=len(loader), description="epoch 1/3") as advance:
        advance(loss="0.6931", budget="11/16")    # one step done; the fields are shown beside the bar
    with silenced():                              # no bars at all (the command line's --json)
        ...

Nothing is drawn when stderr is not a terminal (pipes, CI, pytest) or inside ``silenced()``, so
stdout carries only what a command prints, and machine-readable output stays clean.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator

_SILENCED = [0]


def enabled() -> bool:
    """Whether progress is drawn: stderr is a terminal and no ``silenced()`` block is active."""
    return not _SILENCED[0] and bool(getattr(sys.stderr, "isatty", lambda: False)())


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    _SILENCED[0] += 1
    try:
        yield
    finally:
        _SILENCED[0] -= 1


def _console() -> Any:
    from rich.console import Console

    return Console(file=sys.stderr)


@contextlib.contextmanager
def spinner(description: str) -> Iterator[None]:
    """A spinner with ``description`` and the elapsed time while the block runs (nothing if not enabled)."""
    if not enabled():
        yield
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=_console(), transient=True) as progress:
        progress.add_task(description, total=None)
        yield


@contextlib.contextmanager
def bar(total: int | None, description: str, show: bool = True) -> Iterator[Callable[..., None]]:
    """A bar of ``total`` steps; ``advance(**fields)`` marks one step done and shows ``key=value`` fields."""
    if not (show and enabled()):
        yield lambda **fields: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=_console(),
                  transient=True) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(**fields: Any) -> None:
            status = " ".join(f"{k}={v}" for k, v in fields.items())
            progress.update(task, advance=1, status=status)

        yield advance
