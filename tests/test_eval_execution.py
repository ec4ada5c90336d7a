"""The sandbox that runs generated code, checked with HumanEval-infilling oracles: canonical
solutions pass, corrupted ones fail, loops and sleeps time out, early exits do not count; and
one test per attack of issue 15, each of which must fail to escape."""

from __future__ import annotations

import os
import tempfile
import time

import pytest

from asarm.evaluation.common import find_shared_data
from asarm.evaluation.execution import WRAPPER, humaneval_program, run_program, run_programs, sandbox_layers
from asarm.evaluation.humaneval import VARIANTS, read_problems


def problems(variant: str, n: int = 3) -> list[dict]:
    path = find_shared_data("humaneval-infilling", VARIANTS[variant])
    if path is None:
        pytest.skip("offline HumanEval-infilling data not found")
    probs = read_problems(path)
    # spread over the file: different HumanEval tasks, not n holes of the first one
    step = max(1, len(probs) // n)
    return probs[::step][:n]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_canonical_solutions_pass_and_corrupted_ones_fail(variant):
    probs = problems(variant)
    good = [humaneval_program(p, p["canonical_solution"]) for p in probs]
    # a syntax error in the middle, and a well-formed line that breaks the function at the hole
    bad = [humaneval_program(p, p["canonical_solution"] + "\n)(\n") for p in probs]
    results = run_programs(good + bad, workers=2, timeout=20)
    for p, r in zip(probs, results[: len(probs)]):
        assert r.passed, (p["task_id"], r.detail)
    for p, r in zip(probs, results[len(probs):]):
        assert not r.passed and r.status == "failed", p["task_id"]


def test_semantically_wrong_middle_fails():
    path = find_shared_data("humaneval-infilling", VARIANTS["single-line"])
    if path is None:
        pytest.skip("offline HumanEval-infilling data not found")
    p = read_problems(path)[0]
    assert p["canonical_solution"] == "    for idx, elem in enumerate(numbers):\n"
    r = run_program(humaneval_program(p, "    for idx, elem in enumerate(numbers[:1]):\n"), timeout=20)
    assert r.status == "failed" and "AssertionError" in r.detail


def test_program_is_prompt_middle_suffix_exactly():
    p = {"prompt": "def f(x):\n", "suffix": "    return y\n", "test": "def check(c):\n    assert c(2) == 3\n",
         "entry_point": "f", "canonical_solution": "    y = x + 1\n"}
    prog = humaneval_program(p, "    y = x + 1\n")
    assert prog.startswith("def f(x):\n    y = x + 1\n    return y\n")
    assert prog.rstrip().endswith("check(f)")
    assert run_program(prog).passed
    assert not run_program(humaneval_program(p, "    y = x + 2\n")).passed


def test_infinite_loop_and_sleep_are_stopped():
    loop = run_program("while True:\n    pass\n", timeout=1.5)
    assert loop.status == "timeout" and not loop.passed and loop.elapsed < 15
    sleep = run_program("import time\ntime.sleep(60)\n", timeout=1.0)
    assert sleep.status == "timeout" and sleep.elapsed < 15
    # CPU-time limit below the wall clock: the kernel stops the loop
    cpu = run_program("while True:\n    pass\n", timeout=20, cpu_seconds=1)
    assert cpu.status == "timeout" and cpu.elapsed < 15


def test_early_exit_is_not_a_pass():
    assert not run_program("import sys\nsys.exit(0)\nassert False\n").passed
    assert not run_program("raise SystemExit(0)\n").passed
    assert run_program("x = 1\n").passed


def test_limits_and_no_network():
    assert run_program("x = bytearray(8 * 1024 ** 3)\n", memory_mb=512).status == "failed"
    r = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))\n")
    assert r.status == "failed" and "network" in r.detail
    r = run_program("import os\nos.system('echo hi')\n")
    assert r.status == "failed"
    # the program runs in a fresh temporary directory and only sees a minimal environment
    assert run_program("import os\nassert os.path.basename(os.getcwd()).startswith('asarm-exec-')\n"
                       "assert not any('proxy' in k.lower() for k in os.environ)\n").passed


