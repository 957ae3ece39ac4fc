"""Progress callbacks in the fsspec style: set_size, relative_update, set_description, close.

`Callback` does nothing (the default everywhere); `progress_callback()` gives a tqdm bar where tqdm is
installed (`pip install 'tiercache-gpu[progress]'`) and a one-line stderr printer where it is not.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO


class Callback:
    """Counts steps and shows nothing; subclasses override `_show` and `close`."""

    def __init__(self, size: int | None = None, description: str = "") -> None:
        self.size, self.value, self.description = size, 0, description

    def set_size(self, size: int) -> None:
        self.size = size
        self._show()

    def relative_update(self, inc: int = 1) -> None:
        self.value += inc
        self._show()

    def set_description(self, text: str) -> None:
        self.description = text
        self._show()

    def _show(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> Callback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StderrCallback(Callback):
    """Rewrites one line with a carriage return; ends it on close."""

    def __init__(self, size: int | None = None, description: str = "", stream: TextIO | None = None) -> None:
        self._stream, self._width = stream or sys.stderr, 0
        super().__init__(size, description)

    def _show(self) -> None:
        total = f"/{self.size}" if self.size is not None else ""
        line = f"{self.description} [{self.value}{total}]".strip()
        self._stream.write("\r" + line.ljust(self._width))  # pad over a longer previous line
        self._stream.flush()
        self._width = len(line)

    def close(self) -> None:
        if self._width:
            self._stream.write("\n")
            self._width = 0


class TqdmCallback(Callback):
    """A tqdm bar, made (and tqdm imported) at construction, not at module import."""

    def __init__(self, size: int | None = None, description: str = "", **tqdm_kwargs: Any) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=size, desc=description, **tqdm_kwargs)
        super().__init__(size, description)

    def _show(self) -> None:
        self._bar.total = self.size
        self._bar.set_description_str(self.description, refresh=False)
        self._bar.n = self.value
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def progress_callback(size: int | None = None, description: str = "", *, enabled: bool | None = None) -> Callback:
    """A bar where stderr is a terminal (or `enabled=True`), a silent `Callback` otherwise."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return Callback(size, description)
    try:
        return TqdmCallback(size, description)
    except ImportError:
        return StderrCallback(size, description)
