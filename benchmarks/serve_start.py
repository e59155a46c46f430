"""Time `clipstyle serve`: process start to the first answer, and SIGTERM to exit.

    python benchmarks/serve_start.py [RUNS]

The models are the real architectures (CLIP ViT-B/32, VGG-19) with random
weights, so nothing is downloaded; reading the real weights from the caches
adds what `clipstyle bench --cached` reports. Also times importing the web
layer alone (Starlette, uvicorn and clipstyle.serve). Prints medians.
"""

from __future__ import annotations

import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

CHILD = """
import sys, time
import clipstyle.cli.serve as serve
from clipstyle.models.loading import load_models
from clipstyle.serve.jobs import JobQueue

def loader(*args, device="auto", **kwargs):
    models = load_models(device="cpu", random_init=True)
    print("loaded", time.monotonic(), flush=True)
    return models

close = JobQueue.close

def closed(self, timeout=None):
    close(self, timeout)
    print("closed", time.monotonic(), flush=True)

serve.load_models_from_options, JobQueue.close = loader, closed
from clipstyle.cli import main
main(["serve", "--port", sys.argv[1], "--folder", sys.argv[2]])
"""
IMPORTS = (
    "import time; t = time.perf_counter(); import uvicorn, starlette.applications, clipstyle.serve.app; "
    "print(time.perf_counter() - t)"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(folder: str) -> dict[str, float]:
    """Seconds from process start, and from the models being loaded, to the first answer; from
    SIGTERM to the server stopped (queue closed) and to the process gone. time.monotonic is one
    clock for every process of the machine."""
    port = free_port()
    start = time.monotonic()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(port), folder], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/config", timeout=5):
                break
        except OSError:
            if child.poll() is not None:
                raise SystemExit("the server exited before answering") from None
            time.sleep(0.01)
    answered = time.monotonic()
    child.send_signal(signal.SIGTERM)
    out = child.communicate(timeout=120)[0]
    gone = time.monotonic()
    marks = {line.split()[0]: float(line.split()[1]) for line in out.splitlines() if line.strip()}
    return {
        "start to first answer": answered - start,
        "models loaded to first answer": answered - marks["loaded"],
        "SIGTERM to server stopped": marks["closed"] - answered,
        "SIGTERM to process gone": gone - answered,
    }


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    imports = [
        float(subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, check=True).stdout)
        for _ in range(runs)
    ]
    with tempfile.TemporaryDirectory() as folder:
        runs_ = [one_run(folder) for _ in range(runs)]
    print(f"import web layer: {statistics.median(imports):.2f} s")
    for key in runs_[0]:
        print(f"{key}: {statistics.median(r[key] for r in runs_):.2f} s")


if __name__ == "__main__":
    main()