# ---------------------------------------------------------------- attacks (issue 15)
# Each attack runs in three set-ups: everything this machine offers ("full"), no namespaces
# ("no-ns": cgroups only), and neither namespaces nor cgroups ("bare") -- the kill-everything,
# timeout and verdict layers must hold in all three. RAW re-imports the posix module, which
# undoes the Python-level guard: it shows that the kernel layers below it hold on their own.

MODES = {"full": {}, "no-ns": {"namespaces": False}, "bare": {"namespaces": False, "cgroups": False}}
RAW = "import sys\ndel sys.modules['posix']\nimport posix\nassert posix.fork is not None\n"
ROUTES = {"guarded": "import posix\n", "raw": RAW}


def readable_python() -> str | None:
    """An interpreter an unprivileged uid can run (as root, the sandbox never runs a program as
    root: without a mount namespace to expose an interpreter below /root it refuses)."""
    import shutil
    import subprocess
    import sys

    from asarm.evaluation.sandbox_child import others_can_read

    for python in (sys.executable, getattr(sys, "_base_executable", None), "/usr/bin/python3",
                   "/usr/local/bin/python3", shutil.which("python3")):
        if not python or not os.path.isfile(python):
            continue
        out = subprocess.run([python, "-I", "-c", "import sys; print('\\n'.join(p for p in sys.path if p))"],
                             capture_output=True, text=True).stdout.split()
        if out and all(others_can_read(p) for p in out if os.path.isdir(p)) and others_can_read(python):
            return python
    return None


def run(source: str, mode: str, **options):
    if mode != "full" and os.geteuid() == 0:
        python = readable_python()
        if python is None:
            pytest.skip("as root without namespaces the sandbox needs a world-readable Python")
        options.setdefault("python", python)
    return run_program(source, **MODES[mode], **options)


def sandbox_processes() -> list[int]:
    """Processes still running this checkout's wrapper (or forked from it)."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if WRAPPER.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.fixture
def outside(tmp_path):
    """Two writable places outside the sandbox's work directory: one in /tmp, one next to the repo."""
    repo_dir = tempfile.mkdtemp(prefix=".sandbox-probe-", dir=os.path.dirname(os.path.dirname(__file__)))
    yield [str(tmp_path), repo_dir]
    for name in os.listdir(repo_dir):
        os.remove(os.path.join(repo_dir, name))
    os.rmdir(repo_dir)


def needs_write_confinement(mode: str) -> None:
    layers = run("pass\n", mode).layers
    if "mount-namespace" not in layers and "landlock" not in layers:
        pytest.skip("writes are confined only by a mount namespace or Landlock; this machine has neither")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("route", ROUTES)
def test_posix_system_and_spawn_run_nothing(mode, route, outside):
    for call in ("assert posix.system('touch {t}') == 0", "posix.posix_spawn('/usr/bin/touch', ['touch', '{t}'], {{}})"):
        target = os.path.join(outside[0], "spawned")
        r = run(ROUTES[route] + call.format(t=target) + "\n", mode)
        assert not r.passed and not os.path.exists(target), (call, r)


ESCAPES = """done = []
for name, attempt in [("unlink", lambda: posix.unlink(VICTIM)), ("overwrite", lambda: open(VICTIM, "w").write("x")),
                      ("create", lambda: open(VICTIM + "-new", "w").write("x"))]:
    try:
        attempt()
        done.append(name)
    except Exception as exc:
        print(name, "refused:", exc)
assert done, "every write outside the work directory was refused"
"""


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("route", ROUTES)
def test_unlink_and_write_outside_the_work_directory_fail(mode, route, outside):
    if route == "raw":
        needs_write_confinement(mode)
    for place in outside:  # below /tmp (another directory than the work one), and next to the repo
        victim = os.path.join(place, f"victim-{os.getpid()}")
        with open(victim, "w") as f:
            f.write("keep")
        try:
            r = run(ROUTES[route] + f"VICTIM = {victim!r}\n" + ESCAPES, mode)
            assert not r.passed and open(victim).read() == "keep" and not os.path.exists(victim + "-new"), r
        finally:
            os.remove(victim)
    # the work directory itself stays writable
    assert run("open('out.txt', 'w').write('x')\nimport os\nos.mkdir('d')\n", mode).passed


FORK_BOMB = RAW + """import time
for i in range(20):
    if posix.fork() == 0:
        time.sleep(30)
        posix._exit(0)
"""


