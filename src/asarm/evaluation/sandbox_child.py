"""The trusted wrapper that runs one untrusted program; started by ``execution.py`` as
``python -I sandbox_child.py CONFIG_JSON`` (stdlib only, never imported by asarm itself).

Process tree:  harness --(exit status + proof)-- W0 [-- W1, pid 1 of a new PID namespace] -- P
- W0 joins the run's cgroups (memory and process limits for the whole tree), then tries to
  unshare PID, mount, network, IPC and UTS namespaces (plus a user namespace when not root).
- W1 (W0 itself when there are no namespaces) makes every mount read-only, puts a private tmpfs
  on /tmp whose only content is the work directory (a tmpfs of its own: the disk quota), covers
  /proc (the program's memory stays unreadable) and, as root, exposes only the interpreter's
  directories below an unsearchable one (/root); then forks P. When P ends, every other
  descendant is killed: by the kernel when W1, the namespace's init, exits; otherwise by W0 as
  child subreaper (and the cgroup).
- P drops everything before it runs the program: rlimits, an unprivileged uid (as root: never
  root, it refuses instead), no capabilities, no_new_privs, Landlock (writes only below the work
  directory, no TCP, no signals out of the sandbox), a seccomp filter (one exec only, of the
  interpreter through a descriptor; no namespaces/mounts/ptrace, no signal handlers, no fork
  unless the tree is contained, no inet sockets), then execs ``sandbox_runner.py`` in a fresh
  interpreter: none of this file's objects (its ctypes, its frames) is in the program's process.
The verdict is W0's exit status *and* the proof of completion the runner writes on ``proof_fd``
(see ``sandbox_runner.py``); W0/W1 are not dumpable. Informational lines (which layers are
active) go through ``info_fd``, closed in P before the exec. docs/sandbox.md says what this
design can and cannot guarantee.
"""

import ctypes
import json
import os
import resource
import signal
import struct
import sys
import time
import traceback

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
LIBC.syscall.restype = ctypes.c_long
LIBC.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

CLONE_THREAD, CLONE_NEWNS, CLONE_NEWCGROUP = 0x10000, 0x20000, 0x2000000
CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = (
    0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000)
NAMESPACE_FLAGS = CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 22, 36, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4

# verdicts: W0's exit status, read by the harness
PASSED, RAISED, EXITED_EARLY, CPU_LIMIT, KILLED, BAD_EXIT, SETUP_FAILED = 0, 10, 11, 12, 13, 14, 15
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_runner.py")


def check(ret: int, what: str) -> None:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def syscall(nr: int, *args) -> int:
    return LIBC.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])


def prctl(option: int, arg: int = 0) -> int:
    return LIBC.prctl(option, arg, 0, 0, 0)


def info(fd: int, **fields) -> None:
    os.write(fd, (json.dumps(fields) + "\n").encode())


# ---------------------------------------------------------------- W0: cgroups and namespaces

