"""Run untrusted, model-written Python in a separate, contained process.

`run_python(code, limits)` writes the program into a fresh temporary directory and starts
smoe/eval/sandbox_launcher.py, which isolates it (see that file): wall time (enforced here),
CPU time, address space, process count, file size and open-file limits; no network; a private
read-only view of the file system with only the temporary directory writable; its own uid.
Where the OS does not allow namespaces (not root), it falls back to rlimits plus audit hooks that
refuse sockets and writes outside the work directory, and says so in `Result.isolation`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
UID_BASE, UID_SPAN = 3_000_000, 1_000_000  # uids no account uses: RLIMIT_NPROC then counts this run alone


@dataclass
class Limits:
    """Resource limits of one sandboxed run."""

    wall_s: float = 10.0
    cpu_s: float = 5.0
    memory_mb: int = 512  # address space (RLIMIT_AS) of each process
    max_procs: int = 8  # processes and threads of the sandbox uid (RLIMIT_NPROC)
    file_mb: int = 16  # largest file it may write, stdout/stderr included (RLIMIT_FSIZE)
    open_files: int = 64
    tmp_mb: int = 64  # its private /tmp


@dataclass
class Result:
    """Outcome of one run: passed only when the program exited 0 within every limit."""

    status: str  # "passed" | "failed" | "timeout" | "error"
    reason: str
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    wall_s: float = 0.0
    cpu_s: float | None = None
    isolation: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _python() -> str:
    """The real interpreter (not a venv link), which the sandbox can see inside its root."""
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return os.path.realpath(base if base.exists() else sys.executable)


def _others_can_run(path: str) -> bool:
    """Whether a uid with no rights of its own can reach and execute `path`."""
    p = Path(path)
    return all(os.stat(d).st_mode & 0o001 for d in [*reversed(p.parents), p])


def _ro_paths() -> list[str]:
    paths = ["/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin", "/etc/ld.so.cache"]
    prefix = os.path.realpath(sys.base_prefix)
    if not any(prefix == p or prefix.startswith(p + "/") for p in ("/usr", "/lib", "/bin")):
        paths.append(prefix)
    return [p for p in paths if os.path.lexists(p)]


@cache
def isolation_mode() -> str:
    """'namespaces' when this process may create namespaces and change uid (root), else 'rlimits'."""
    if os.environ.get("SMOE_SANDBOX_MODE") in ("namespaces", "rlimits"):
        return os.environ["SMOE_SANDBOX_MODE"]
    if os.geteuid() != 0 or not sys.platform.startswith("linux"):
        return "rlimits"
    probe = run_python("print('ok')", Limits(wall_s=20, cpu_s=5), mode="namespaces")
    return "namespaces" if probe.passed and probe.stdout.strip() == "ok" else "rlimits"


def _uid_processes(uid: int) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.stat(f"/proc/{d}").st_uid == uid:
                    pids.append(int(d))
            except OSError:
                pass
    return pids


def _kill_uid(uid: int, timeout: float = 5.0) -> None:
    """Make sure no process of this run's uid outlives it (the kernel empties its PID namespace
    asynchronously; in rlimits mode this is the only clean-up of escaped children)."""
    deadline = time.monotonic() + timeout
    while (pids := _uid_processes(uid)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.02)


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    text = data[-limit:].decode("utf-8", "replace")
    return ("..." if len(data) > limit else "") + text


def _classify(status: dict, rc: int | None, stderr: str, limits: Limits) -> tuple[str, str]:
    if status.get("setup", "ok") != "ok":
        return "error", f"sandbox setup failed: {status['setup']}"
    sig, code, cpu = status.get("signal"), status.get("exit"), status.get("cpu_s") or 0.0
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if sig is not None:
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= limits.cpu_s - 0.05):
            return "timeout", f"CPU time limit ({limits.cpu_s:g} s)"
        if sig == signal.SIGXFSZ:
            return "failed", f"file size limit ({limits.file_mb} MiB)"
        return "failed", f"killed by signal {signal.Signals(sig).name}"
    if code == 0:
        return "passed", "ok"
    if "MemoryError" in last or "MemoryError" in stderr[-400:]:
        return "failed", f"memory limit ({limits.memory_mb} MiB): {last}"
    if code is None:
        return "error", f"no status from the sandbox (launcher exit code {rc})"
    return "failed", f"exit code {code}: {last}" if last else f"exit code {code}"


def run_python(code: str, limits: Limits | None = None, mode: str | None = None) -> Result:
    """Run a Python program in the sandbox and report how it ended."""
    limits = limits or Limits()
    mode = mode or isolation_mode()
    base = Path(tempfile.mkdtemp(prefix="smoe-sbx-"))
    t0 = time.perf_counter()
    try:
        work = base / "work"
        work.mkdir()
        (base / "root").mkdir()
        (work / "program.py").write_text(code, encoding="utf-8")
        uid = UID_BASE + random.randrange(UID_SPAN)
        drop_uid = mode == "namespaces" or (os.geteuid() == 0 and _others_can_run(_python()))
        if drop_uid:  # the program runs as `uid`
            os.chown(work, uid, uid)
            os.chown(work / "program.py", uid, uid)
        cfg = {"mode": mode, "work": str(work), "root": str(base / "root"), "status": str(base / "status.json"),
               "program": "program.py", "python": _python(), "ro_paths": _ro_paths(), "uid": uid, "drop_uid": drop_uid,
               "cpu_s": limits.cpu_s, "memory_mb": limits.memory_mb, "max_procs": limits.max_procs,
               "file_mb": limits.file_mb, "open_files": limits.open_files, "tmp_mb": limits.tmp_mb}
        out, err = base / "stdout", base / "stderr"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen([_python(), "-I", "-S", "-B", str(LAUNCHER), json.dumps(cfg)],
                                    stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, cwd=str(base),
                                    start_new_session=True, close_fds=True, env={"PATH": "/usr/bin:/bin"})
            try:
                rc = proc.wait(timeout=limits.wall_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # the launcher's process group; its PID-namespace init dies with it and takes the rest
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                rc = proc.wait()
                if drop_uid:
                    _kill_uid(uid)
        wall = time.perf_counter() - t0
        stdout, stderr = _tail(out), _tail(err)
        try:
            status = json.loads((base / "status.json").read_text() or "{}")
        except (OSError, ValueError):
            status = {}
        if timed_out:
            kind, reason = "timeout", f"wall time limit ({limits.wall_s:g} s)"
        else:
            kind, reason = _classify(status, rc, stderr, limits)
        isolation = mode if drop_uid or os.geteuid() != 0 else "rlimits (as root: process count not limited)"
        return Result(kind, reason, status.get("exit"), stdout, stderr, wall, status.get("cpu_s"), isolation,
                      {"signal": status.get("signal"), "maxrss_kb": status.get("maxrss_kb")})
    finally:
        shutil.rmtree(base, ignore_errors=True)
