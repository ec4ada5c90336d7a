"""Run untrusted generated Python programs in a sandbox; see ``sandbox_child.py`` for the layers.

Each program runs under a trusted wrapper process (``python -I sandbox_child.py``) in fresh
temporary directory. The harness side (this file):
- creates the run's cgroups where the machine lets us (memory limit and process limit for the
  whole tree, and a reliable way to kill it),
- sends the program's output to files, never pipes: a descendant holding them open cannot block
  the harness, and the wall-clock timeout is a plain ``wait(timeout)``,
- on timeout kills the wrapper's process group and the cgroups; the rest of the tree dies with
  the wrapper (PID namespace, or parent-death signals and no fork when there is none),
- takes the verdict from the wrapper's exit status *and* a proof of completion: a nonce sent to
  the runner through a pipe and written back only after the program returned normally (see
  ``sandbox_runner.py``); an exit status of 0 alone is a failure.
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
                max_file_mb: int = 16, max_disk_mb: int = 64, python: str | None = None, isolate_network: bool = True,
                namespaces: bool = True, cgroups: bool = True, max_processes: int = 8) -> ExecResult:
    """Run ``source`` as a Python program in the sandbox; see the module docstring.
    ``namespaces``/``cgroups`` = False skip those layers (to test the fallbacks). ``max_disk_mb``:
    what all the program's files may take together (a tmpfs; only with a mount namespace, each
    file is limited to ``max_file_mb`` everywhere)."""
    cpu = int(cpu_seconds if cpu_seconds is not None else max(1, int(timeout) + 1))
    start = time.perf_counter()
    work = tempfile.mkdtemp(prefix="asarm-exec-")
    out = tempfile.mkdtemp(prefix="asarm-out-")
    groups = _make_cgroups(memory_mb * 2**20, max_processes) if cgroups else []
    uid = 1_000_000 + secrets.randbelow(1_000_000)  # used when root: the program never runs as root
    try:
        with open(os.path.join(work, "program.py"), "w", encoding="utf-8") as f:
            f.write(source)
        cfg = {"work": work, "memory": memory_mb * 2**20, "cpu": cpu, "fsize": max_file_mb * 2**20,
               "disk": max_disk_mb * 2**20,
               "nproc": max_processes, "namespaces": namespaces, "network": isolate_network,
               "cgroups": groups, "uid": uid}
        code, info, err, proven = _supervise(cfg, python, work, out, timeout)
    finally:
        _remove_cgroups(groups)
        shutil.rmtree(out, ignore_errors=True)
        _remove_tree(work)
    return _result(code, info, err, cpu, timeout, time.perf_counter() - start, proven)


def _supervise(cfg: dict, python: str | None, work: str, out: str, timeout: float):
    """Start the wrapper, wait at most ``timeout``, kill the tree. Returns (exit code or None on
    timeout, info lines, the program's error output, whether the proof of completion came back)."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    cfg["info_fd"] = write_fd
    # the proof of completion (see sandbox_runner.py): a fresh nonce in a pipe only the runner
    # reads, which it writes back on proof_w once the program has run to its end
    nonce = secrets.token_hex(16).encode()
    nonce_r, nonce_w = os.pipe()
    os.write(nonce_w, nonce)
    os.close(nonce_w)
    proof_r, proof_w = os.pipe()
    os.set_blocking(proof_r, False)
    cfg["nonce_fd"], cfg["proof_fd"] = nonce_r, proof_w
    stdout = open(os.path.join(out, "stdout"), "wb")
    stderr = open(os.path.join(out, "stderr"), "w+b")
    try:
        try:
            proc = subprocess.Popen([python or sys.executable, "-I", WRAPPER, json.dumps(cfg)], cwd=work,
                                    env=_clean_env(work), stdin=subprocess.DEVNULL, stdout=stdout,
                                    stderr=stderr, pass_fds=(write_fd, nonce_r, proof_w), start_new_session=True)
        except OSError as exc:
            return -1, [], f"could not start the interpreter: {exc}", False
        finally:
            for fd in (write_fd, nonce_r, proof_w):
                os.close(fd)
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
        return code, info, err, _drain(proof_r, 1 << 12) == nonce
    finally:
        os.close(read_fd)
        os.close(proof_r)
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


def _drain(fd: int, limit: int = 1 << 20) -> bytes:
    """What a non-blocking pipe holds now, at most about ``limit`` bytes."""
    data = b""
    while len(data) < limit:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data


def _read_info(fd: int) -> list[dict]:
    data = _drain(fd)
    lines = []
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return lines


def _result(code, info: list[dict], err: str, cpu: int, timeout: float, elapsed: float,
            proven: bool = False) -> ExecResult:
    layers = tuple(next((line["layers"] for line in info if "layers" in line), ()))
    if code is None:
        return ExecResult("timeout", f"wall-clock timeout after {timeout:g}s", elapsed, layers)
    if code == child.PASSED and proven:  # an exit status of 0 alone proves nothing: the program can choose it
        return ExecResult("passed", "", elapsed, layers)
    if code == child.CPU_LIMIT:
        return ExecResult("timeout", f"CPU time limit ({cpu}s) exceeded", elapsed, layers)
    tail = "\n".join(err.strip().splitlines()[-5:])
    if code in (-1, child.SETUP_FAILED):  # the interpreter did not start, or the sandbox failed
        return ExecResult("error", tail or "the sandbox could not be set up", elapsed, layers)
    why = {child.EXITED_EARLY: "program exited before running to its end",
           child.KILLED: "killed by signal {} (memory limit?)".format(
               next((line["signal"] for line in info if "signal" in line), "?")),
           child.BAD_EXIT: "program ended without running to its end",
           child.PASSED: "program ended before running to its end (no proof of completion)"}.get(code, f"exit code {code}")
    return ExecResult("failed", tail or why, elapsed, layers)


def _remove_tree(path: str) -> None:
    """Remove the work directory, whatever the (now dead) program left in it: never recursive
    (a tree thousands of levels deep), never following a symbolic link (a link's target is not
    the program's to lose), relative to directory descriptors (paths longer than PATH_MAX), and
    restoring the permissions of directories the program made unreadable (chmod 000)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        os.chmod(path, 0o700, follow_symlinks=False) if not os.path.islink(path) else None
        fd = os.open(path, flags)
    except OSError:
        return
    stack: list[tuple[str, list[str]]] = []  # (name in the parent, subdirectories still to visit)
    pending = _clear_files(fd)
    while True:
        if pending:
            name = pending.pop()
            try:
                os.chmod(name, 0o700, dir_fd=fd)  # a directory (lstat'ed), and no process is left to swap it
                sub = os.open(name, flags, dir_fd=fd)
            except OSError:
                continue
            os.close(fd)
            fd = sub
            stack.append((name, pending))
            pending = _clear_files(fd)
            continue
        if not stack:
            os.close(fd)
            break
        name, pending = stack.pop()
        parent = os.open("..", flags, dir_fd=fd)  # no links on the way down: ".." is where we came from
        os.close(fd)
        fd = parent
        try:
            os.rmdir(name, dir_fd=fd)
        except OSError:
            pass
    try:
        os.rmdir(path)
    except OSError:
        pass


def _clear_files(dir_fd: int) -> list[str]:
    """Unlink everything in the directory that is not a directory (links included, never
    followed); return the names of its subdirectories."""
    subdirs = []
    try:
        entries = list(os.scandir(dir_fd))
    except OSError:
        return subdirs
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.name)
            else:
                os.unlink(entry.name, dir_fd=dir_fd)
        except OSError:
            pass
    return subdirs


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
