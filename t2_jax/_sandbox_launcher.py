"""Runs inside the sandbox's fresh process (see t2_jax._sandbox): isolate, limit, then exec.

    python -I -S _sandbox_launcher.py '<json spec>' -- <python> -I main.py

Started single-threaded by the parent with cwd = the sandbox directory; it applies, in order:
1. a new user namespace and a new network namespace: the process keeps its uid (so it can read
   the interpreter wherever it is installed, /root/.pyenv included) but holds no capability
   outside its namespace (no reboot, modules, raw I/O, clock, ...), and no network interface is
   up (nothing, not even localhost, is reachable);
2. resource limits: address space, CPU seconds, file size, open files, no core dumps, no
   processes (RLIMIT_NPROC = 0; root's uid is exempt from it, hence 5);
3. no new privileges;
4. Landlock: reads and execution only of the interpreter's installation, the system
   libraries and the sandbox directory (not the caller's files, keys or data), writes (create,
   remove, rename, truncate, write) only beneath the sandbox directory, no TCP bind/connect, no signals or abstract unix sockets outside the sandbox
   (ptrace and mounts outside the domain are refused by Landlock itself);
5. seccomp: clone / clone3 / fork / vfork fail with EPERM (no processes, no threads), and any
   other architecture's system-call convention (x32) kills the process;
and then execs the program. Any step that fails exits with code 97 and one line on stderr
starting "sandbox:" -- the caller refuses to run untrusted code half-isolated.

Only the standard library (ctypes, os, resource): this file runs with -S, before any isolation
that a site import could see.
"""

import ctypes
import json
import os
import resource
import sys

EXIT_SANDBOX_FAILED = 97
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
# seccomp: audit architecture -> the process-creating system calls
PROCESS_SYSCALLS = {0xC000003E: (56, 57, 58, 435),  # x86_64: clone, fork, vfork, clone3
                    0xC00000B7: (220, 435)}  # aarch64: clone, clone3
X32_SYSCALL_BIT = 0x40000000
# Landlock (include/uapi/linux/landlock.h); the syscall numbers are the same on every architecture.
SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_REMOVE_DIR, FS_REMOVE_FILE = 1 << 4, 1 << 5
FS_MAKE_CHAR, FS_MAKE_DIR, FS_MAKE_REG, FS_MAKE_SOCK = 1 << 6, 1 << 7, 1 << 8, 1 << 9
FS_MAKE_FIFO, FS_MAKE_BLOCK, FS_MAKE_SYM, FS_REFER, FS_TRUNCATE = 1 << 10, 1 << 11, 1 << 12, 1 << 13, 1 << 14
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1


class RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def fail(what: str, detail) -> None:
    os.write(2, f"sandbox: cannot {what}: {detail}\n".encode())
    os._exit(EXIT_SANDBOX_FAILED)


def check(libc, result: int, what: str) -> int:
    if result < 0:
        fail(what, os.strerror(ctypes.get_errno()))
    return result


def add_path(libc, ruleset: int, path: str, access: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    if not os.path.isdir(path):  # a file takes only the file rights
        access &= FS_EXECUTE | FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE
    rule = PathBeneathAttr(access, fd)
    check(libc, libc.syscall(SYS_ADD_RULE, ruleset, RULE_PATH_BENEATH, ctypes.byref(rule), ctypes.c_uint32(0)),
          f"add {path} to the Landlock ruleset")
    os.close(fd)


def landlock(libc, directory: str, read_paths) -> None:
    """Reads and execution only beneath `directory` and `read_paths` (the interpreter, the system
    libraries), writes only beneath `directory`; no TCP; scoped signals and abstract sockets."""
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION))
    if abi < 6:
        fail("restrict the filesystem with Landlock",
             f"the kernel offers Landlock ABI {abi} (errno {os.strerror(ctypes.get_errno()) if abi < 0 else '-'}); "
             "version 6 (Linux 6.12) or later is needed")
    write = (FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_CHAR | FS_MAKE_DIR | FS_MAKE_REG
             | FS_MAKE_SOCK | FS_MAKE_FIFO | FS_MAKE_BLOCK | FS_MAKE_SYM | FS_REFER | FS_TRUNCATE)
    read = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
    attr = RulesetAttr(write | read, NET_BIND_TCP | NET_CONNECT_TCP, SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL)
    ruleset = check(libc, libc.syscall(SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
                                       ctypes.c_uint32(0)), "create a Landlock ruleset")
    add_path(libc, ruleset, directory, read | write & ~(FS_MAKE_CHAR | FS_MAKE_BLOCK | FS_MAKE_SOCK | FS_MAKE_FIFO))
    for path in read_paths:
        add_path(libc, ruleset, path, read)
    check(libc, libc.syscall(SYS_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)), "enforce the Landlock ruleset")
    os.close(ruleset)


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def seccomp_no_processes(libc) -> None:
    """A classic-BPF filter: on this machine's architecture, EPERM for the process-creating
    calls and allow the rest; anything else is killed."""
    arch = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}.get(os.uname().machine)
    if arch is None:
        fail("forbid new processes with seccomp", f"no system-call table for {os.uname().machine}")
    ld_abs, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    kill, allow, eperm = 0x80000000, 0x7FFF0000, 0x00050000 | 1
    calls = PROCESS_SYSCALLS[arch]
    program = [(ld_abs, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill), (ld_abs, 0, 0, 0)]
    if arch == 0xC000003E:
        program += [(jge, 0, 1, X32_SYSCALL_BIT), (ret, 0, 0, kill)]
    for index, number in enumerate(calls):  # jump to the EPERM at the end, past the remaining tests
        program.append((jeq, len(calls) - index, 0, number))
    program += [(ret, 0, 0, allow), (ret, 0, 0, eperm)]
    filters = (SockFilter * len(program))(*[SockFilter(*op) for op in program])
    fprog = SockFprog(len(program), filters)
    check(libc, libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0),
          "install the seccomp filter")


def main() -> None:
    spec = json.loads(sys.argv[1])
    program = sys.argv[sys.argv.index("--") + 1:]
    libc = ctypes.CDLL(None, use_errno=True)
    # 1. capabilities and network
    check(libc, libc.unshare(CLONE_NEWUSER | CLONE_NEWNET), "enter new user and network namespaces")
    # 2. resources
    try:
        limits = [(resource.RLIMIT_AS, spec["memory_bytes"]), (resource.RLIMIT_FSIZE, spec["file_bytes"]),
                  (resource.RLIMIT_NOFILE, spec["open_files"]), (resource.RLIMIT_CORE, 0),
                  (resource.RLIMIT_NPROC, 0)]
        for which, value in limits:
            resource.setrlimit(which, (value, value))
        resource.setrlimit(resource.RLIMIT_CPU, (spec["cpu_s"], spec["cpu_s"] + 1))  # SIGXCPU, then SIGKILL
    except (ValueError, OSError) as error:
        fail("set resource limits", error)
    # 3.-5. privileges, filesystem, TCP, signals, processes
    check(libc, libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "set no_new_privs")
    landlock(libc, os.getcwd(), spec["read_paths"])
    seccomp_no_processes(libc)
    try:
        os.execv(program[0], program)
    except OSError as error:
        fail(f"exec {program[0]}", error)


if __name__ == "__main__":
    main()
