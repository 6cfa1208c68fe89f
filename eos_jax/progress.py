"""A one-line terminal progress bar: step, loss and sharpness, redrawn between chunks.

On a terminal the line is redrawn in place with ``\\r``; on a pipe or file it prints a
plain line at most every ``min_interval`` seconds, so logs of scripted runs stay short.
``enabled=False`` (the ``--quiet`` flag) prints nothing.

Kept instead of ``tqdm`` or ``rich``:
neither is a dependency; ``tqdm`` would replace about 60 lines, but on a pipe or file it still
writes ``\r`` redraws into the log (ours writes one plain line per ``min_interval``), and the
bar's fields (loss, sharpness) would come back as a formatted postfix anyway.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return f"{value:.4g}"


class ProgressBar:
    """Progress over ``total`` steps.

    Args:
      total: number of steps of the whole run.
      enabled: draw anything at all.
      stream: where to draw (default ``sys.stderr``).
      width: characters of the bar itself.
      min_interval: seconds between two plain lines when ``stream`` is not a terminal.
      label: text written before the bar.

    Examples:
      >>> import io
      >>> from eos_jax.progress import ProgressBar
      >>> out = io.StringIO()  # not a terminal: plain lines, at most one per min_interval
      >>> bar = ProgressBar(10, stream=out, width=10)
      >>> bar.update(5, loss=0.25)
      >>> bar.message("sharpness tracked every 5 steps")
      >>> bar.update(10, loss=0.125, sharpness=float("nan"))  # the last step always prints
      >>> bar.close()
      >>> print(out.getvalue(), end="")  # doctest: +ELLIPSIS
      [#####.....] step 5/10  loss 0.25  sharpness -  ...s
      sharpness tracked every 5 steps
      [##########] step 10/10  loss 0.125  sharpness nan  ...s
    """

    def __init__(
        self,
        total: int,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        width: int = 24,
        min_interval: float = 5.0,
        label: str = "",
    ):
        self.total = max(int(total), 1)
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.min_interval = min_interval
        self.label = label
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_print = -math.inf
        self._start = time.monotonic()
        self._drawn = False

    def line(self, step: int, loss: float | None = None, sharpness: float | None = None, extra: str = "") -> str:
        """The text of the bar for ``step`` (no newline)."""
        frac = min(max(step / self.total, 0.0), 1.0)
        filled = int(round(frac * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.monotonic() - self._start
        parts = [f"{self.label}[{bar}] step {step}/{self.total}", f"loss {_fmt(loss)}", f"sharpness {_fmt(sharpness)}"]
        if extra:
            parts.append(extra)
        parts.append(f"{elapsed:.0f}s")
        return "  ".join(parts)

    def update(self, step: int, loss: float | None = None, sharpness: float | None = None, extra: str = "") -> None:
        """Redraws the bar (rate-limited when not on a terminal)."""
        if not self.enabled:
            return
        now = time.monotonic()
        text = self.line(step, loss, sharpness, extra)
        if self._tty:
            self.stream.write("\r\x1b[2K" + text)
            self._drawn = True
        elif now - self._last_print >= self.min_interval or step >= self.total:
            self.stream.write(text + "\n")
            self._last_print = now
        else:
            return
        self.stream.flush()

    def message(self, text: str) -> None:
        """Prints a line of text above the bar (always, unless disabled)."""
        if not self.enabled:
            return
        if self._tty and self._drawn:
            self.stream.write("\r\x1b[2K")
            self._drawn = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Ends the bar's line on a terminal."""
        if self.enabled and self._tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
