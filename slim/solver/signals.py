"""SIGINT and SIGHUP during training, as Caffe's ``--sigint_effect`` / ``--sighup_effect``.

A signal does not interrupt anything: its handler records a request (:meth:`Solver.request`), and the solver acts
on it at the end of the current iteration, after the update: ``snapshot`` writes a snapshot and goes on,
``stop`` ends training (Caffe then still writes the final snapshot when ``snapshot_after_train`` is set),
``none`` ignores the signal. With several processes the request travels with the gradients, so every process
acts in the same iteration. Defaults are Caffe's: SIGINT stops, SIGHUP snapshots.
"""

from __future__ import annotations

import contextlib
import enum
import signal
import threading
from typing import Iterator

from slim.errors import SolverError

__all__ = ["Action", "parse_action", "handle_signals"]


class Action(enum.Enum):
    """What a signal asks of the solver (Caffe's SolverAction)."""

    NONE = "none"
    STOP = "stop"
    SNAPSHOT = "snapshot"


def parse_action(text: str, flag: str) -> Action:
    """``stop`` / ``snapshot`` / ``none`` as an :class:`Action`.

    Raises:
        SolverError: another word.
    """
    try:
        return Action(text)
    except ValueError:
        raise SolverError(f"{flag} must be stop, snapshot or none, found \"{text}\".") from None


@contextlib.contextmanager
def handle_signals(solver, sigint: Action | str = Action.STOP,
                   sighup: Action | str = Action.SNAPSHOT) -> Iterator[None]:
    """Route SIGINT and SIGHUP to ``solver.request`` for the duration of the block; the old handlers return after.

    Only the main thread may install signal handlers; elsewhere this does nothing.

    Args:
        solver: anything with ``request(Action)``.
        sigint: the effect of SIGINT (Ctrl-C).
        sighup: the effect of SIGHUP (the terminal closed).
    """
    effects = {signal.SIGINT: Action(sigint), signal.SIGHUP: Action(sighup)}
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        solver.request(effects[signum])

    previous = {}
    try:
        for s, effect in effects.items():
            previous[s] = signal.signal(s, handler if effect is not Action.NONE else signal.SIG_IGN)
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
