"""Progress bars for long loops (evaluation, calibration, benchmarks), quiet under CI.

One rule for every bar: shown when stderr is a terminal, hidden when the `CI` environment
variable is set (to anything but "" / "0" / "false") or stderr is redirected (logs, pipes,
pytest's capture), so logs stay free of carriage-return noise.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_enabled() -> bool:
    """False under CI (`CI` set) or when stderr is not a terminal."""
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false"):
        return False
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress(iterable: Iterable[T], description: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """`iterable`, wrapped in a tqdm bar labelled `description` when `progress_enabled()`."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return iter(tqdm(iterable, desc=description, total=total, unit=unit, disable=not progress_enabled(), leave=False))
