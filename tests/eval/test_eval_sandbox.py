"""The code sandbox: hostile programs are contained and reported as failures, good ones pass."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from smoe.eval.sandbox import UID_BASE, UID_SPAN, Limits, isolation_mode, run_python

pytestmark = pytest.mark.timeout(120)

TIGHT = Limits(wall_s=6, cpu_s=2, memory_mb=256, max_procs=6, file_mb=4)
REPO = Path(__file__).resolve().parents[2]


def sandbox_processes() -> list[int]:
    """Processes still running under a sandbox uid."""
    left = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                uid = os.stat(f"/proc/{d}").st_uid
            except OSError:
                continue
            if UID_BASE <= uid < UID_BASE + UID_SPAN:
                left.append(int(d))
    return left


def contained() -> bool:
    """Whether this machine's sandbox really bounds the process count (namespaces, or a non-root user)."""
    return isolation_mode() == "namespaces" or os.geteuid() != 0


def test_good_program_passes_bad_one_fails():
    r = run_python("import math\nprint(math.factorial(5))\nassert sum(range(4)) == 6\n", TIGHT)
    assert r.passed and r.stdout.strip() == "120", r
    r = run_python("def f(x):\n    return x + 1\nassert f(1) == 3, 'wrong'\n", TIGHT)
    assert r.status == "failed" and "AssertionError: wrong" in r.reason
    r = run_python("def f(:\n", TIGHT)
    assert r.status == "failed" and "SyntaxError" in r.reason


def test_infinite_loop_hits_cpu_limit():
    r = run_python("while True:\n    pass\n", TIGHT)
    assert r.status == "timeout" and "CPU time limit" in r.reason, r
    assert r.cpu_s is not None and r.cpu_s < TIGHT.cpu_s + 1.5


def test_sleeping_program_hits_wall_limit():
    r = run_python("import time\ntime.sleep(60)\n", Limits(wall_s=1.5, cpu_s=2))
    assert r.status == "timeout" and "wall time limit" in r.reason and r.wall_s < 5, r


@pytest.mark.parametrize("bomb", ["x = bytearray(8 * 2**30)\n", "a = []\nwhile True:\n    a.append(b'x' * 10**7)\n"])
def test_memory_bomb_contained(bomb):
    r = run_python(bomb, TIGHT)
    assert r.status == "failed" and r.reason.startswith("memory limit"), r


def test_fork_bomb_contained():
    if not contained():
        pytest.skip("as root without namespaces the sandbox cannot bound the process count")
    # the process limit holds exactly: the program itself plus max_procs - 1 children
    counter = ("import os, time\nn = 0\nwhile n < 1000:\n    try:\n        pid = os.fork()\n    except OSError:\n"
               "        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n    n += 1\nprint(n)\n")
    r = run_python(counter, TIGHT)
    assert r.passed and int(r.stdout) == TIGHT.max_procs - 1, r
    # a real bomb: contained, reported, and nothing left behind (the sleeping children above included)
    r = run_python("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                   Limits(wall_s=3, cpu_s=2, max_procs=6))
    assert not r.passed and r.status in ("timeout", "failed"), r
    assert sandbox_processes() == []


def test_writing_outside_the_temp_dir_is_refused(tmp_path):
    target = tmp_path / "escape.txt"
    for path in (str(target), "../escape.txt", str(REPO / "escape.txt")):
        r = run_python(f"open({path!r}, 'w').write('x')\n", TIGHT)
        assert r.status == "failed", (path, r)
    assert not target.exists() and not (REPO / "escape.txt").exists()
    # its own directory and /tmp are writable; big files are cut at the file-size limit
    assert run_python("open('out.txt', 'w').write('ok')\nopen('/tmp/t', 'w').write('ok')\n", TIGHT).passed
    r = run_python("open('big', 'wb').write(b'x' * (16 << 20))\n", TIGHT)
    assert r.status == "failed" and ("File too large" in r.reason or "file size" in r.reason), r


def test_evaluator_files_are_out_of_reach():
    if isolation_mode() != "namespaces":
        pytest.skip("a restricted file-system view needs namespaces")
    r = run_python(f"print(open({str(REPO / 'pyproject.toml')!r}).read())\n", TIGHT)
    assert r.status == "failed" and "No such file" in r.reason, r
    # a root of system libraries and the work dir; a /proc that shows only the sandbox's own processes
    r = run_python("import os\nprint(sorted(os.listdir('/')))\nprint(sum(d.isdigit() for d in os.listdir('/proc')))\n",
                   TIGHT)
    listing, procs = r.stdout.splitlines()
    assert r.passed and "'work'" in listing and "'home'" not in listing and "'work'" in listing, r
    assert int(procs) <= 2, r


def test_socket_is_refused():
    r = run_python("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\n", TIGHT)
    assert r.status == "failed" and "network access is disabled" in r.reason, r


def test_network_namespace_holds_without_the_audit_hook():
    if isolation_mode() != "namespaces":
        pytest.skip("needs a network namespace")
    # raw libc calls bypass Python's audit hooks; the empty network namespace still has no route
    prog = ("import ctypes, struct\nlibc = ctypes.CDLL(None, use_errno=True)\nfd = libc.socket(2, 1, 0)\n"
            "addr = struct.pack('!HH4s8x', 2, 80, bytes([1, 1, 1, 1]))\naddr = struct.pack('=H', 2) + addr[2:]\n"
            "r = libc.connect(fd, addr, len(addr))\nprint(fd >= 0, r, ctypes.get_errno())\n"
            "raise SystemExit(0 if r != 0 else 1)\n")
    r = run_python(prog, TIGHT)
    ok, ret, errno = r.stdout.split()
    assert ret == "-1" and int(errno) in (101, 113), r  # ENETUNREACH / EHOSTUNREACH


def test_rlimits_fallback_contains_loops_sockets_and_writes(tmp_path):
    mode = "rlimits"
    assert run_python("while True:\n    pass\n", TIGHT, mode=mode).status == "timeout"
    r = run_python("import socket\nsocket.socket()\n", TIGHT, mode=mode)
    assert "network access is disabled" in r.reason, r
    r = run_python(f"open({str(tmp_path / 'x')!r}, 'w')\n", TIGHT, mode=mode)
    assert "outside the work directory" in r.reason and not (tmp_path / "x").exists(), r
    assert run_python("open('ok.txt', 'w').write('fine')\nprint(1)\n", TIGHT, mode=mode).passed
