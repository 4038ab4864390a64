"""The sandbox for generated code and the rewards built on it: hostile programs are contained
(loops, unbounded allocation, writes and reads outside, sockets, forks, threads, signals), leave
no process or directory behind, and the machine refuses to run code it cannot isolate."""

import os
import socket
import threading

import pytest

from t2_jax import _sandbox
from t2_jax._rewards import code_reward, extract_code, extract_number, gold_number, numeric_reward
from t2_jax._sandbox import SandboxLimits, SandboxUnavailableError, run_python

FAST = SandboxLimits(wall_s=4.0, cpu_s=2, memory_bytes=256 << 20, file_bytes=1 << 20, output_bytes=4096)


@pytest.fixture(scope="module")
def sandbox():
    try:
        result = run_python("print('ready')", FAST)
    except SandboxUnavailableError as error:  # the reason is the launcher's own line
        pytest.skip(f"this machine cannot isolate untrusted code: {error}")
    assert result.ok and result.stdout == "ready\n", result


def _gone(result):
    assert not os.path.exists(result.directory), "the sandbox directory was left behind"
    assert _sandbox._session_processes(result.pid) == [], "a sandboxed process was left behind"


def test_a_program_runs_writes_its_own_directory_and_leaves_nothing(sandbox):
    result = run_python("open('notes.txt', 'w').write('kept'); print(open('notes.txt').read(), 6 * 7)", FAST)
    assert result.status == "ok" and result.returncode == 0 and result.stdout == "kept 42\n"
    _gone(result)


def test_a_program_that_loops_forever_is_stopped_at_its_cpu_or_wall_limit(sandbox):
    spin = run_python("while True:\n    pass\n", FAST)
    sleep = run_python("import time\ntime.sleep(60)\n", FAST)  # uses no CPU: the wall limit
    assert spin.status == sleep.status == "timeout"
    assert sleep.wall_s >= FAST.wall_s  # the wall limit, not an early exit (no upper bound: a busy machine)
    _gone(spin)
    _gone(sleep)


def test_a_program_that_allocates_without_bound_hits_the_memory_limit(sandbox):
    result = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))\n", FAST)
    assert result.status == "memory", result
    _gone(result)


def test_writes_and_reads_outside_its_directory_are_refused(sandbox, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the caller's data")
    os.chmod(tmp_path, 0o777)  # even a world-writable directory stays closed
    target = tmp_path / "planted.txt"
    write = run_python(f"open({str(target)!r}, 'w').write('x')", FAST)
    remove = run_python(f"import os\nos.remove({str(secret)!r})", FAST)
    read = run_python(f"print(open({str(secret)!r}).read())", FAST)
    for result in (write, remove, read):
        assert result.status == "error" and "PermissionError" in result.stderr, result
        _gone(result)
    assert not target.exists() and secret.read_text() == "the caller's data"


def test_sockets_reach_nothing_not_even_a_listener_on_this_machine(sandbox):
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    port = listener.getsockname()[1]
    accepted = []

    def accept():
        try:
            accepted.append(listener.accept())
        except OSError:
            pass

    try:
        tcp = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)", FAST)
        udp = run_python("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                         "s.sendto(b'x', ('8.8.8.8', 53))", FAST)
        thread = threading.Thread(target=accept)
        thread.start()
        thread.join()
    finally:
        listener.close()
    assert tcp.status == udp.status == "error" and not accepted
    assert "PermissionError" in tcp.stderr or "unreachable" in tcp.stderr
    assert "unreachable" in udp.stderr


@pytest.mark.parametrize("source", [
    "import os\nif os.fork() == 0:\n    import time\n    time.sleep(60)\n",
    "import subprocess\nsubprocess.Popen(['sleep', '60'])\n",
    "import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()\n",
], ids=["fork", "subprocess", "thread"])
def test_a_program_cannot_start_processes_or_threads(sandbox, source):
    result = run_python(source, FAST)
    assert result.status == "error", result
    _gone(result)


def test_a_program_cannot_signal_processes_outside(sandbox):
    result = run_python(f"import os, signal\nos.kill({os.getpid()}, signal.SIGTERM)\n", FAST)
    assert result.status == "error" and "PermissionError" in result.stderr


def test_output_is_capped(sandbox):
    result = run_python("import sys\nsys.stdout.write('y' * (4 << 20))\n", FAST)
    assert result.status == "output_limit" and len(result.stdout) == FAST.output_bytes


def test_a_machine_that_cannot_isolate_refuses_to_run_code(monkeypatch, tmp_path):
    launcher = tmp_path / "launcher.py"
    launcher.write_text("import os, sys\nos.write(2, b'sandbox: cannot enter new user and network namespaces: "
                        "Operation not permitted\\n')\nsys.exit(97)\n")
    monkeypatch.setattr(_sandbox, "LAUNCHER", launcher)
    with pytest.raises(SandboxUnavailableError, match="cannot enter new user and network namespaces"):
        run_python("print('never')", FAST)


def test_bad_limits_and_sources_are_refused():
    with pytest.raises(ValueError, match="wall_s"):
        SandboxLimits(wall_s=0)
    with pytest.raises(ValueError, match="memory_bytes"):
        SandboxLimits(memory_bytes=1 << 20)
    with pytest.raises(TypeError, match="source must be a str"):
        run_python(b"print(1)")


def test_code_reward_runs_the_answer_against_its_tests(sandbox):
    tests = "assert add(1, 2) == 3\nassert add(-1, 1) == 0"
    assert code_reward("```python\ndef add(a, b):\n    return a + b\n```\nThis adds.", tests, limits=FAST) == 1.0
    assert code_reward("def add(a, b):\n    return a - b\n", tests, limits=FAST) == 0.0
    assert code_reward("def add(a, b):\n    while True:\n        pass\n", tests, limits=FAST) == 0.0
    # HumanEval's form: the prompt is the prefix, the answer its continuation
    prefix = "def add(a, b):\n    \"\"\"Sum.\"\"\"\n"
    assert code_reward("    return a + b\n", "def check(f):\n    assert f(2, 2) == 4\ncheck(add)", prefix,
                       limits=FAST) == 1.0


def test_code_extraction():
    assert extract_code("Here:\n```python\nx = 1\n```\nand ```py\ny = 2\n```") == "x = 1\n"
    assert extract_code("```\nz = 3\n") == "z = 3\n"  # an unclosed fence runs to the end
    assert extract_code("w = 4") == "w = 4"


def test_numeric_reward_reads_the_last_number_exactly():
    assert numeric_reward("3 apples and 15 pears make 18.", "She has #### 18") == 1.0
    assert numeric_reward("The answer is $1,234.00", "1234") == 1.0
    assert numeric_reward("half: 1/2", "0.5") == 1.0
    assert numeric_reward("It is 18 or maybe 19", "18") == 0.0
    assert numeric_reward("no number here", "18") == 0.0
    assert extract_number("-2.50 degrees") == extract_number("-5/2") == extract_number(r"x = -\dfrac{5}{2}")
    # a final \boxed{} is the answer: its number, or none when it holds something else
    assert numeric_reward(r"so $\boxed{\frac{3}{4}}$, not 7", "0.75") == 1.0
    assert numeric_reward(r"\boxed{30^\circ} from 4 angles", "30") == 1.0
    assert extract_number(r"\boxed{x + 1} where x is 5") is None
    with pytest.raises(ValueError, match="not a number"):
        gold_number("eighteen")
