"""Run untrusted generated Python programs in a sandbox; see ``sandbox_child.py`` for the layers.

Each program runs under a trusted wrapper process (``python -I sandbox_child.py``) in fresh
temporary directory. The harness side (this file):
- creates the run's cgroups where the machine lets us (memory limit and process limit for the
  whole tree, and a reliable way to kill it),
- sends the program's output to files, never pipes: a descendant holding them open cannot block
  the harness, and the wall-clock timeout is a plain ``wait(timeout)``,
- on timeout kills the wrapper's process group and the cgroups; the rest of the tree dies with
  the wrapper (PID namespace, or parent-death signals and no fork when there is none),
- takes the verdict from the wrapper's exit status: the program never holds anything that can
  set it, and prints no marker it could copy.
Layers the machine cannot provide (namespaces, cgroups, Landlock) are skipped, and each result
lists the layers that were active (``ExecResult.layers``); ``sandbox_layers()`` probes them once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from . import sandbox_child as child

WRAPPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
KILL_SLACK = 5.0  # seconds the harness waits for a killed tree before giving up on it


@dataclasses.dataclass
class ExecResult:
    status: str  # "passed" | "failed" | "timeout" | "error" (the sandbox could not run it: says nothing of the program)
    detail: str  # last lines of the program's error output (or why it was stopped)
    elapsed: float
    layers: tuple[str, ...] = ()  # sandbox layers that were active for this run

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _clean_env(home: str) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, "LANG": "C.UTF-8",
           "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "TMPDIR": home}
    return env  # no *_proxy variables, no tokens, nothing of the caller's environment


def run_program(source: str, *, timeout: float = 10.0, memory_mb: int = 1024, cpu_seconds: int | None = None,
                max_file_mb: int = 16, python: str | None = None, isolate_network: bool = True,
                namespaces: bool = True, cgroups: bool = True, max_processes: int = 8) -> ExecResult:
    """Run ``source`` as a Python program in the sandbox; see the module docstring.
    ``namespaces``/``cgroups`` = False skip those layers (to test the fallbacks)."""
    cpu = int(cpu_seconds if cpu_seconds is not None else max(1, int(timeout) + 1))
    start = time.perf_counter()
    work = tempfile.mkdtemp(prefix="asarm-exec-")
    out = tempfile.mkdtemp(prefix="asarm-out-")
    groups = _make_cgroups(memory_mb * 2**20, max_processes) if cgroups else []
    uid = 1_000_000 + secrets.randbelow(1_000_000)  # used when root (see sandbox_child.sandbox_uid)
    try:
        with open(os.path.join(work, "program.py"), "w", encoding="utf-8") as f:
            f.write(source)
        cfg = {"work": work, "memory": memory_mb * 2**20, "cpu": cpu, "fsize": max_file_mb * 2**20,
               "nproc": max_processes, "namespaces": namespaces, "network": isolate_network,
               "cgroups": groups, "uid": uid}
        code, info, err = _supervise(cfg, python, work, out, timeout)
    finally:
        _remove_cgroups(groups)
        shutil.rmtree(out, ignore_errors=True)
        _remove_tree(work)
    return _result(code, info, err, cpu, timeout, time.perf_counter() - start)


def _supervise(cfg: dict, python: str | None, work: str, out: str, timeout: float):
    """Start the wrapper, wait at most ``timeout``, kill the tree. Returns (exit code or None on
    timeout, info lines, the program's error output)."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    cfg["info_fd"] = write_fd
    stdout = open(os.path.join(out, "stdout"), "wb")
    stderr = open(os.path.join(out, "stderr"), "w+b")
    try:
        try:
            proc = subprocess.Popen([python or sys.executable, "-I", WRAPPER, json.dumps(cfg)], cwd=work,
                                    env=_clean_env(work), stdin=subprocess.DEVNULL, stdout=stdout,
                                    stderr=stderr, pass_fds=(write_fd,), start_new_session=True)
        except OSError as exc:
            return -1, [], f"could not start the interpreter: {exc}"
        finally:
            os.close(write_fd)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        _kill_tree(proc, cfg["cgroups"])
        info = _read_info(read_fd)
        for key in ("init", "program"):
            _wait_gone(next((line[key] for line in info if key in line), None))
        stderr.seek(0)
        err = stderr.read(1 << 20).decode("utf-8", "replace")
        return code, info, err
    finally:
        os.close(read_fd)
        stdout.close()
        stderr.close()


def _kill_tree(proc: subprocess.Popen, groups: list) -> None:
    """Kill the wrapper's process group and every process of the run's cgroups, then reap."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for kind, path in groups:
        _kill_cgroup(path)
    try:
        proc.wait(timeout=KILL_SLACK)
    except subprocess.TimeoutExpired:
        pass


def _wait_gone(pid: int | None) -> None:
    """Wait until ``pid`` (the namespace's init, or the program when there is no namespace)
    has exited; the kernel kills a namespace's last processes before its init exits."""
    deadline = time.monotonic() + KILL_SLACK
    while pid is not None and time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    return
        except (OSError, IndexError):
            return
        time.sleep(0.002)


def _read_info(fd: int) -> list[dict]:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    lines = []
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return lines


def _result(code, info: list[dict], err: str, cpu: int, timeout: float, elapsed: float) -> ExecResult:
    layers = tuple(next((line["layers"] for line in info if "layers" in line), ()))
    if code is None:
        return ExecResult("timeout", f"wall-clock timeout after {timeout:g}s", elapsed, layers)
    if code == child.PASSED:
        return ExecResult("passed", "", elapsed, layers)
    if code == child.CPU_LIMIT:
        return ExecResult("timeout", f"CPU time limit ({cpu}s) exceeded", elapsed, layers)
    tail = "\n".join(err.strip().splitlines()[-5:])
    if code in (-1, child.SETUP_FAILED):  # the interpreter did not start, or the sandbox failed
        return ExecResult("error", tail or "the sandbox could not be set up", elapsed, layers)
    why = {child.EXITED_EARLY: "program exited before running to its end",
           child.KILLED: "killed by signal {} (memory limit?)".format(
               next((line["signal"] for line in info if "signal" in line), "?")),
           child.BAD_EXIT: "program ended without running to its end"}.get(code, f"exit code {code}")
    return ExecResult("failed", tail or why, elapsed, layers)


def _remove_tree(path: str) -> None:
    """rmtree that also removes what the program made unwritable (chmod 000 directories)."""
    def fix(func, p, exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=fix)
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- cgroups (where writable)

@functools.lru_cache(maxsize=1)
def _cgroup_parents() -> tuple[tuple[str, str], ...]:
    """(kind, directory) of this process's memory and pids cgroups when we may create children
    there: cgroup v1 hierarchies, or a v2 cgroup with both controllers delegated to children."""
    found = {}
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return ()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for kind in ("memory", "pids"):
            if kind in controllers.split(","):
                found[kind] = f"/sys/fs/cgroup/{kind}{path}"
        if controllers == "" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            base = "/sys/fs/cgroup" + path
            try:
                with open(os.path.join(base, "cgroup.subtree_control")) as f:
                    enabled = f.read().split()
            except OSError:
                enabled = []
            for kind in ("memory", "pids"):
                if kind in enabled:
                    found.setdefault(kind, base)
    return tuple((k, d) for k, d in found.items() if os.access(d, os.W_OK))


def _make_cgroups(memory: int, nproc: int) -> list[tuple[str, str]]:
    made = []
    name = "asarm-" + secrets.token_hex(8)
    for kind, parent in _cgroup_parents():
        path = os.path.join(parent, name)
        try:
            os.mkdir(path)
        except OSError:
            continue
        made.append((kind, path))
        settings = {"memory": [("memory.limit_in_bytes", memory), ("memory.memsw.limit_in_bytes", memory),
                               ("memory.max", memory), ("memory.swap.max", 0)],
                    "pids": [("pids.max", nproc)]}[kind]
        ok = False
        for file, value in settings:
            try:
                with open(os.path.join(path, file), "w") as f:
                    f.write(str(value))
                ok = ok or file in ("memory.limit_in_bytes", "memory.max", "pids.max")
            except OSError:
                pass
        if not ok:
            made.pop()
            _rmdir(path)
    return made


def _kill_cgroup(path: str) -> None:
    if os.path.exists(os.path.join(path, "cgroup.kill")):
        try:
            with open(os.path.join(path, "cgroup.kill"), "w") as f:
                f.write("1")
        except OSError:
            pass
    deadline = time.monotonic() + KILL_SLACK
    while time.monotonic() < deadline:
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                pids = [int(x) for x in f.read().split()]
        except OSError:
            return
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.005)


def _remove_cgroups(groups: list) -> None:
    for _, path in groups:
        _kill_cgroup(path)
        _rmdir(path)


def _rmdir(path: str) -> None:
    for _ in range(100):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)  # the last killed processes are still leaving


@functools.lru_cache(maxsize=None)
def sandbox_layers(namespaces: bool = True, cgroups: bool = True) -> frozenset[str]:
    """The layers this machine provides (probed once by running an empty program)."""
    return frozenset(run_program("pass\n", timeout=30, namespaces=namespaces, cgroups=cgroups).layers)


def run_programs(sources: list[str], *, workers: int = 4, **options) -> list[ExecResult]:
    """``run_program`` over many sources with ``workers`` processes at a time, results in order."""
    if not sources:
        return []
    workers = max(1, min(workers, len(sources)))
    if workers == 1:
        return [run_program(s, **options) for s in sources]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, **options), sources))


def humaneval_program(problem: dict, middle: str) -> str:
    """The program that checks one HumanEval-infilling completion: exactly prompt + middle +
    suffix, then the task's tests and ``check(entry_point)`` (as openai/human-eval-infilling)."""
    return (problem["prompt"] + middle + problem["suffix"] + "\n\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})\n")