def join_cgroups(dirs: list[str]) -> list[str]:
    """Move this process (and so every later descendant) into the run's cgroups."""
    joined = []
    for kind, path in dirs:
        try:
            with open(os.path.join(path, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
            joined.append("cgroup-" + kind)
        except OSError:
            pass
    return joined


def enter_namespaces(network: bool) -> list[str]:
    """unshare PID/mount/IPC/UTS (and network) namespaces; a user namespace when not root."""
    flags = CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | (CLONE_NEWNET if network else 0)
    uid, gid = os.getuid(), os.getgid()
    user = os.geteuid() != 0
    if LIBC.unshare(flags | (CLONE_NEWUSER if user else 0)) != 0:
        return []
    if user:  # map our own uid only: the program keeps the caller's file permissions, no more
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    return ["pid-namespace"] + (["network-namespace"] if network else []) + (["user-namespace"] if user else [])


# ---------------------------------------------------------------- W1: the file system view

def mount(src, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()
    check(LIBC.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def mount_points() -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        lines = f.read().splitlines()
    unescape = lambda s: s.encode().decode("unicode_escape")  # \040 for spaces etc.
    return [unescape(line.split()[4]) for line in lines]


def remount_readonly(path: str) -> bool:
    """Bind-remount ``path`` read-only, keeping its nosuid/nodev/noexec/atime flags (a user
    namespace may not clear them). False when it failed for a reason other than being hidden."""
    try:
        st = os.statvfs(path)
    except OSError:
        return True  # hidden below another mount: unreachable, nothing to protect
    keep = [(os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
            (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME)]
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY
    for st_flag, ms_flag in keep:
        if st.f_flag & st_flag:
            flags |= ms_flag
    if LIBC.mount(None, path.encode(), None, flags, None) == 0:
        return True
    return ctypes.get_errno() == 22  # EINVAL: not a mount point any more (shadowed by a later mount)


def hidden_ancestors(paths: list[str]) -> dict[str, set[str]]:
    """For each path below a directory others may not search (``/root`` as pyenv installs for
    root): that directory and the names of its children on the paths."""
    hidden: dict[str, set[str]] = {}
    for path in paths:
        parts = [p for p in os.path.realpath(path).split("/") if p]
        current = "/"
        for part in parts:
            if not os.stat(current).st_mode & 0o001 and current != "/":
                hidden.setdefault(current, set()).add(part)
                break
            current = os.path.join(current, part)
    return hidden


def expose_interpreter() -> None:
    """Make the interpreter readable to the sandbox uid without opening anything else: a
    directory it cannot search (``/root``) is covered with an empty tmpfs, and only the children
    on the interpreter's paths are bound back into it. The rest of ``/root`` stays unseen."""
    paths = [p for p in sys.path if p and os.path.isdir(p)] + [sys.executable]
    for blocked, children in hidden_ancestors(paths).items():
        kept = {name: os.open(os.path.join(blocked, name), os.O_PATH | os.O_CLOEXEC) for name in children}
        mount("tmpfs", blocked, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
        for name, fd in kept.items():
            target = os.path.join(blocked, name)
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.mkdir(target, 0o755)
            else:
                os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
            mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
            os.close(fd)


def private_filesystem(work: str, disk: int, uid, expose: bool) -> str:
    """Everything read-only; a private /tmp holding only the work directory, a tmpfs of ``disk``
    bytes (the disk quota: the program never writes to the real disk); no /proc at all (the
    program's memory and the supervisors' stay unreadable). Returns the work directory's path inside."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    if expose:
        expose_interpreter()
    with open(os.path.join(work, "program.py"), "rb") as f:
        program = f.read()
    inner = os.path.join("/tmp", os.path.basename(work))
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
    os.mkdir(inner)
    mount("tmpfs", inner, "tmpfs", MS_NOSUID | MS_NODEV, f"size={max(disk, 1 << 16)},mode=700")
    with open(os.path.join(inner, "program.py"), "wb") as f:
        f.write(program)
    if uid is not None:
        for path in (inner, os.path.join(inner, "program.py")):
            os.chown(path, uid, uid)
    if not all(remount_readonly(p) for p in mount_points() if p != inner):
        raise OSError("could not make every mount read-only")
    mount("tmpfs", "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "size=4k,mode=555")
    os.chdir(inner)
    return inner


# ---------------------------------------------------------------- P: dropping privileges

def set_limits(cfg: dict, allow_fork: bool, seccomp_ok: bool) -> None:
    def limit(kind, soft, hard=None):
        try:
            resource.setrlimit(kind, (soft, soft if hard is None else hard))
        except (ValueError, OSError):
            pass
    limit(resource.RLIMIT_AS, cfg["memory"])
    limit(resource.RLIMIT_DATA, cfg["memory"])
    limit(resource.RLIMIT_CPU, cfg["cpu"], cfg["cpu"] + 1)  # SIGXCPU first, SIGKILL a second later
    limit(resource.RLIMIT_FSIZE, cfg["fsize"])
    limit(resource.RLIMIT_CORE, 0)
    # without seccomp, "no fork" can only come from RLIMIT_NPROC = 0 (which also stops threads)
    limit(resource.RLIMIT_NPROC, cfg["nproc"] if allow_fork or seccomp_ok else 0)


def others_can_read(path: str) -> bool:
    """Whether a user without any special rights could read ``path`` (and search its parents)."""
    path = os.path.abspath(path)
    while True:
        try:
            if os.stat(path).st_mode & 0o005 != 0o005:
                return False
        except OSError:
            return False
        if path == "/":
            return True
        path = os.path.dirname(path)


def interpreter_readable() -> bool:
    """Whether an unprivileged uid can run this interpreter: its binary and every directory on
    its (isolated) ``sys.path``."""
    return all(others_can_read(p) for p in sys.path if p and os.path.isdir(p)) and others_can_read(sys.executable)


def drop_privileges(uid) -> list[str]:
    layers = []
    if uid is not None:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            layers.append("unprivileged-uid")
        except OSError:
            pass
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    if LIBC.capset(ctypes.c_char_p(header), ctypes.c_char_p(bytes(24))) == 0:
        layers.append("no-capabilities")
    check(prctl(PR_SET_NO_NEW_PRIVS, 1), "no_new_privs")
    return layers


def landlock(work: str) -> list[str]:
    """Writes only below ``work`` (and to /dev/null); no TCP; no signals out of the sandbox."""
    abi = syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, VERSION)
    if abi < 1:
        return []
    fs = 2 | 16 | 32 | 64 | 128 | 256 | 512 | 1024 | 2048 | 4096  # write, remove, make anything
    fs |= (8192 if abi >= 2 else 0) | (16384 if abi >= 3 else 0)  # refer (rename across dirs), truncate
    net, scoped = (3 if abi >= 4 else 0), (3 if abi >= 6 else 0)
    attr = struct.pack("QQQ", fs, net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = syscall(444, ctypes.c_char_p(attr), len(attr), 0)
    check(ruleset, "landlock_create_ruleset")
    for path, rights in ((work, fs), ("/dev/null", 2 | (16384 if abi >= 3 else 0))):
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        rule = struct.pack("=Qi", rights, fd)
        check(syscall(445, ruleset, 1, ctypes.c_char_p(rule), 0), "landlock_add_rule")
        os.close(fd)
    check(syscall(446, ruleset, 0), "landlock_restrict_self")
    os.close(ruleset)
    return ["landlock"] + (["landlock-network"] if net else []) + (["landlock-signals"] if scoped else [])


# ---------------------------------------------------------------- P: the seccomp filter

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
SYSCALLS = {  # name: (x86_64, aarch64); None where the architecture has no such call
    "execve": (59, 221), "execveat": (322, 281), "rt_sigaction": (13, 134), "fork": (57, None), "vfork": (58, None),
    "clone": (56, 220), "clone3": (435, 435), "kill": (62, 129), "tkill": (200, 130),
    "tgkill": (234, 131), "rt_sigqueueinfo": (129, 138), "rt_tgsigqueueinfo": (297, 240),
    "pidfd_send_signal": (424, 424), "pidfd_getfd": (438, 438), "ptrace": (101, 117),
    "process_vm_readv": (310, 270), "process_vm_writev": (311, 271), "mount": (165, 40),
    "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51), "unshare": (272, 97),
    "setns": (308, 268), "mount_setattr": (442, 442), "open_tree": (428, 428), "move_mount": (429, 429),
    "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
    "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282), "keyctl": (250, 219),
    "add_key": (248, 217), "request_key": (249, 218), "kexec_load": (246, 104),
    "kexec_file_load": (320, 294), "init_module": (175, 105), "finit_module": (313, 273),
    "delete_module": (176, 106), "open_by_handle_at": (304, 265), "reboot": (169, 142),
    "swapon": (167, 224), "swapoff": (168, 225), "acct": (163, 89), "socket": (41, 198), "prctl": (157, 167),
}
ALLOW, KILL = 0x7FFF0000, 0x80000000
ERRNO = lambda e: 0x00050000 | e
EPERM, ENOSYS, AF_UNIX = 1, 38, 1


def bpf(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


LD_NR, LD_ARCH, LD_ARG0 = bpf(0x20, 0), bpf(0x20, 4), bpf(0x20, 16)  # seccomp_data fields (low word)
RET = lambda action: bpf(0x06, action)
JEQ = lambda k, jt, jf: bpf(0x15, k, jt, jf)
JSET = lambda k, jt, jf: bpf(0x45, k, jt, jf)


def seccomp_program(arch: str, allow_fork: bool, in_pidns: bool, network: bool, self_pid: int, exec_fd: int) -> bytes:
    column = 0 if arch == "x86_64" else 1
    nr = {name: nums[column] for name, nums in SYSCALLS.items() if nums[column] is not None}
    deny = ["execve", "rt_sigaction", "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2",
            "pivot_root", "chroot", "unshare", "setns", "mount_setattr", "open_tree", "move_mount", "fsopen",
            "fsconfig", "fsmount", "fspick", "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key",
            "request_key", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
            "open_by_handle_at", "reboot", "swapon", "swapoff", "acct", "pidfd_getfd"]
    if not allow_fork:
        deny += ["fork", "vfork"]
    if not in_pidns:  # outside a PID namespace, signals could reach the harness: only to itself
        deny += ["tkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "pidfd_send_signal"]
    blocks = [[JEQ(nr[name], 0, 1), RET(ERRNO(EPERM))] for name in deny if name in nr]
    blocks.append([JEQ(nr["clone3"], 0, 1), RET(ERRNO(ENOSYS))])  # flags unreadable: libc falls back to clone
    clone = [LD_ARG0, JSET(NAMESPACE_FLAGS, 0, 1), RET(ERRNO(EPERM))]
    clone += [RET(ALLOW)] if allow_fork else [JSET(CLONE_THREAD, 0, 1), RET(ALLOW), RET(ERRNO(EPERM))]
    blocks.append([JEQ(nr["clone"], 0, len(clone))] + clone)
    arg0_is = lambda value, ok, bad: [LD_ARG0, JEQ(value, 0, 1), RET(ok), RET(bad)]
    blocks.append([JEQ(nr["prctl"], 0, 4)] + arg0_is(PR_SET_PDEATHSIG, ERRNO(EPERM), ALLOW))
    if not in_pidns:
        for name in ("kill", "tgkill"):
            blocks.append([JEQ(nr[name], 0, 4)] + arg0_is(self_pid, ALLOW, ERRNO(EPERM)))
    if network:
        blocks.append([JEQ(nr["socket"], 0, 4)] + arg0_is(AF_UNIX, ALLOW, ERRNO(EPERM)))
    # one exec only: of the interpreter, through the descriptor the runner closes at once
    blocks.append([JEQ(nr["execveat"], 0, 4)] + arg0_is(exec_fd, ALLOW, ERRNO(EPERM)))
    head = [LD_ARCH, JEQ(AUDIT_ARCH[arch], 1, 0), RET(KILL), LD_NR]
    if arch == "x86_64":  # the x32 ABI numbers (bit 30) would bypass every check below
        head += [bpf(0x35, 0x40000000, 0, 1), RET(ERRNO(ENOSYS))]
    body = [ins for block in blocks for ins in block + [LD_NR]]  # reload nr after arg checks
    return b"".join(head + body + [RET(ALLOW)])


def seccomp(allow_fork: bool, in_pidns: bool, network: bool, exec_fd: int) -> list[str]:
    arch = os.uname().machine
    if arch not in AUDIT_ARCH:
        return []
    prog = seccomp_program(arch, allow_fork, in_pidns, network, os.getpid(), exec_fd)
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = ctypes.create_string_buffer(struct.pack("HxxxxxxP", len(prog) // 8, ctypes.addressof(buf)))
    check(LIBC.prctl(PR_SET_SECCOMP, 2, ctypes.addressof(fprog), 0, 0), "seccomp")  # SECCOMP_MODE_FILTER
    return ["seccomp"]


# ---------------------------------------------------------------- P: the program

def optional(layer, *args) -> list[str]:
    """A kernel layer this machine may lack (old kernel, blocked by a container): skip it."""
    try:
        return layer(*args)
    except OSError as exc:
        sys.stderr.write(f"sandbox: {layer.__name__} unavailable ({exc})\n")
        return []


def program_process(cfg: dict, work, uid, layers: list[str], info_fd: int, parent: int) -> None:
    """P: drop every privilege, report the layers, then become a fresh interpreter running
    ``sandbox_runner.py`` (no ctypes, none of this file's objects in reach of the program).
    ``work``: the work directory's path, or an open descriptor of it."""
    exit_now = os._exit
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the supervisor died before the line above
            exit_now(120)
        os.fchdir(work) if isinstance(work, int) else os.chdir(work)
        work = os.getcwd()
        for name in ("HOME", "TMPDIR"):
            os.environ[name] = work
        exec_fd = os.open(sys.executable, os.O_PATH | os.O_CLOEXEC)
        allow_fork = ("pid-namespace" in layers or "cgroup-pids" in layers) and "cgroup-memory" in layers
        set_limits(cfg, allow_fork, os.uname().machine in AUDIT_ARCH)
        layers = layers + ["rlimits"] + drop_privileges(uid)
        layers += optional(landlock, work)
        layers += optional(seccomp, allow_fork, "pid-namespace" in layers, cfg["network"], exec_fd)
        if "seccomp" not in layers and not allow_fork:  # "no fork" then rests on RLIMIT_NPROC = 0
            resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
        layers += ["fork-allowed" if allow_fork else "no-fork", "guard", "proof-of-completion"]
        info(info_fd, layers=layers)
        os.close(info_fd)
        runner = {"exec_fd": exec_fd, "nonce_fd": cfg["nonce_fd"], "proof_fd": cfg["proof_fd"], "program": "program.py"}
        for fd in (cfg["nonce_fd"], cfg["proof_fd"]):
            os.set_inheritable(fd, True)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(exec_fd, [sys.executable, "-I", RUNNER, json.dumps(runner)], dict(os.environ))
    except BaseException:
        traceback.print_exc()
    exit_now(120)  # the setup failed: never run the program half-protected


# ---------------------------------------------------------------- W0/W1: supervision

def kill_descendants(cgroup_dirs: list) -> None:
    """Kill every remaining descendant (they are re-parented to us as subreaper) and every
    process of the run's cgroups, until none is left."""
    me = os.getpid()
    for _ in range(500):
        victims = set()
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == me:
                victims.add(int(entry))
        for _, path in cgroup_dirs:
            try:
                with open(os.path.join(path, "cgroup.procs")) as f:
                    victims.update(int(x) for x in f.read().split())
            except OSError:
                pass
        victims.discard(me)
        if not victims:
            return
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        reap(block=False)
        time.sleep(0.002)


def reap(block: bool, wanted: int = -1):
    """Reap children (orphans included); with ``block``, until ``wanted`` ends: its (status, rusage)."""
    while True:
        try:
            pid, status, usage = os.wait4(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return None
        if pid == 0:
            return None
        if pid == wanted:
            return status, usage


def verdict(status: int, usage, cpu_limit: int, info_fd: int) -> int:
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        return {0: PASSED, 1: RAISED, 3: EXITED_EARLY, 120: SETUP_FAILED}.get(code, BAD_EXIT)
    sig = os.WTERMSIG(status)
    info(info_fd, signal=sig, cpu=usage.ru_utime + usage.ru_stime)
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and usage.ru_utime + usage.ru_stime >= cpu_limit):
        return CPU_LIMIT
    return KILLED


def supervise(cfg: dict, info_fd: int, layers: list[str]) -> int:
    """W1 (or W0 without a PID namespace): the file system view, fork P, wait for it, kill what
    is left. Returns the verdict."""
    in_pidns = "pid-namespace" in layers
    work = work_fd = os.open(cfg["work"], os.O_RDONLY | os.O_DIRECTORY)
    root = os.geteuid() == 0
    uid = cfg["uid"] if root else None  # as root the program runs as a fresh unprivileged uid
    if root:  # while the mount is still writable (the read-only remount covers work_fd's mount)
        os.fchown(work_fd, uid, uid)
    if in_pidns:
        try:
            work = private_filesystem(cfg["work"], cfg["disk"], uid, expose=root)
            layers = layers + ["mount-namespace", "disk-quota"]
        except OSError as exc:
            info(info_fd, warning=f"no private file system view: {exc}")
    if root and not interpreter_readable():
        sys.stderr.write(f"sandbox: refusing to run the program as root, and the interpreter {sys.executable} "
                         "is not readable by an unprivileged user (no mount namespace to expose it); "
                         "use a world-readable Python\n")
        return SETUP_FAILED
    if not in_pidns:
        prctl(PR_SET_CHILD_SUBREAPER, 1)
    me = os.getpid()
    child = os.fork()
    if child == 0:
        program_process(cfg, work, uid, layers, info_fd, me)
    for fd in (cfg["nonce_fd"], cfg["proof_fd"]):  # the program's alone from here on
        os.close(fd)
    if not in_pidns:
        info(info_fd, program=child)  # the harness waits for it to be gone after a timeout
    status, usage = reap(block=True, wanted=child)
    result = verdict(status, usage, cfg["cpu"], info_fd)
    if not in_pidns:  # in a PID namespace the kernel kills everything once we (its init) exit
        kill_descendants(cfg["cgroups"])
    return result


def main() -> int:
    cfg = json.loads(sys.argv[1])
    info_fd = cfg["info_fd"]
    layers = join_cgroups(cfg["cgroups"])
    if cfg["namespaces"]:
        layers += enter_namespaces(cfg["network"])
    # no ptrace and no /proc/<pid>/fd access to the supervisors (after the uid map: while not
    # dumpable, /proc/self belongs to root and the map could not be written)
    prctl(PR_SET_DUMPABLE, 0)
    if "pid-namespace" not in layers:
        return supervise(cfg, info_fd, layers)
    alive_r, alive_w = os.pipe()
    child = os.fork()  # pid 1 of the new namespace
    if child == 0:
        try:
            os.close(alive_w)
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            os.set_blocking(alive_r, False)
            try:
                if os.read(alive_r, 1) == b"":  # EOF: W0 is already gone
                    os._exit(KILLED)
            except BlockingIOError:
                pass
            os._exit(supervise(cfg, info_fd, layers))
        except BaseException:
            traceback.print_exc()
            os._exit(SETUP_FAILED)
    info(info_fd, init=child)  # the harness waits for it to be gone after a timeout
    for fd in (info_fd, cfg["nonce_fd"], cfg["proof_fd"]):
        os.close(fd)
    status, _ = reap(block=True, wanted=child)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else KILLED


if __name__ == "__main__":
    try:
        code = main()
    except BaseException:
        traceback.print_exc()
        code = SETUP_FAILED
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
