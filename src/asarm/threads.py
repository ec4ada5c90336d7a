"""How many CPU threads torch uses, for the command line and the Python API alike.

One thread measured fastest for the shipped models, idle or with other jobs on the cores (docs/
performance.md, "Threads and start-up"), while torch starts with one thread per physical core.
The ``asarm`` command applies ``--threads`` / ``ASARM_NUM_THREADS`` / 1 before it loads a model;
the Python API applies the same default once, at the first ``load_model``, unless the user chose:
``ASARM_NUM_THREADS`` (used), ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` (torch follows them), or a
``torch.set_num_threads`` call (seen as a thread count other than torch's default).

Nothing here imports torch at module level.
"""

from __future__ import annotations

import os

from .errors import InputError

# Default CPU threads for commands that run a model. One thread measured best for the shipped
# 7 M-parameter models on a 2-core machine, idle and with the other core busy: the per-pass
# matrices are too small for a second thread to pay off, and a busy core makes torch's extra
# threads wait on each other (results/threads-cpu/, scripts/threads_bench.py).
DEFAULT_THREADS = 1
THREADS_ENV = "ASARM_NUM_THREADS"

_chosen = False  # threads were decided in this process (by the CLI, or by the first load_model)


def mark_chosen() -> None:
    """The command line applied its --threads: load_model leaves torch alone."""
    global _chosen
    _chosen = True


def torch_default_threads() -> int:
    """The thread count torch starts with when no environment variable sets one: the physical
    cores (c10's defaultNumThreads), read from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            cores, physical = set(), "0"
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "physical id":
                    physical = value.strip()
                elif key.strip() == "core id":
                    cores.add((physical, value.strip()))
        if cores:
            return len(cores)
    except OSError:
        pass
    return os.cpu_count() or 1


def apply_library_default() -> int | None:
    """At the first model load of a Python program: ``ASARM_NUM_THREADS`` if set, else one
    thread unless the user set torch's threads (environment or ``torch.set_num_threads``).
    Returns the number set, or None when torch was left as it was."""
    global _chosen
    if _chosen:
        return None
    _chosen = True
    import torch

    if os.environ.get("ASARM_NUM_THREADS", "").strip():
        threads = resolve_threads(None)
    elif any(os.environ.get(v, "").strip() for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")):
        return None
    elif torch.get_num_threads() != torch_default_threads():
        return None  # the program called torch.set_num_threads itself
    else:
        threads = DEFAULT_THREADS
    torch.set_num_threads(threads)
    return threads


MAX_THREADS = 1024  # torch crashed (segfault) when asked for 100,000 threads


def resolve_threads(requested: int | None) -> int | None:
    """Threads to use: --threads, else $ASARM_NUM_THREADS, else None when the user set
    OMP_NUM_THREADS (torch already follows it), else DEFAULT_THREADS."""
    if requested is not None:
        if not 1 <= requested <= MAX_THREADS:
            raise InputError(f"--threads must be from 1 to {MAX_THREADS}, got {requested}")
        return requested
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            value = 0
        if not 1 <= value <= MAX_THREADS:
            raise InputError(f"{THREADS_ENV} must be an integer from 1 to {MAX_THREADS}, got {env!r}")
        return value
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return None
    return DEFAULT_THREADS


def apply_threads(requested: int | None) -> int | None:
    """Set torch's intra-op threads (see ``resolve_threads``); returns the number set, or None."""
    threads = resolve_threads(requested)
    mark_chosen()  # the Python API's default (at load_model) must not override the command's choice
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return threads