@pytest.mark.parametrize("mode", MODES)
def test_fork_bomb_of_20_is_stopped_and_leaves_nothing(mode):
    r = run(FORK_BOMB, mode, timeout=20)
    assert not r.passed and ("BlockingIOError" in r.detail or "PermissionError" in r.detail), r
    assert sandbox_processes() == []


TREE_MEMORY = RAW + """import select
r, w = posix.pipe()
kids = []
for i in range(4):
    pid = posix.fork()
    if pid == 0:
        block = b'x' * (600 << 20)
        posix.write(w, b'1')
        select.select([], [], [], 1.0)
        posix._exit(0)
    kids.append(pid)
posix.close(w)
got = b''
while len(got) < 4:
    chunk = posix.read(r, 4)
    if not chunk:
        break
    got += chunk
assert got == b'1111', got
assert all(posix.waitpid(pid, 0)[1] == 0 for pid in kids)
"""


@pytest.mark.parametrize("mode", MODES)
def test_four_children_cannot_hold_600_mib_each_under_a_1_gib_limit(mode):
    r = run(TREE_MEMORY, mode, memory_mb=1024, timeout=20)
    assert not r.passed, r
    assert sandbox_processes() == []


@pytest.mark.parametrize("mode", MODES)
def test_a_setsid_child_does_not_outlive_the_run(mode, outside):
    target = os.path.join(outside[0], "late")
    source = RAW + f"""import time
if posix.fork() == 0:
    posix.setsid()
    time.sleep(1.0)
    open({target!r}, 'w').write('still alive')
    posix._exit(0)
"""
    run(source, mode)  # the program itself ends normally; its child must not survive it
    assert sandbox_processes() == []
    time.sleep(1.5)
    assert not os.path.exists(target)


@pytest.mark.parametrize("mode", MODES)
def test_open_pipes_do_not_block_the_timeout(mode):
    source = RAW + """import time
try:
    if posix.fork() == 0:
        posix.setsid()
        time.sleep(60)
except OSError:
    pass
time.sleep(60)
"""
    start = time.perf_counter()
    r = run(source, mode, timeout=1)
    assert r.status == "timeout" and time.perf_counter() - start < 1 + 3, r
    assert sandbox_processes() == []


FORGERIES = [
    # the old runner's marker, read from __main__ and printed before failing
    "import sys\nm = sys.modules['__main__']\nsys.stderr.write(str(getattr(m, '_marker', '')) + '\\n')\n"
    "print(sorted(vars(m)))\nassert False\n",
    "import os\nos._exit(0)\nassert False\n",
    "import posix\nposix._exit(0)\nassert False\n",
    "import sys\nsys.exit(0)\nassert False\n",
    "import atexit, sys\natexit.register(lambda: None)\nraise SystemExit(0)\n",
]


@pytest.mark.parametrize("mode", MODES)
def test_the_program_cannot_forge_a_pass(mode):
    for source in FORGERIES:
        assert not run(source, mode).passed, source


@pytest.mark.parametrize("mode", MODES)
def test_the_program_cannot_signal_the_harness(mode):
    r = run(RAW + f"posix.kill({os.getpid()}, 0)\n", mode)
    assert not r.passed and ("PermissionError" in r.detail or "ProcessLookupError" in r.detail), r


def test_kill_timeout_and_verdict_layers_need_no_namespaces():
    layers = frozenset(run("pass\n", "bare").layers)
    assert {"guard", "rlimits"} <= layers
    if os.uname().machine in ("x86_64", "aarch64"):
        assert {"seccomp", "no-fork"} <= layers


def test_a_world_readable_interpreter_runs_programs_as_root_too():
    """As root with a world-readable interpreter the program runs as a fresh unprivileged uid
    that owns the work directory; that directory's owner must change before the private file
    system goes read-only (once it did not: every program 'failed', and a whole HumanEval run
    scored 0 on a GPU machine whose Python lives in world-readable /opt)."""
    import shutil
    import subprocess
    import sys

    from asarm.evaluation.sandbox_child import others_can_read

    def readable(python):  # every directory on the interpreter's isolated sys.path readable by anyone
        out = subprocess.run([python, "-I", "-c", "import sys; print('\\n'.join(p for p in sys.path if p))"],
                             capture_output=True, text=True).stdout.split()
        return bool(out) and all(others_can_read(p) for p in out if os.path.isdir(p))

    found = [p for p in (getattr(sys, "_base_executable", None), "/usr/bin/python3", "/usr/local/bin/python3",
                         shutil.which("python3")) if p and os.path.isfile(p)]
    python = next((p for p in found if readable(p)), sys.executable)
    r = run_program("x = 1\nassert x == 1\n", python=python)
    assert r.status == "passed", r.detail
    prob = problems("single-line", 1)[0]
    assert run_program(humaneval_program(prob, prob["canonical_solution"]), python=python).passed
    if os.geteuid() == 0 and readable(python):
        assert "unprivileged-uid" in r.layers
        if "pid-namespace" in sandbox_layers():
            assert "mount-namespace" in r.layers


