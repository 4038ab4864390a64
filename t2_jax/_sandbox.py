"""Run untrusted Python (generated code and its tests) in an isolated, limited, throw-away process.

    from t2_jax import run_python, SandboxLimits
    result = run_python("print(sum(range(10)))", SandboxLimits(wall_s=5))
    result.status, result.stdout          # "ok", "45\\n"

Generated code is untrusted input. Each call:
- writes the source into a fresh temporary directory (the only place the program may write),
  which is removed afterwards whatever happened;
- starts the base interpreter (standard library only) as `python -I -B main.py` there through t2_jax._sandbox_launcher, which puts it in new
  user and network namespaces (no capability outside them, nothing reachable), sets limits on
  address space, CPU seconds, file size and open files, forbids new privileges, confines writes,
  TCP, signals and abstract sockets with Landlock (reads too: only the interpreter's
  installation and the system libraries) and process creation with seccomp (fork and
  threads fail) -- the launcher's docstring gives the details;
- gives it a minimal environment (no inherited variables) and no stdin unless given;
- waits at most `wall_s`, then kills its whole session; stdout and stderr go to files outside
  the sandbox, capped by the file-size limit and read back up to `output_bytes`.

A machine that cannot give one of these layers (no Landlock ABI >= 6, no user namespaces)
raises SandboxUnavailableError naming it: untrusted code is never run half-isolated.
Linux only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAUNCHER = Path(__file__).with_name("_sandbox_launcher.py")
EXIT_SANDBOX_FAILED = 97  # the launcher's exit code when it cannot isolate (kept in step with it)


class SandboxUnavailableError(RuntimeError):
    """This machine cannot isolate untrusted code (the message names the missing layer)."""


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 10.0  # wall-clock time, then the whole session is killed
    cpu_s: int = 10  # CPU seconds (SIGXCPU, then SIGKILL one second later)
    memory_bytes: int = 1 << 30  # address space (CPython itself maps ~30 MB)
    file_bytes: int = 16 << 20  # largest file written, stdout and stderr included
    output_bytes: int = 64 << 10  # how much of stdout / stderr is read back
    open_files: int = 64

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SandboxLimits.{field.name} must be a positive number, got {value!r}")
        if self.memory_bytes < 64 << 20:
            raise ValueError(f"SandboxLimits.memory_bytes = {self.memory_bytes} is too small for CPython (>= 64 MiB)")


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """status: ok (exit 0) | error (an exception or a non-zero exit) | timeout (wall or CPU limit)
    | memory (MemoryError at the address-space limit) | output_limit (file-size limit).
    pid (= its session id) and directory say where it ran, for audits: both are gone on return."""
    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    pid: int
    directory: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _interpreter() -> str:
    """The base interpreter, not a virtual environment's: untrusted code gets the standard
    library only, and nothing of the caller's environment is read."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _read_paths() -> list[str]:
    """What the interpreter needs to read: its installation and the system's shared libraries."""
    paths = [sys.base_prefix, _interpreter(), "/usr", "/lib", "/lib64", "/lib32", "/bin",
             "/etc/ld.so.cache", "/etc/localtime", "/dev/null", "/dev/urandom"]
    return sorted({os.path.realpath(p) for p in paths if os.path.exists(p)})


def _session_processes(session: int) -> list[int]:
    """Pids whose session id is `session` (what is left of a sandboxed run)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if int(fields[3]) == session:  # state ppid pgrp session
            found.append(int(entry))
    return found


def _kill_session(session: int) -> None:
    try:
        os.killpg(session, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _status(returncode: int | None, timed_out: bool, stderr: str) -> str:
    if timed_out or returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "timeout"
    last = stderr.strip().splitlines()[-1:] or [""]
    if returncode == -signal.SIGXFSZ or "[Errno 27]" in last[0]:  # CPython ignores SIGXFSZ: EFBIG
        return "output_limit"
    if returncode == 0:
        return "ok"
    if last[0].startswith("MemoryError"):
        return "memory"
    return "error"


def run_python(source: str, limits: SandboxLimits = SandboxLimits(), stdin: str | None = None) -> SandboxResult:
    """Run `source` as a Python program in the sandbox; see the module docstring."""
    if not isinstance(source, str):
        raise TypeError(f"source must be a str, got {type(source).__name__}")
    if not sys.platform.startswith("linux"):
        raise SandboxUnavailableError(f"the sandbox needs Linux (namespaces, Landlock); this is {sys.platform}")
    box = Path(tempfile.mkdtemp(prefix="t2-sandbox-"))
    private = Path(tempfile.mkdtemp(prefix="t2-sandbox-out-"))  # the program cannot open it: outside its box
    try:
        (box / "main.py").write_text(source, encoding="utf-8")
        spec = {"memory_bytes": int(limits.memory_bytes), "file_bytes": int(limits.file_bytes),
                "open_files": int(limits.open_files), "cpu_s": int(limits.cpu_s), "read_paths": _read_paths()}
        command = [sys.executable, "-I", "-S", str(LAUNCHER), json.dumps(spec), "--",
                   _interpreter(), "-I", "-B", "main.py"]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(box), "TMPDIR": str(box)}
        with open(private / "stdout", "wb") as out, open(private / "stderr", "wb") as err:
            start = time.monotonic()
            process = subprocess.Popen(command, cwd=box, env=env, stdout=out, stderr=err, close_fds=True,
                                       stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                       start_new_session=True)
            timed_out = False
            try:
                process.communicate(None if stdin is None else stdin.encode(), timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_session(process.pid)  # the program and anything it left behind
                process.wait()
            wall = time.monotonic() - start
        read = lambda name: (private / name).read_bytes()[:limits.output_bytes].decode("utf-8", "replace")  # noqa: E731
        stdout, stderr = read("stdout"), read("stderr")
        if process.returncode == EXIT_SANDBOX_FAILED and stderr.startswith("sandbox:"):
            raise SandboxUnavailableError(stderr.strip())
        return SandboxResult(_status(process.returncode, timed_out, stderr), process.returncode, stdout, stderr, wall,
                             process.pid, str(box))
    finally:
        shutil.rmtree(box, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)
