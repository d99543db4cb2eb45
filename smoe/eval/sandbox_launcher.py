"""Sandbox launcher: runs one Python program under isolation; started by smoe.eval.sandbox, never imported.

Runs as a script with `python -I -S` and uses only the standard library. argv[1] is a JSON config.
As root, with namespaces allowed ("namespaces" mode):
  new mount, network, PID, IPC and UTS namespaces; a minimal read-only root (system libraries, the
  Python install, /dev/null..., a private /proc and /tmp) with only the work directory writable;
  chroot; an unprivileged uid of its own (so RLIMIT_NPROC holds); rlimits; then exec.
  PID 1 of the new PID namespace is this launcher: when the program exits, or the launcher is killed,
  the kernel kills every process left in the namespace (a fork bomb dies with it).
Otherwise ("rlimits" mode): rlimits, the work directory as cwd, and audit hooks refusing sockets and
writes outside the work directory.
The program's exit status, signal and CPU time go to the status file.
"""

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

# Runs before the program inside the sandbox: refuse sockets (and, in rlimits mode, writes outside cwd).
BOOT = r"""
import sys, os
_work = os.path.realpath(os.getcwd())
_confine = sys.argv[1] == "confine"
_W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def _inside(p):
    try:
        p = os.path.realpath(os.fsdecode(p))
    except Exception:
        return False
    return p == _work or p.startswith(_work + os.sep) or p in ("/dev/null",)
def _hook(event, args):
    if event.startswith("socket.") and event != "socket.gethostname":
        raise PermissionError("sandbox: network access is disabled")
    if _confine:
        if event == "open" and isinstance(args[0], (str, bytes)):
            mode, flags = args[1], args[2] or 0
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or flags & _W:
                if not _inside(args[0]):
                    raise PermissionError(f"sandbox: writing outside the work directory: {args[0]!r}")
        elif event in ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
                       "os.link", "os.symlink", "shutil.rmtree", "os.utime"):
            for a in args:
                if isinstance(a, (str, bytes)) and not _inside(a):
                    raise PermissionError(f"sandbox: {event} outside the work directory: {a!r}")
sys.addaudithook(_hook)
_path = sys.argv[2]
sys.argv = sys.argv[2:]
with open(_path, encoding="utf-8") as _f:
    _code = compile(_f.read(), _path, "exec")
del _f
exec(_code, {"__name__": "__main__", "__file__": _path, "__builtins__": __builtins__})
"""

libc = ctypes.CDLL(None, use_errno=True)


def check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _enc(s):
    return s.encode() if isinstance(s, str) else s


def mount(src, target, fstype, flags, data=None) -> None:
    enc = _enc
    check(libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def bind(src: str, dst: str, writable: bool = False) -> None:
    mount(src, dst, None, MS_BIND)
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | (0 if writable else MS_RDONLY)
    mount(None, dst, None, flags)


def build_root(cfg: dict) -> None:
    """A minimal read-only root at cfg['root'], then chroot into it with /work as cwd."""
    root = cfg["root"]
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for p in cfg["ro_paths"]:
        dst = root + p
        if os.path.islink(p):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.symlink(os.readlink(p), dst)
        elif os.path.isdir(p):
            os.makedirs(dst, exist_ok=True)
            bind(p, dst)
        elif os.path.isfile(p):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            open(dst, "w").close()
            bind(p, dst)
    os.makedirs(root + "/work")
    bind(cfg["work"], root + "/work", writable=True)
    os.makedirs(root + "/tmp")
    mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['tmp_mb']}m,mode=1777")
    os.makedirs(root + "/dev")
    mount("tmpfs", root + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=755")
    for d in ("null", "zero", "random", "urandom"):
        open(root + "/dev/" + d, "w").close()
        mount("/dev/" + d, root + "/dev/" + d, None, MS_BIND)
    os.makedirs(root + "/proc")
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    os.chroot(root)
    os.chdir("/work")


def set_limits(cfg: dict, nproc: int) -> None:
    mb = 1 << 20
    cpu = int(cfg["cpu_s"] + 0.999)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (cfg["memory_mb"] * mb, cfg["memory_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["file_mb"] * mb, cfg["file_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_NOFILE, (cfg["open_files"], cfg["open_files"]))
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def own_process_count() -> int:
    uid, n = os.getuid(), 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                n += os.stat("/proc/" + d).st_uid == uid
            except OSError:
                pass
    return n


def program_argv(cfg: dict, mode: str, path: str) -> list[str]:
    return [cfg["python"], "-I", "-S", "-B", "-c", BOOT, "confine" if mode == "rlimits" else "free", path]


ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}


STATUS_FD = -1  # opened before any chroot, closed on exec


def write_status(cfg: dict, **status) -> None:
    os.write(STATUS_FD, json.dumps(status).encode())


def report(cfg: dict, status: int, ru) -> int:
    """Write the status file from a wait status; returns the exit code to pass on."""
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + sig
    write_status(cfg, setup="ok", exit=code if sig is None else None, signal=sig,
                 cpu_s=ru.ru_utime + ru.ru_stime, maxrss_kb=ru.ru_maxrss)
    return code


def run_namespaces(cfg: dict) -> int:
    check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    init = os.fork()
    if init:  # outside the namespace: wait for its PID 1
        _, status = os.waitpid(init, 0)
        return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
    # PID 1 of the new namespace
    try:
        check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
        build_root(cfg)
    except Exception as e:
        write_status(cfg, setup=f"{type(e).__name__}: {e}")
        os._exit(125)
    uid = cfg["uid"]
    child = os.fork()
    if child == 0:
        try:
            set_limits(cfg, cfg["max_procs"])
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl")
            os.execve(cfg["python"], program_argv(cfg, "namespaces", "/work/" + cfg["program"]),
                      {**ENV, "HOME": "/work", "TMPDIR": "/tmp"})
        except Exception as e:
            os.write(2, f"sandbox: cannot start the program: {e}\n".encode())
        os._exit(126)
    while True:  # reap everything; leave when the program itself ends
        pid, status, ru = os.wait4(-1, 0)
        if pid == child:
            os._exit(report(cfg, status, ru) & 0xFF)


def run_rlimits(cfg: dict) -> int:
    os.chdir(cfg["work"])
    child = os.fork()
    if child == 0:
        try:
            if cfg["drop_uid"]:  # root ignores RLIMIT_NPROC: become a uid of its own
                set_limits(cfg, cfg["max_procs"])
                os.setgroups([])
                os.setgid(cfg["uid"])
                os.setuid(cfg["uid"])
            else:
                set_limits(cfg, own_process_count() + cfg["max_procs"])
            os.execve(cfg["python"], program_argv(cfg, "rlimits", os.path.join(cfg["work"], cfg["program"])),
                      {**ENV, "HOME": cfg["work"], "TMPDIR": cfg["work"]})
        except Exception as e:
            os.write(2, f"sandbox: cannot start the program: {e}\n".encode())
        os._exit(126)
    _, status, ru = os.wait4(child, 0)
    return report(cfg, status, ru)


def main() -> None:
    global STATUS_FD
    cfg = json.loads(sys.argv[1])
    STATUS_FD = os.open(cfg["status"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        pass  # best effort: the evaluator also kills the whole process group
    sys.exit(run_namespaces(cfg) if cfg["mode"] == "namespaces" else run_rlimits(cfg))


if __name__ == "__main__":
    main()
