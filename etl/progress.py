"""What a run shows while it works: live bars on a terminal, nothing under cron or with JSON logs.

The one-line-per-resource summary is printed by the CLI at the end in both
cases; this module only draws the live display.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import TaskID


class ProgressDisplay(Protocol):
    def start(self, resources: list[str]) -> None: ...
    def add_total(self, resource: str, records: int) -> None: ...
    def advance(self, resource: str, records: int) -> None: ...
    def stop(self) -> None: ...


class NoProgress:
    """Not on a terminal: stay quiet."""

    def start(self, resources: list[str]) -> None:
        pass

    def add_total(self, resource: str, records: int) -> None:
        pass

    def advance(self, resource: str, records: int) -> None:
        pass

    def stop(self) -> None:
        pass


class LiveProgress:
    """A rich bar per resource: records, records/s, and an ETA once the API has said how many there are.

    rich is imported here, not at the top: a run under cron never draws, and need not load it.
    """

    def __init__(self, console: Console | None = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description:<16}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>9} rec/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        self._tasks: dict[str, TaskID] = {}
        self._totals: dict[str, int] = {}

    def start(self, resources: list[str]) -> None:
        for name in resources:
            self._tasks[name] = self._progress.add_task(name, total=None, rate="-")
        self._progress.start()

    def add_total(self, resource: str, records: int) -> None:
        self._totals[resource] = self._totals.get(resource, 0) + records
        self._progress.update(self._tasks[resource], total=self._totals[resource])

    def advance(self, resource: str, records: int) -> None:
        task_id = self._tasks[resource]
        self._progress.advance(task_id, records)
        task = self._progress.tasks[task_id]
        speed = task.speed
        self._progress.update(task_id, rate=f"{speed:,.0f}" if speed else "-")

    def stop(self) -> None:
        self._progress.stop()


def progress_for_terminal(log_format: str) -> ProgressDisplay:
    """Bars only on a terminal with text logs: with JSON logs every stderr line must be one JSON object."""
    return LiveProgress() if log_format == "text" and sys.stderr.isatty() else NoProgress()
