"""Servers on 127.0.0.1 for the smoke stage and the tests: start, wait until they answer, talk
JSON and server-sent events to them, and always stop them (they also die with the pipeline)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.engines.llamacpp import LlamaCpp
from pipeline.machine.processes import die_with_parent
from pipeline.run.errors import ToolFailed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 120) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def http_sse(url: str, body: dict, timeout: float = 120) -> list[dict]:
    """The `data:` events of a server-sent-events stream, up to `[DONE]`."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    events = []
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            payload = line[len("data:") :].strip()
            if payload == "[DONE]":
                break
            events.append(json.loads(payload))
    return events


def wait_until_up(url: str, process: subprocess.Popen | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ToolFailed(f"server exited with code {process.returncode} before answering {url}")
        try:
            urllib.request.urlopen(url, timeout=5).read()
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise ToolFailed(f"no answer from {url} within {timeout:.0f} s")


@contextlib.contextmanager
def serve(command: list[str], base_url: str, log_path: Path, timeout: float = 120, env: dict | None = None):
    """Run a server command until the block ends; it answers `{base_url}/v1/models` before entry."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:  # a file, not a pipe: a full pipe would stall the server
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent, env=env
        )
    try:
        try:
            wait_until_up(f"{base_url}/v1/models", process, timeout=timeout)
        except ToolFailed as err:
            raise ToolFailed(f"{err}; server log:\n{log_path.read_text(errors='replace')[-2000:]}") from err
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def serve_gguf(gguf: Path, n_ctx: int, log_path: Path):
    """llama-cpp-python's OpenAI-compatible server on a free 127.0.0.1 port, always shut down after.

    No --chat_format: the server then renders the GGUF's own `tokenizer.chat_template`."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--seed",
        "0",
    ]
    return serve(command, f"http://127.0.0.1:{port}", log_path)


def serve_llama_server(gguf: Path, log_path: Path, llamacpp: LlamaCpp, extra_args: tuple[str, ...] = ()):
    """llama.cpp's own `llama-server` on a free 127.0.0.1 port with its default flags (Jinja on, the
    GGUF's `tokenizer.chat_template`), always shut down after; `extra_args` such as `--no-jinja`."""
    port = free_port()
    command = [
        str(llamacpp.tool("llama-server")),
        "--model",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    return serve(command + list(extra_args), f"http://127.0.0.1:{port}", log_path)


def serve_vllm(
    model_dir: Path, python: Path, log_path: Path, max_model_len: int, timeout: float, dtype: str = "float32"
):
    """vLLM's OpenAI-compatible server (its own venv's `python`, see `pipeline.engines.vllm`) on a free
    127.0.0.1 port, serving the HF directory `model_dir` with its own chat template; shut down after."""
    from pipeline.engines import vllm

    port = free_port()
    command = vllm.server_command(python, model_dir, port, max_model_len, dtype)
    env = vllm.server_env(log_path.parent / "vllm-cache")
    return serve(command, f"http://127.0.0.1:{port}", log_path, timeout=timeout, env=env)
