"""What training prints: Caffe's log lines, a metrics file and a progress bar.

Log lines are Caffe's, word for word where a parser reads them, so tools written for Caffe logs (BVLC's
``tools/extra/parse_log.py`` and its many copies) read slim's too::

    I1120 10:22:33.123456  4242 solver.py:301] Solving DemoDigits
    I1120 10:22:33.523456  4242 solver.py:350] Iteration 100 (41.2 iter/s, 2.43s/100 iters), loss = 0.3412
    I1120 10:22:33.523456  4242 solver.py:355]     Train net output #0: loss = 0.3412 (* 1 = 0.3412 loss)
    I1120 10:22:33.523456  4242 solver.py:420] Iteration 100, lr = 0.1
    I1120 10:22:34.123456  4242 solver.py:380] Iteration 200, Testing net (#0)
    I1120 10:22:34.223456  4242 solver.py:390]     Test net output #0: accuracy = 0.95

The prefix is glog's (severity letter, MMDD, time, process id, file:line), which parse_log.py needs to time the
iterations; values print with 6 significant digits, as C++ streams do. :func:`setup_logging` installs it for
the ``slim`` loggers; the solver itself only calls ``logging``.

The metrics file gets one JSON object per display and per test (see :class:`MetricsFile`); the progress bar
(:class:`ProgressBar`) is drawn only when the output is a terminal, below the log lines.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import IO, Optional

__all__ = ["fmt", "GlogFormatter", "setup_logging", "reset_logging", "MetricsFile", "ProgressBar"]


def fmt(value: float) -> str:
    """A number as C++'s ``ostream << float`` prints it: 6 significant digits, no trailing zeros."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return f"{value:.6g}"


class GlogFormatter(logging.Formatter):
    """glog's line prefix: ``I1120 10:22:33.123456  4242 file.py:123] message``."""

    def format(self, record: logging.LogRecord) -> str:
        t = time.localtime(record.created)
        micros = int((record.created % 1) * 1e6)
        prefix = (f"{record.levelname[:1]}{t.tm_mon:02d}{t.tm_mday:02d} {t.tm_hour:02d}:{t.tm_min:02d}:"
                  f"{t.tm_sec:02d}.{micros:06d} {record.process:5d} {record.filename}:{record.lineno}] ")
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return "\n".join(prefix + line for line in text.splitlines() or [""])


class _BarAwareHandler(logging.StreamHandler):
    """A stream handler that lifts the progress bar off the last line before writing and redraws it after."""

    def __init__(self, stream):
        super().__init__(stream)
        self.bar: Optional[ProgressBar] = None

    def emit(self, record: logging.LogRecord) -> None:
        bar = self.bar
        if bar is not None and bar.visible:
            bar.clear()
            super().emit(record)
            bar.redraw()
        else:
            super().emit(record)


def setup_logging(rank: int = 0, stream: Optional[IO[str]] = None, level: int = logging.INFO,
                  progress: bool = True) -> Optional["ProgressBar"]:
    """Send the ``slim`` loggers' records to ``stream`` (stdout) with glog's prefix.

    Only the root process logs at ``level``; the others log warnings and errors only (Caffe's ``LOG_IF(INFO,
    root_solver())``). Calling it again replaces the handler it installed before.

    Args:
        rank: this process's rank.
        stream: where to write (default sys.stdout).
        level: the root process's level.
        progress: give the root process a progress bar when ``stream`` is a terminal.

    Returns:
        The progress bar to hand to the solver, or None.
    """
    stream = stream if stream is not None else sys.stdout
    reset_logging()
    logger = logging.getLogger("slim")
    handler = _BarAwareHandler(stream)
    handler.setFormatter(GlogFormatter())
    logger.addHandler(handler)
    logger.setLevel(level if rank == 0 else logging.WARNING)
    bar = None
    if progress and rank == 0 and getattr(stream, "isatty", lambda: False)():
        bar = ProgressBar(stream)
        handler.bar = bar
    return bar


