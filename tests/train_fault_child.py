"""A child process for tests/test_training.py's fault tests: runs a list of training scenarios
(tiny model, one compile) and prints one JSON line per scenario. Faults are real: the parent
sends SIGINT / SIGTERM to this process while a scenario waits at a step (handshake through a
marker file), and a "disk full" is RLIMIT_FSIZE, so the checkpoint writer's background thread
gets EFBIG ("File too large") exactly as on a full disk.

    python tests/train_fault_child.py ROOT '[{"out": "a", "run": {"save_every": 1}, "signal_at": 2}, ...]'
"""

import dataclasses
import json
import pathlib
import resource
import signal
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_training import MODEL, OPTIM, RUN, batch, eval_windows  # noqa: E402

from titans_jax.training import train  # noqa: E402


def main(root: pathlib.Path, scenarios: list[dict]) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    for scenario in scenarios:
        def train_batch(step, scenario=scenario):
            if step == scenario.get("signal_at"):
                marker = root / "signal-me"
                marker.write_text(str(step))
                deadline = time.time() + 120
                while marker.exists() and time.time() < deadline:  # the parent signals, then removes it
                    time.sleep(0.01)
            if step == scenario.get("disk_full_at"):  # once the save of `step` steps is committed
                committed = root / scenario["out"] / "checkpoints" / str(step)
                deadline = time.time() + 120
                while not committed.exists() and time.time() < deadline:
                    time.sleep(0.01)
                resource.setrlimit(resource.RLIMIT_FSIZE, (scenario.get("file_limit", 4096), hard))
            return batch(step)

        run = dataclasses.replace(RUN, **scenario.get("run", {}))
        try:
            summary = train(MODEL, OPTIM, run, root / scenario["out"], train_batch, {"random": eval_windows},
                            meta={"tokenizer": "test"})
            result = {"summary": summary}
        except Exception as error:  # noqa: BLE001 - reported to the parent
            result = {"error": type(error).__name__, "message": str(error),
                      "chained": error.__cause__ is not None or not error.__suppress_context__}
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        print(json.dumps({"out": scenario["out"], **result}), flush=True)


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]), json.loads(sys.argv[2]))
