"""How many intra-op threads torch uses on the CPU: chosen from the cores this process can really use.

torch starts one thread per core the machine has. On a machine shared with other jobs, or under ``--procs N``, those
threads wait for each other on every small op: measured on a 2-core machine at load average 11, the digits demo net
trained at 413 ms per iteration with 2 threads and 72 ms with 1, and spent 6x the CPU time. The choice, in order:

1. ``--threads N`` on the command line (every ``slim`` command that runs torch takes it);
2. the environment variable ``SLIM_THREADS=N``;
3. ``OMP_NUM_THREADS``, when set, is left as torch reads it;
4. otherwise the cores available to the process (its CPU affinity, capped by a cgroup CPU quota), divided among the
   ``--procs`` processes, and no more than the cores other work leaves idle (cores minus the 1-minute load
   average, rounded up, at least 1).

``slim`` applies the choice before a command runs and prints it for the commands that train or time nets. From
Python: ``use_threads(choose_threads())``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Mapping, Optional, Tuple

from slim.errors import SlimError

__all__ = ["ThreadChoice", "available_cores", "choose_threads", "use_threads", "ENV"]

ENV = "SLIM_THREADS"


@dataclasses.dataclass(frozen=True)
class ThreadChoice:
    """A thread count and why it was chosen (for the log)."""

    threads: int
    reason: str

    def __str__(self) -> str:
        return f"{self.threads} torch thread{'s' if self.threads != 1 else ''} ({self.reason})"


def _cgroup_quota() -> Optional[float]:
    """CPUs allowed by the cgroup's CFS quota (v2 cpu.max or v1 cfs_quota_us / cfs_period_us), None if unlimited."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period = int(f.read())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cores() -> Tuple[int, str]:
    """(cores this process may use, how that was found): its CPU affinity, capped by a cgroup quota."""
    try:
        cores, how = len(os.sched_getaffinity(0)), "CPU affinity"
    except (AttributeError, OSError):
        cores, how = os.cpu_count() or 1, "cores"
    quota = _cgroup_quota()
    if quota is not None and math.ceil(quota) < cores:
        cores, how = max(1, math.ceil(quota)), f"cgroup CPU quota {quota:g}"
    return cores, how


def _positive(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise SlimError(f"{what} must be a positive number of threads, found {text!r}.")
    return value


def choose_threads(requested: Optional[int] = None, procs: int = 1, *, environ: Optional[Mapping[str, str]] = None,
                   cores: Optional[Tuple[int, str]] = None, load: Optional[float] = None) -> ThreadChoice:
    """The intra-op thread count for one of ``procs`` processes (see the module docstring for the order).

    Args:
        requested: ``--threads`` (None when not given).
        procs: processes sharing the cores (``--procs``).
        environ, cores, load: the environment, ``available_cores()`` and the 1-minute load average (defaults: this
            machine's), for tests.

    Raises:
        SlimError: ``--threads`` or SLIM_THREADS is not a positive integer.
    """
    environ = os.environ if environ is None else environ
    if requested is not None:
        return ThreadChoice(_positive(str(requested), "--threads"), "--threads")
    if environ.get(ENV):
        return ThreadChoice(_positive(environ[ENV], ENV), f"{ENV}={environ[ENV]}")
    if environ.get("OMP_NUM_THREADS"):
        return ThreadChoice(_positive(environ["OMP_NUM_THREADS"], "OMP_NUM_THREADS"),
                            f"OMP_NUM_THREADS={environ['OMP_NUM_THREADS']}")
    count, how = cores if cores is not None else available_cores()
    procs = max(1, procs)
    share = max(1, count // procs)
    reason = f"{count} cores by {how}" + (f" / {procs} processes" if procs > 1 else "")
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    idle = math.ceil(count - load)   # a core partly idle counts: a light background load costs no thread
    if idle < share:
        share = max(1, idle)
        reason += f", load average {load:.1f}: busy"
    return ThreadChoice(share, reason + f"; --threads N or {ENV}=N to override")


def use_threads(choice: ThreadChoice) -> ThreadChoice:
    """Apply ``choice``: torch's intra-op threads if torch is loaded; otherwise OMP_NUM_THREADS, which torch reads
    when it is first imported (so a command that never needs torch does not load it) and spawned training processes
    inherit. Returns ``choice``."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(choice.threads)
    else:
        os.environ["OMP_NUM_THREADS"] = str(choice.threads)
    return choice
