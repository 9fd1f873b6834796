"""Run untrusted Python (a model's solution + the task's unit tests) in a subprocess with
limits: wall time (the process group is killed), CPU seconds and address space
(resource.setrlimit, set by a few lines of Python in the child before it runs the code),
no core dumps, files of at most 16 MiB, a fresh temporary working directory, an empty environment and Python's isolated mode (-I: no site-packages of the
user, no PYTHON* variables). This bounds runaway solutions; it is not a security boundary
against a hostile one (the file system and the network stay reachable): run `yun eval`
on code tasks in a container when the models are not trusted.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

OUTPUT_LIMIT = 4000  # characters of stdout/stderr kept


@dataclass(frozen=True)
class SandboxResult:
    status: str  # "passed", "failed", "timeout", "memory"
    returncode: int | None
    stdout: str
    stderr: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The child applies its own limits, then runs the script: no preexec_fn (unsafe in a
# process with threads, as `yun eval`'s is).
_BOOT = """import resource, runpy, sys
cpu, mem = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
path = sys.argv[3]
sys.argv = [path]
runpy.run_path(path, run_name="__main__")
"""


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(code: str, timeout_s: float = 10.0, memory_mb: int = 512) -> SandboxResult:
    """Run `code` with `python -I`; passed when it exits 0 within the limits."""
    with tempfile.TemporaryDirectory(prefix="yun-eval-") as folder:
        script = os.path.join(folder, "solution_and_tests.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(code)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _BOOT, str(max(1, math.ceil(timeout_s))),
             str(memory_mb * 2**20), script],
            cwd=folder, env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            return SandboxResult("timeout", None, out[-OUTPUT_LIMIT:],
                                 f"killed after {timeout_s:g} s (wall time)\n{err[-OUTPUT_LIMIT:]}")
        _kill_group(proc)  # children it left behind
    rc = proc.returncode
    if rc == 0:
        status = "passed"
    elif rc == -signal.SIGXCPU or rc == -signal.SIGKILL:
        status = "timeout"
    elif "MemoryError" in err:
        status = "memory"
    else:
        status = "failed"
    return SandboxResult(status, rc, out[-OUTPUT_LIMIT:], err[-OUTPUT_LIMIT:])
