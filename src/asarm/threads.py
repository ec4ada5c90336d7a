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

    from .cli_args import DEFAULT_THREADS, resolve_threads

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
