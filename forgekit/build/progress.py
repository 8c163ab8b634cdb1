"""Progress for long steps: a rich bar on a terminal, one line per step otherwise.

    with StepProgress("model-00001-of-00004.safetensors", total_bytes) as p:
        ... p.advance(n) ...
        p.summary = "123 tensors, 1.2 GiB -> 0.3 GiB, 2 workers"

On a TTY the bar shows bytes consumed, speed and time left, and is replaced by the
summary line when the step ends; when stdout is not a TTY (CI logs, doit captured
output) only the summary line is printed, once per step.
"""

from __future__ import annotations

import sys
import time


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


class StepProgress:
    def __init__(self, label: str, total: int, verb: str = "built", stream=None):
        self.label, self.total, self.verb = label, max(int(total), 0), verb
        self.stream = stream or sys.stdout
        self.summary = ""
        self._rich = None
        self._task = None
        self.start = time.time()

    def _isatty(self) -> bool:
        try:
            return bool(self.stream.isatty())
        except (AttributeError, ValueError):
            return False

    def __enter__(self) -> "StepProgress":
        self.start = time.time()
        if self._isatty() and self.total > 0:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self._rich = Progress(TextColumn("  {task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                                  TransferSpeedColumn(), TimeRemainingColumn(),
                                  console=Console(file=self.stream), transient=True)
            self._rich.start()
            self._task = self._rich.add_task(self.label, total=self.total)
        return self

    def advance(self, n: int) -> None:
        if self._rich is not None:
            self._rich.advance(self._task, n)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._rich is not None:
            self._rich.stop()
        if exc_type is None:
            seconds = time.time() - self.start
            detail = f": {self.summary}" if self.summary else ""
            print(f"  {self.verb} {self.label}{detail} in {seconds:.1f}s", file=self.stream, flush=True)
