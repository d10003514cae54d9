"""How much memory one allocation may take, so that a hostile or mistaken input is refused with a figure.

A 100 GB blob declared by a small sparse file, a pickle declaring a 2^40-byte string or a prototxt asking for
num_output: 1000000000 would otherwise end in a raw MemoryError, in ``OSError: Cannot allocate memory``, or (with
the kernel's overcommit) in an out-of-memory kill long after the allocation "succeeded". Readers and builders
call :func:`check_allocation` with the size they are about to allocate, before allocating it.

The bound is the smallest of the machine's physical memory and the process's own limits on its address space
and data segment (``ulimit -v``, ``ulimit -d``). It is a ceiling on what can possibly work, not a prediction
that what fits under it will: it refuses the impossible, never a request that merely competes with other
programs for memory.
"""

from __future__ import annotations

import os

from slim.errors import ResourceError

__all__ = ["memory_limit", "check_allocation", "format_bytes"]


def memory_limit() -> int:
    """The most bytes one allocation of this process could ever get: physical memory, ``ulimit -v`` and
    ``ulimit -d``, whichever is smallest (a very large number where none of them can be read)."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        pass  # not a POSIX system: no figure
    try:
        import resource
    except ImportError:  # Windows
        resource = None
    if resource is not None:
        for which in ("RLIMIT_AS", "RLIMIT_DATA"):
            soft, _ = resource.getrlimit(getattr(resource, which))
            if soft != resource.RLIM_INFINITY and soft > 0:
                limits.append(soft)
    return min(limits) if limits else 1 << 62


def format_bytes(count: int) -> str:
    """``count`` bytes in the largest binary unit that keeps the figure at least 1 ("2.4 TiB", "512 B")."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def check_allocation(nbytes: int, what: str, fix: str) -> None:
    """Refuse to allocate ``nbytes`` when it exceeds :func:`memory_limit`.

    Args:
        nbytes: the size about to be allocated.
        what: the start of the message, naming the file, layer or blob ("layer 'fc6' of net.prototxt needs").
        fix: a sentence saying how to fix it.

    Raises:
        ResourceError: naming ``what``, the size and the limit.
    """
    limit = memory_limit()
    if nbytes > limit:
        raise ResourceError(f"{what} {format_bytes(nbytes)} ({nbytes:,} bytes), more than this process can ever "
                            f"allocate ({format_bytes(limit)}: the smallest of physical memory, ulimit -v and "
                            f"ulimit -d). {fix}")
