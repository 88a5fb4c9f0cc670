"""Server processes for notebooks, tests and benchmarks: ours (`llmnb serve`) and llama.cpp's (`llmnb serve-gguf`).

Each runs in its own process on a free port of 127.0.0.1 and is always stopped when the
`with` block ends, even on an error, so nothing is left behind. A server that fails to start
raises with the end of its log.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from .. import hardware


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A running server: its base URL (`url`, ending in /v1 for OpenAI clients at `api`), process and log."""

    def __init__(self, process: subprocess.Popen, port: int, log: Path):
        self.process, self.port, self.log = process, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.api = f"{self.url}/v1"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def health(self, headers: dict | None = None, timeout: float = 10) -> dict:
        """/health's answer; urllib.error.HTTPError unless it is 200."""
        with urllib.request.urlopen(urllib.request.Request(f"{self.url}/health", headers=headers or {}), timeout=timeout) as r:
            return json.loads(r.read())

    def wait_healthy(self, timeout: float, headers: dict | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                self.health(headers, timeout=2)  # raises until /health answers 200 (503 while the model loads)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the server did not become healthy in {timeout:.0f} s:\n{self.log_tail()}")

    def wait_step(self, timeout: float = 900, headers: dict | None = None) -> dict:
        """/health's answer once the decoding step is no longer "building" (`llmnb serve --compile` builds it in the
        background, minutes on 2 cores, serving eagerly meanwhile); its "step" then says "compiled" or "eager"."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode} while its step built:\n{self.log_tail()}")
            health = self.health(headers, timeout=10)
            if health.get("step") != "building":
                return health
            if time.monotonic() > deadline:
                raise TimeoutError(f"the compiled step was still building after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(1)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (the server drains its requests), then SIGKILL after `timeout` seconds."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def rss_bytes(self) -> int:
        """The server's resident memory now (`hardware.resident_bytes`, the benchmark's reader)."""
        return hardware.resident_bytes(self.process.pid)[0]


def die_with_parent() -> None:
    """In the child, before exec: Linux sends it SIGTERM when the process that started it dies (a killed kernel too)."""
    if sys.platform == "linux":
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _start(args: list[str], port: int, timeout: float, threads: int | None, log: Path | None) -> ServerProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log = log or Path(tempfile.mkstemp(prefix="llmnb-server-", suffix=".log")[1])
    with open(log, "w") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                   preexec_fn=die_with_parent)
    server = ServerProcess(process, port, log)
    atexit.register(server.stop)  # a notebook that stops early still leaves nothing running
    try:
        server.wait_healthy(timeout)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def _stopping(server: ServerProcess) -> Iterator[ServerProcess]:
    try:
        yield server
    finally:
        server.stop()


def start_server(model: str | Path, *options: str, port: int | None = None, timeout: float = 300, threads: int | None = None,
                 log: Path | None = None) -> ServerProcess:
    """`llmnb serve model ...` in a new process, returned once /health answers 200; stop it with `.stop()`."""
    port = port or free_port()
    args = [sys.executable, "-m", "llmnb", "serve", str(model), "--port", str(port), *options]
    return _start(args, port, timeout, threads, log)


def start_llama_cpp(gguf: str | Path, n_parallel: int = 8, context: int = 2048, threads: int | None = None,
                    port: int | None = None, timeout: float = 120, log: Path | None = None) -> ServerProcess:
    """llama.cpp's own server (xllamacpp) on a GGUF file, `n_parallel` slots of `context` tokens each; stop it with `.stop()`."""
    port = port or free_port()
    args = [sys.executable, "-m", "llmnb", "serve-gguf", str(gguf), "--port", str(port), "--parallel", str(n_parallel),
            "--context", str(context)] + (["--threads", str(threads)] if threads else [])
    return _start(args, port, timeout, threads, log)


def local_server(model: str | Path, *options: str, **kwargs):
    """`with local_server(model, "--max-batch", "16") as server:` runs `llmnb serve model ...` until the block ends."""
    return _stopping(start_server(model, *options, **kwargs))


def llama_cpp_process(gguf: str | Path, **kwargs):
    """`with llama_cpp_process(path, n_parallel=16) as server:` runs llama.cpp's server until the block ends."""
    return _stopping(start_llama_cpp(gguf, **kwargs))


def serve_gguf(path: str | Path, port: int, n_parallel: int, context: int, threads: int | None, host: str = "127.0.0.1") -> int:
    """Run llama.cpp's server (continuous batching, /metrics) on `path` until SIGTERM or SIGINT."""
    import xllamacpp

    if not Path(path).is_file():
        raise FileNotFoundError(f"no GGUF file at {path}: write one with llmnb.gguf.write_gguf (notebook 06)")
    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_parallel = n_parallel
    params.n_ctx = context * n_parallel  # llama.cpp splits its context between the slots
    params.cont_batching = True
    params.endpoint_metrics = True
    params.port = port
    params.hostnames = [host]
    params.warmup = False
    params.verbosity = -1
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads or os.cpu_count()
    server = xllamacpp.Server(params)  # listens until the object goes away
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"llama.cpp serving {path} at {server.listening_address}", flush=True)
    stop.wait()
    del server
    return 0
