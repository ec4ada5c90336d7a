"""Run untrusted generated Python programs in isolated, resource-limited subprocesses.

Every program runs in its own ``python -I`` process (isolated mode: no PYTHONPATH, no user site,
the script's directory not on sys.path) inside a fresh temporary working directory, with
- a wall-clock timeout (the whole process group is killed when it expires),
- hard resource limits set before the program starts: address space (memory), CPU seconds,
  size of written files, no core dumps,
- no network: a new network namespace (``unshare -rn``) where the machine allows one, and in any
  case a socket module whose constructors raise,
- a minimal environment (no proxies, HOME = the temporary directory),
- destructive functions (os.kill, os.system, subprocess.Popen, shutil.rmtree, os.remove, ...)
  disabled, as in OpenAI's human-eval ``reliability_guard``.
This is a guard against accidents (runaway loops, memory bombs, stray file writes), not a
security sandbox against a determined adversary.

A program passes when it runs to its end: the runner prints a per-run random marker after the
program returns, so ``sys.exit(0)`` or ``os._exit(0)`` halfway through does not count as a pass.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

RUNNER = r'''
import sys
_marker = sys.argv[2]
_limits = [int(x) for x in sys.argv[3].split(",")]  # memory bytes, cpu seconds, file bytes
del sys.argv[1:]
import resource
def _limit(kind, value):
    if value > 0:
        try:
            resource.setrlimit(kind, (value, value))
        except (ValueError, OSError):
            pass
_limit(resource.RLIMIT_AS, _limits[0])
_limit(resource.RLIMIT_DATA, _limits[0])
_limit(resource.RLIMIT_CPU, _limits[1])
_limit(resource.RLIMIT_FSIZE, _limits[2])
try:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
except (ValueError, OSError):
    pass
with open("program.py", encoding="utf-8") as _f:
    _source = _f.read()
import faulthandler, builtins, os, shutil, socket, subprocess
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in this sandbox")
class _NoSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        raise OSError("network access is disabled in this sandbox")
socket.socket = _NoSocket
for _name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo", "gethostbyname"):
    if hasattr(socket, _name):
        setattr(socket, _name, _no_network)
faulthandler.disable()
os.environ["OMP_NUM_THREADS"] = "1"
for _name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
              "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod",
              "fchown", "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "chdir", "execv",
              "execve", "spawnv", "spawnve", "posix_spawn", "posix_spawnp"):
    if hasattr(os, _name):
        setattr(os, _name, None)
for _name in ("rmtree", "move", "chown"):
    setattr(shutil, _name, None)
subprocess.Popen = None
builtins.help = None
_code = compile(_source, "program.py", "exec")
del _source, _f, _limit, _limits, _name
_globals = {"__name__": "__main__", "__builtins__": builtins}
exec(_code, _globals)
sys.stdout.flush()
sys.stderr.write("\n" + _marker + "\n")
sys.stderr.flush()
'''


@dataclasses.dataclass
class ExecResult:
    status: str  # "passed" | "failed" | "timeout"
    detail: str  # last lines of the program's error output (or why it was stopped)
    elapsed: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.lru_cache(maxsize=1)
def network_namespace_prefix() -> tuple[str, ...]:
    """``("unshare", "-rn")`` when this machine lets us open a private network namespace, else ()."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return ()
    try:
        ok = subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return (exe, "-rn") if ok else ()


def _clean_env(home: str) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, "LANG": "C.UTF-8",
           "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "TMPDIR": home}
    return env  # no *_proxy variables, no tokens, nothing of the caller's environment


def run_program(source: str, *, timeout: float = 10.0, memory_mb: int = 1024, cpu_seconds: int | None = None,
                max_file_mb: int = 16, python: str | None = None, isolate_network: bool = True) -> ExecResult:
    """Run ``source`` as a Python program in a sandboxed subprocess; see the module docstring."""
    cpu = int(cpu_seconds if cpu_seconds is not None else max(1, int(timeout) + 1))
    marker = "__asarm_done_" + secrets.token_hex(16)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="asarm-exec-") as tmp:
        with open(os.path.join(tmp, "program.py"), "w", encoding="utf-8") as f:
            f.write(source)
        runner = os.path.join(tmp, "_asarm_runner.py")
        with open(runner, "w", encoding="utf-8") as f:
            f.write(RUNNER)
        limits = f"{memory_mb * 2**20},{cpu},{max_file_mb * 2**20}"
        cmd = [python or sys.executable, "-I", runner, "program.py", marker, limits]
        if isolate_network:
            cmd = [*network_namespace_prefix(), *cmd]
        try:
            proc = subprocess.Popen(cmd, cwd=tmp, env=_clean_env(tmp), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            return ExecResult("failed", f"could not start the interpreter: {exc}", 0.0)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return ExecResult("timeout", f"wall-clock timeout after {timeout:g}s", time.perf_counter() - start)
        finally:
            if proc.poll() is None:
                _kill_group(proc)
                proc.communicate()
    elapsed = time.perf_counter() - start
    err_text = err.decode("utf-8", "replace")
    if proc.returncode == 0 and err_text.rstrip().endswith(marker):
        return ExecResult("passed", "", elapsed)
    if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU):
        return ExecResult("timeout", f"CPU time limit ({cpu}s) exceeded", elapsed)
    # no temporary path in the detail: records of the same program are identical across runs
    err_text = err_text.replace(marker, "").replace(tmp + os.sep, "").replace(tmp, ".")
    tail = "\n".join(err_text.strip().splitlines()[-5:])
    if proc.returncode == 0:
        tail = tail or "program exited before running to its end"
    return ExecResult("failed", tail or f"exit code {proc.returncode}", elapsed)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


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
