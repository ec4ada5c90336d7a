"""The interpreter one untrusted program runs in; ``sandbox_child.py`` execs it as
``python -I sandbox_runner.py CONFIG_JSON`` once every kernel layer is in place (stdlib only,
and never ``ctypes``: the classes of a loaded ``_ctypes`` would stay reachable through
``object.__subclasses__()`` and read any memory).

The verdict is not the exit status, which the program can always choose (``os._exit(0)`` from
a re-imported ``posix``, a ``ctypes`` call, a function found by walking up the stack). It is a
proof of completion: a 128-bit nonce the harness put into a pipe, which only this runner reads,
and which it writes back on ``proof_fd`` only when

- the program's code returned normally (an exception, ``SystemExit`` or a signal ends the
  process through ``os._exit`` here, so the interpreter never reaches its exit handlers), and
- the writer runs as the *last* step of the interpreter's normal shutdown: it is an ``atexit``
  handler that checks it was called by the interpreter itself (no Python frame below it, on the
  main thread, in this process, not a fork); a program that calls ``atexit._run_exitfuncs()``
  early spends the nonce instead.

The nonce lives only in that handler's closure. The program could reach it through the garbage
collector, tracing hooks, subinterpreters, code objects built by hand, ``ctypes`` or the process's
memory; the audit hook below refuses each of those (``sys.addaudithook`` hooks cannot be removed),
and the process memory is not readable: in the sandbox's mount namespace there is no ``/proc``,
and ``process_vm_readv``/``ptrace`` are refused by seccomp. Signal handlers (which get the frame a
signal interrupts) cannot be installed: seccomp refuses ``rt_sigaction``. docs/sandbox.md lists
what this design cannot guarantee.
"""

import atexit
import json
import os
import sys

# events the program may not raise: each hands out objects (frames, every live object, raw
# memory) through which the nonce could be read before the program has run to its end
DENIED_EVENTS = frozenset({
    "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames",
    "sys._current_exceptions", "sys.settrace", "sys.setprofile", "sys._settraceallthreads",
    "sys._setprofileallthreads", "sys.monitoring.register_callback", "sys.addaudithook",
    "cpython.PyInterpreterState_New", "code.__new__", "function.__new__",
})
DENIED_MODULES = frozenset({"ctypes", "_ctypes", "_xxsubinterpreters", "_interpreters", "_xxinterpchannels",
                            "_interpchannels", "_interpqueues", "_testcapi", "_testinternalcapi", "_posixshmem"})


def audit_hook(denied_events, denied_modules, refuse, exact_type, str_type, spec_type):
    """The audit hook. It never runs the program's code (no name lookups, no calls on objects
    the program may have built), so a program cannot run inside it nor change what it decides."""
    def hook(event, args):
        if exact_type(event) is not str_type:  # only the program raises events with odd types
            raise refuse("sandbox: audit event of an unexpected type")
        if event in denied_events or event[:7] == "ctypes.":
            raise refuse(f"sandbox: {event} is disabled")
        if event == "import" and args and exact_type(args[0]) is str_type and args[0] in denied_modules:
            raise refuse(f"sandbox: import of {args[0]} is disabled")
        if event == "object.__setattr__" and len(args) > 1 and (args[1] == "__code__" or args[0] is spec_type):
            raise refuse("sandbox: replacing a function's code or the import machinery is disabled")
        if event == "object.__delattr__" and args and args[0] is spec_type:
            raise refuse("sandbox: changing the import machinery is disabled")
    return hook


def arm_proof(nonce_fd: int, proof_fd: int):
    """Read the nonce (and close its pipe); return the exit handler that writes it back."""
    nonce = [os.read(nonce_fd, 64)]
    os.close(nonce_fd)
    pid, main_thread = os.getpid(), __import__("_thread").get_ident()
    getpid, get_ident, getframe, write = os.getpid, __import__("_thread").get_ident, sys._getframe, os.write

    def prove():
        secret, nonce[0] = nonce[0], b""  # one use only: an early call spends it
        if getpid() != pid or get_ident() != main_thread:
            return
        if getframe(0).f_back is not None:  # called from Python code, not by the interpreter's exit
            return
        if secret:
            write(proof_fd, secret)
    return prove