def test_a_sandbox_that_cannot_start_is_an_error_not_a_failed_program(monkeypatch):
    r = run_program("x = 1\n", python="/nonexistent/python3")
    assert r.status == "error" and not r.passed and "could not start" in r.detail
    # a HumanEval task refuses to score where the sandbox cannot run its first canonical solution
    import asarm.evaluation.humaneval as he
    from asarm.errors import SandboxError
    from asarm.evaluation.execution import ExecResult

    monkeypatch.setattr(he, "run_program", lambda source, **kw: ExecResult("error", "no sandbox", 0.0))
    task = he.HumanEvalInfillingTask.__new__(he.HumanEvalInfillingTask)
    task.timeout, task.memory_mb, task._sandbox_checked = 3.0, 1024, False
    with pytest.raises(SandboxError, match="cannot run HumanEval programs.*no sandbox"):
        task.check_sandbox(problems("single-line", 1)[0])


# ---------------------------------------------------------------- forged passes (issue 30)
# Each program fails its assert, and each once ended the process with status 0 before reaching
# it -- which counted as "passed". The verdict now needs a proof of completion the program cannot
# produce (sandbox_runner.py), so every one of them, and the ways to steal that proof, fail.

FORGED_PASSES = {
    "stack walk to the wrapper's exit": """import sys
f = sys._getframe()
while f is not None:
    for value in list(f.f_locals.values()) + list(f.f_globals.values()):
        if callable(value) and getattr(value, '__name__', '') in ('_exit', 'exit_now', 'finish'):
            value(0)
    f = f.f_back
assert False
""",
    "stack walk from an exception's __str__": """import sys
class Sneaky(Exception):
    def __str__(self):
        f = sys._getframe()
        while f is not None:
            for value in f.f_locals.values():
                if callable(value) and getattr(value, '__name__', '') in ('_exit', 'exit_now'):
                    value(0)
            f = f.f_back
        return 'sneaky'
raise Sneaky()
""",
    "stack walk from a replaced sys.stdout.flush": """import sys
def flush():
    f = sys._getframe()
    while f is not None:
        for value in f.f_locals.values():
            if callable(value) and getattr(value, '__name__', '') in ('_exit', 'exit_now'):
                value(0)
        f = f.f_back
sys.stdout.flush = flush
assert False
""",
    "fresh posix module": "import sys\ndel sys.modules['posix']\nimport posix\nposix._exit(0)\nassert False\n",
    "BuiltinImporter": """import importlib.machinery, importlib.util
spec = importlib.machinery.BuiltinImporter.find_spec('posix')
posix = importlib.util.module_from_spec(spec)
posix._exit(0)
assert False
""",
    "ctypes": "import sys\nsys.modules.pop('ctypes', None)\nsys.modules.pop('_ctypes', None)\n"
              "import ctypes\nctypes.CDLL(None)._exit(0)\nassert False\n",
    "early exit handlers": "import atexit, sys\ndel sys.modules['posix']\nimport posix\n"
                           "atexit._run_exitfuncs()\nposix._exit(0)\nassert False\n",
    "exit handlers from a thread": """import _thread, atexit, sys, time
del sys.modules['posix']
import posix
_thread.start_new_thread(atexit._run_exitfuncs, ())
time.sleep(0.5)
posix._exit(0)
""",
    "a forked child ends normally": """import sys
del sys.modules['posix']
import posix
pid = posix.fork()
if pid:
    posix.waitpid(pid, 0)
    assert False
""",
    "garbage collector": """import gc, sys
for obj in gc.get_objects():
    pass
""",
    "trace hook": "import sys\nsys.settrace(lambda *a: None)\nassert False\n",
    "signal handler": "import signal\nsignal.signal(signal.SIGALRM, lambda *a: None)\nassert False\n",
    "process memory": "data = open('/proc/self/maps').read()\nassert False\n",
    "fresh _ctypes through _imp": """import importlib.util, importlib.machinery, sys
for path in sys.path:
    finder = importlib.machinery.FileFinder(path, (importlib.machinery.ExtensionFileLoader,
                                                   importlib.machinery.EXTENSION_SUFFIXES))
    spec = finder.find_spec('_ctypes')
    if spec:
        module = importlib.util.module_from_spec(spec)
        print('loaded', module)
        break
""",
    "subinterpreter": "import _xxsubinterpreters\n_xxsubinterpreters.create()\n",
    "hand-built code": "(lambda: 0).__code__.replace(co_consts=())\n",
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("attack", FORGED_PASSES)
def test_a_failing_program_cannot_forge_a_pass(mode, attack):
    r = run(FORGED_PASSES[attack], mode)
    assert not r.passed and r.status == "failed", r


def test_the_proof_needs_the_end_of_the_program_not_its_exit_status():
    r = run_program("import os, sys\ndel sys.modules['posix']\nimport posix\nposix._exit(0)\n")
    assert r.status == "failed" and "no proof of completion" in r.detail, r
    # a program that registers its own exit handlers and threads still passes when it ends normally
    ok = run_program("import atexit, threading\natexit.register(print, 'bye')\n"
                     "t = threading.Thread(target=lambda: None)\nt.start()\nt.join()\n")
    assert ok.passed, ok
    assert "proof-of-completion" in ok.layers


def test_clean_up_survives_deep_trees_and_never_follows_links(tmp_path):
    """A 3,000-level tree once made the clean-up raise RecursionError (the run died, its work
    directory stayed); its chmod followed a link to a file outside the sandbox."""
    from asarm.evaluation.execution import _remove_tree

    victim = tmp_path / "victim"
    victim.write_text("keep")
    victim.chmod(0o600)
    (tmp_path / "victim-dir").mkdir()
    (tmp_path / "victim-dir" / "inside").write_text("keep")
    work = tmp_path / "work"
    work.mkdir()
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(3000):  # deeper than PATH_MAX allows as one path
        os.mkdir("d", dir_fd=fd)
        sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.symlink(str(victim), "link", dir_fd=sub)
        os.close(fd)
        fd = sub
    os.close(fd)
    os.symlink(str(tmp_path / "victim-dir"), work / "dirlink")
    (work / "locked").mkdir()
    (work / "locked" / "f").write_text("x")
    (work / "locked").chmod(0)
    _remove_tree(str(work))
    assert not work.exists()
    assert victim.read_text() == "keep" and (victim.stat().st_mode & 0o777) == 0o600
    assert (tmp_path / "victim-dir" / "inside").read_text() == "keep"


def test_a_deep_tree_left_by_the_program_is_removed():
    """Without a mount namespace the program writes to the real work directory: its 3,000-level
    tree must not break the run (it raised RecursionError in the clean-up)."""
    source = RAW + "for i in range(3000):\n    posix.mkdir('d')\n    posix.chdir('d')\n"
    r = run(source, "no-ns", timeout=30)
    assert r.passed, r


def test_disk_quota_and_no_root():
    layers = sandbox_layers()
    if "mount-namespace" not in layers:
        pytest.skip("the disk quota is a tmpfs in the sandbox's mount namespace")
    # 20 files of 8 MB each: within the per-file limit, over the 64 MB quota
    r = run_program("for i in range(20):\n    open(f'f{i}', 'wb').write(b'x' * (8 << 20))\n",
                    max_disk_mb=64, timeout=20)
    assert r.status == "failed" and "No space left" in r.detail, r
    if os.geteuid() == 0:
        assert "unprivileged-uid" in layers
        r = run_program("import os\nassert os.getuid() != 0 and os.geteuid() != 0\n"
                        "try:\n    open('/etc/shadow').read()\nexcept OSError:\n    pass\n"
                        "else:\n    raise AssertionError('read /etc/shadow')\n"
                        "assert not os.path.exists('/root/.bash_history')\n")
        assert r.passed, r
