"""What a training run shows and keeps as it goes: a progress line and CSV logs that resume."""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["CSVLog", "Progress"]


class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal, silent otherwise)."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.total, self.start = total, start
        self.enabled = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.last = 0.0

    def update(self, step: int, note: str = "") -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last < 0.2 and step < self.total:
            return
        self.last = now
        done = step / max(self.total, 1)
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        bar = "#" * int(30 * done) + "." * (30 - int(30 * done))
        sys.stderr.write(f"\r[{bar}] {step}/{self.total} {rate:.1f} it/s eta {eta:.0f}s {note}\x1b[K")
        sys.stderr.flush()

    def message(self, text: str) -> None:
        """Print a line above the bar (the bar is redrawn at the next update)."""
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.last = 0.0
        print(text)

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


class CSVLog:
    """Rows appended to a CSV file, flushed at each row; a resumed run keeps only the rows up to
    its checkpoint's step (``keep_until``) and appends from there."""

    def __init__(self, path: Path, keep_until: int | None) -> None:
        self.path = path
        self.fieldnames: list[str] | None = None
        kept: list[dict[str, str]] = []
        if keep_until is not None and path.is_file():
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                self.fieldnames = list(reader.fieldnames or []) or None
                kept = [r for r in reader if float(r["step"]) <= keep_until]
        self.file = path.open("w", newline="")
        self.writer: csv.DictWriter | None = None
        if self.fieldnames:
            self._start(self.fieldnames)
            for r in kept:
                self.writer.writerow(r)
            self.file.flush()

    def _start(self, fieldnames: list[str]) -> None:
        self.fieldnames = fieldnames
        self.writer = csv.DictWriter(self.file, fieldnames=fieldnames, extrasaction="ignore")
        self.writer.writeheader()

    def write(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            self._start(list(row))
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        self.file.close()