def block_reimports() -> None:
    """``_imp`` builds fresh modules without the ``import`` event: refuse the denied ones there.
    Only exact ``ModuleSpec`` objects with ``str`` names pass (their class cannot be changed: the
    audit hook refuses it), so no code of the program runs while the originals are on the stack."""
    import _imp
    from importlib.machinery import ModuleSpec

    denied = DENIED_MODULES | {"_imp"}

    def checked(create, exact_type=type, spec_type=ModuleSpec, str_type=str, refuse=ImportError):
        def create_module(spec, *args):
            name = spec.name if exact_type(spec) is spec_type else None
            if exact_type(name) is not str_type or name in denied or name.rpartition(".")[2] in denied:
                raise refuse(f"sandbox: this import is disabled ({name!r})" if exact_type(name) is str_type
                             else "sandbox: modules are built from import specs only")
            return create(spec, *args)
        return create_module
    _imp.create_builtin, _imp.create_dynamic = checked(_imp.create_builtin), checked(_imp.create_dynamic)


GUARDED = ("kill", "killpg", "system", "putenv", "unsetenv", "remove", "removedirs", "rmdir", "fchdir",
           "setuid", "fork", "forkpty", "rename", "renames", "truncate", "replace", "unlink", "fchmod",
           "fchown", "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "chdir", "execv", "execve",
           "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "fexecve", "spawnv", "spawnve",
           "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp",
           "popen", "_exit", "abort", "register_at_fork", "pidfd_open", "setsid", "link", "symlink")


def reliability_guard() -> None:
    """human-eval's guard, a last layer: destructive calls removed from ``os`` *and* ``posix``
    (``os`` only copies posix's functions, so clearing one left the other working)."""
    import builtins, faulthandler, posix, shutil, socket, subprocess

    def no_network(*args, **kwargs):
        raise OSError("network access is disabled in this sandbox")

    class NoSocket(socket.socket):
        __init__ = no_network
    socket.socket = NoSocket
    for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo", "gethostbyname"):
        setattr(socket, name, no_network)
    faulthandler.disable()
    for module in (os, posix):
        for name in GUARDED:
            if hasattr(module, name):
                setattr(module, name, None)
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, None)
    subprocess.Popen = None
    builtins.help = None
    for name in ("_posixsubprocess", "resource", "pty") + tuple(DENIED_MODULES):
        sys.modules[name] = None


def run(path: str, exit_now) -> None:
    """Run the program as ``__main__``. Only a normal return comes back from here; everything
    else ends the process at once, before any exit handler could write the proof."""
    import traceback
    import types

    with open(path, encoding="utf-8") as f:
        source = f.read()
    main = types.ModuleType("__main__")
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    sys.argv = [path]
    try:
        exec(compile(source, path, "exec"), main.__dict__)
        return
    except SystemExit:
        code = 3
        try:
            sys.stderr.write("program exited before running to its end\n")
        except BaseException:
            pass
    except BaseException as exc:  # the traceback starts in the program, not in this runner
        code = 1
        try:
            traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        except BaseException:
            pass
    try:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    finally:
        exit_now(code)


def main() -> None:
    exit_now = os._exit  # taken before the guard removes it (harmless in the program's reach:
    # an exit without the proof is a failure)
    try:
        cfg = json.loads(sys.argv[1])  # (its exec_fd closed itself on exec: the one exec seccomp allows is spent)
        proof_fd = cfg["proof_fd"]

        def finish():  # the last exit handler: output flushed, then a plain exit
            try:
                for stream in (sys.stdout, sys.stderr):
                    stream.flush()
            finally:
                exit_now(0)
        atexit.register(finish)
        atexit.register(arm_proof(cfg["nonce_fd"], proof_fd))  # runs before finish, after the program's own
        os.closerange(3, proof_fd)
        os.closerange(proof_fd + 1, 1 << 16)
        block_reimports()
        from importlib.machinery import ModuleSpec
        sys.addaudithook(audit_hook(DENIED_EVENTS, DENIED_MODULES, PermissionError, type, str, ModuleSpec))
        reliability_guard()
    except BaseException:
        import traceback
        traceback.print_exc()
        exit_now(120)  # the setup failed: never run the program half-protected
    run(cfg["program"], exit_now)


if __name__ == "__main__":
    main()
