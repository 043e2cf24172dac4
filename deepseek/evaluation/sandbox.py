"""Run untrusted Python (model-generated code) in a child process with resource limits.

What it does: the source runs in a fresh interpreter (``python -I -S``: no PYTHON* variables, no user or site
packages, stdlib only), in its own empty temporary directory (removed afterwards) as cwd, with an explicit
environment (PATH, HOME and TMPDIR pointing into that directory, nothing inherited: no tokens or keys of the
parent), in a new session whose whole process group is killed at the wall-clock limit, under rlimits set before
the code starts: address space (memory), CPU seconds, file size (which also caps stdout/stderr, written to files),
process count, no core files. Hard and soft limits are equal, so the code cannot raise them again.

What it does NOT protect against: this is a resource and isolation boundary for the honest mistakes of generated
code (infinite loops, memory bombs, stray files), not a security jail. The code can open network connections,
read any file the user running us can read, and write outside its directory wherever that user can; as root,
RLIMIT_NPROC is ignored by the kernel, so a fork bomb is bounded only by the wall-clock kill of its process group.
For hostile code, run the evaluation in a container or VM without network (e.g. ``docker run --network none``
with a read-only root) as an unprivileged user, and call this inside it.

The limits are applied by a tiny launcher that sets them and then ``exec``s the program, rather than by
``preexec_fn``, which is not safe while other threads run (evaluation runs sandboxes from a thread pool).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

Status = Literal["passed", "failed", "timeout", "memory", "error"]

# argv: memory bytes, cpu seconds, file-size bytes, process count (-1 = leave), program path.
_LAUNCHER = """\
import os, resource, sys
mem, cpu, fsize, nproc = map(int, sys.argv[1:5])
limits = [(resource.RLIMIT_AS, mem, mem), (resource.RLIMIT_CPU, cpu, cpu + 1),
          (resource.RLIMIT_FSIZE, fsize, fsize), (resource.RLIMIT_CORE, 0, 0)]
if nproc >= 0:
    limits.append((resource.RLIMIT_NPROC, nproc, nproc))
for which, soft, hard in limits:
    resource.setrlimit(which, (soft, hard))
os.execv(sys.executable, [sys.executable, "-I", "-S", sys.argv[5]])
"""

_MEMORY_MARKERS = ("MemoryError", "Cannot allocate memory", "out of memory")


@dataclass(frozen=True)
class ExecutionResult:
    """The verdict of one sandboxed run.

    status: ``passed`` (exit 0), ``failed`` (non-zero exit: an exception, a failed assertion, a syntax error),
    ``timeout`` (wall-clock or CPU limit), ``memory`` (MemoryError or a failed allocation under the memory limit),
    ``error`` (killed by another signal, e.g. a segfault, or the sandbox could not start it). Output over the
    file-size cap is ``failed``: CPython ignores SIGXFSZ, so the write raises OSError (File too large).
    returncode: the child's exit status (negative: killed by that signal; None if it never started).
    stdout, stderr: the last ``tail_chars`` characters of each. seconds: wall-clock time of the run.
    """

    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


def _tail(path: str, chars: int) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4 * chars))
        return f.read().decode("utf-8", "replace")[-chars:]


def run_python(source: str, *, timeout_s: float = 5.0, memory_mb: int = 512, cpu_s: float | None = None,
               max_output_bytes: int = 1 << 20, max_processes: int = 16, tail_chars: int = 4000) -> ExecutionResult:
    """Run ``source`` as ``__main__`` in a sandboxed subprocess (see the module docstring) and classify the outcome.

    timeout_s: wall-clock limit; the whole process group is SIGKILLed when it passes. memory_mb: RLIMIT_AS.
    cpu_s: RLIMIT_CPU (default: the wall-clock limit rounded up, plus one). max_output_bytes: RLIMIT_FSIZE, the
    most any file, stdout and stderr included, may grow to. max_processes: RLIMIT_NPROC (per user; ignored for
    root). Never raises for anything the code does; a failure to launch is status ``error``.
    """
    cpu = math.ceil(cpu_s if cpu_s is not None else timeout_s + 1)
    with tempfile.TemporaryDirectory(prefix="ds-sandbox-", ignore_cleanup_errors=True) as work:
        program, out_path, err_path = (os.path.join(work, name) for name in ("main.py", "stdout", "stderr"))
        with open(program, "w", encoding="utf-8") as f:
            f.write(source)
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
               "PYTHONIOENCODING": "utf-8"}  # -I ignores PYTHON* variables; kept for a child that re-enables them
        argv = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(memory_mb << 20), str(cpu), str(max_output_bytes),
                str(max_processes), program]
        start = time.monotonic()
        timed_out = False
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        start_new_session=True, close_fds=True)
            except OSError as e:
                return ExecutionResult("error", None, "", f"sandbox could not start: {e}", time.monotonic() - start)
            # Wait without reaping (WNOWAIT): while the child is alive or a zombie its pid, which is also its
            # process group's id, cannot be reused, so the group kill below can only hit the code's own processes
            # (what it left running after exiting, or everything at the timeout).
            deadline, delay = start + timeout_s, 0.0005
            while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                delay = min(2 * delay, remaining, 0.05)
                time.sleep(delay)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        seconds = time.monotonic() - start
        stdout, stderr = _tail(out_path, tail_chars), _tail(err_path, tail_chars)
    code = proc.returncode
    # SIGKILL we did not send: the CPU hard limit (or the kernel's OOM killer, which RLIMIT_AS normally pre-empts)
    if timed_out or code in (-signal.SIGXCPU, -signal.SIGKILL):
        status = "timeout"
    elif code == 0:
        status = "passed"
    elif any(marker in stderr for marker in _MEMORY_MARKERS):
        status = "memory"
    elif code > 0:
        status = "failed"
    else:
        status = "error"
    return ExecutionResult(status, code, stdout, stderr, seconds)