def reset_logging() -> None:
    """Remove the handler :func:`setup_logging` installed (the ``slim`` logger's level is left as it is)."""
    logger = logging.getLogger("slim")
    for h in list(logger.handlers):
        if isinstance(h, _BarAwareHandler):
            logger.removeHandler(h)


class MetricsFile:
    """Appends one JSON object per line: what a plot or a dashboard needs, without parsing logs.

    Records (all with ``"iter"`` and ``"time"``, seconds since the epoch)::

        {"kind": "train", "iter": 100, "loss": 0.34, "lr": 0.1, "iter_per_s": 41.2,
         "outputs": {"loss": 0.34}, "gamma": {"count": 352, "below_1e2": 0.1, ...}}
        {"kind": "test", "iter": 200, "net": 0, "outputs": {"accuracy": 0.95, "loss": 0.2}, "loss": 0.2}

    ``outputs`` maps each output blob to its value (a list for blobs of several elements); ``gamma`` appears
    when the solver has channel scaling factors; a test's ``loss`` only with ``test_compute_loss``.

    Args:
        path: the file; its folder must exist.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)

    def write(self, record: dict) -> None:
        """Append ``record`` (plus the time) as one line.

        Raises:
            OutputError: the folder is full, read-only or not writable.
        """
        from slim.io.atomic import open_append, output_error

        line = json.dumps({**record, "time": round(time.time(), 3)}, allow_nan=True)
        with open_append(self.path) as f:  # never through a link planted at the name
            try:
                f.write(line + "\n")
                f.flush()
            except OSError as e:
                raise output_error(e, self.path) from None

    def truncate_from(self, iter: int) -> None:
        """Drop the records of iteration ``iter`` and later: a run resumed at ``iter`` writes them again.

        Lines that are not JSON objects with an ``iter`` are kept as they are.
        """
        from slim.io.atomic import atomic_write, open_regular

        f = open_regular(self.path)
        if f is None:  # absent, or a link, which the next write replaces without reading it
            return
        with f:
            lines = f.readlines()
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
                drop = isinstance(record, dict) and int(record.get("iter", -1)) >= iter
            except (ValueError, TypeError):
                drop = False
            if not drop:
                kept.append(line)
        if len(kept) != len(lines):
            with atomic_write(self.path, "w") as f:
                f.writelines(kept)


class ProgressBar:
    """A one-line progress bar with the iteration, the rate, the smoothed loss and the time left.

    Drawn with a carriage return on a terminal; redrawn at most 10 times a second.
    """

    width = 28

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.visible = False
        self._text = ""
        self._last = 0.0
        self._start: Optional[tuple[float, int]] = None

    def update(self, iter: int, max_iter: int, loss: Optional[float] = None) -> None:
        """Show progress at ``iter`` of ``max_iter``."""
        now = time.monotonic()
        if self._start is None:
            self._start = (now, iter)
        if now - self._last < 0.1 and iter < max_iter:
            return
        self._last = now
        t0, i0 = self._start
        rate = (iter - i0) / (now - t0) if now > t0 and iter > i0 else 0.0
        frac = min(1.0, iter / max_iter) if max_iter else 1.0
        filled = int(frac * self.width)
        left = (max_iter - iter) / rate if rate else math.nan
        eta = "--:--" if not math.isfinite(left) else f"{int(left // 3600):d}:{int(left % 3600 // 60):02d}:" \
                                                       f"{int(left % 60):02d}"
        loss_text = f" loss {fmt(loss)}" if loss is not None else ""
        self._text = (f"[{'#' * filled}{'.' * (self.width - filled)}] {iter}/{max_iter} {rate:.1f} it/s"
                      f"{loss_text} eta {eta}")
        self.redraw()

    def redraw(self) -> None:
        """Draw the bar again on the current (last) line."""
        if self._text:
            self.stream.write("\r\033[K" + self._text)
            self.stream.flush()
            self.visible = True

    def clear(self) -> None:
        """Erase the bar from the current line (before a log line is written there)."""
        if self.visible:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.visible = False

    def close(self) -> None:
        """Leave the last state on its own line."""
        if self.visible:
            self.stream.write("\n")
            self.stream.flush()
            self.visible = False
        self._text = ""
