"""Shared fixtures. Files from ../shared are read in place (never copied); tests that need them skip
with the reason when ../shared is absent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PIPELINE_SHARED_DIR", ROOT.parent / "shared"))
LLAMA2_TOKENIZER = SHARED / "data" / "llama2-tokenizer" / "tokenizer.model"
GUANACO_QUESTIONS = SHARED / "data" / "guanaco" / "oa_questions.jsonl"
TGI_OPENAPI = SHARED / "data" / "tgi" / "openapi.json"


# Peak disk use under the temporary directory of one whole `pytest` session, measured (README): the
# full-width run and the 7B bench rehearsal each write several GB.
SESSION_DISK_GB = 12
BIG_DISK_TESTS = ("tests/test_full_width.py", "tests/test_bench.py::test_gpu_7b")


def pytest_collection_finish(session):
    """Refuse at the start, in one line, when the big runs cannot fit: a disk that fills mid-session
    otherwise shows as a hundred errors from module fixtures."""
    if not any(item.nodeid.startswith(BIG_DISK_TESTS) for item in session.items):
        return
    tmp = tempfile.gettempdir()
    free_gb = shutil.disk_usage(tmp).free / 1e9
    if free_gb < SESSION_DISK_GB:
        pytest.exit(
            f"{tmp}: {free_gb:.1f} GB free; these tests write up to about {SESSION_DISK_GB} GB there "
            "(free some, or point TMPDIR at a larger disk)",
            returncode=1,
        )


def need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"{path} is missing: these tests read ../shared (see ../shared/README.md)")
    return path


@pytest.fixture(scope="session")
def llama2_tokenizer_model() -> Path:
    return need(LLAMA2_TOKENIZER)


@pytest.fixture(scope="session")
def guanaco_records() -> list[dict]:
    with need(GUANACO_QUESTIONS).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def llama2_hf_dir(llama2_tokenizer_model, tmp_path_factory) -> Path:
    """The real Llama-2 tokenizer saved the project's way, with a Llama config.json beside it."""
    from transformers import LlamaConfig

    from pipeline.chat.tokenizer import build_tokenizer, save_tokenizer

    out = tmp_path_factory.mktemp("llama2-tokenizer")
    save_tokenizer(build_tokenizer(llama2_tokenizer_model), llama2_tokenizer_model, out)
    LlamaConfig(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def llamacpp():
    """llama.cpp's own programs and converter, as the README's set-up builds them. Not skipped when
    missing: the tests of the real engine must run, so a missing build is an error that says how to build."""
    from pipeline.engines.llamacpp import LlamaCpp

    native = LlamaCpp()
    native.tool("llama-server"), native.converter()  # raise, naming the build command, if absent
    return native


@pytest.fixture(scope="session")
def llama2_vocab_gguf(llama2_hf_dir, llamacpp, tmp_path_factory) -> Path:
    """A vocab-only GGUF of the real Llama-2 tokenizer, made by llama.cpp's converter."""
    from pipeline.engines.gguf import convert_to_gguf

    out = tmp_path_factory.mktemp("llama2-gguf") / "llama2-vocab.gguf"
    convert_to_gguf(llama2_hf_dir, out, vocab_only=True, llamacpp=llamacpp)
    return out


@pytest.fixture(scope="session")
def llama2_random_gguf(llama2_hf_dir, llamacpp, tmp_path_factory) -> Path:
    """A 1-layer random-weight Llama carrying the real Llama-2 tokenizer and the project's template, as
    an F16 GGUF: llama-server cannot load a vocab-only GGUF, and the ids only need the vocabulary."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.engines.gguf import convert_to_gguf

    hf_dir = tmp_path_factory.mktemp("llama2-random")
    shutil.copytree(llama2_hf_dir, hf_dir, dirs_exist_ok=True)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig.from_pretrained(llama2_hf_dir)).save_pretrained(hf_dir)
    out = hf_dir / "llama2-random-F16.gguf"
    convert_to_gguf(hf_dir, out, "f16", llamacpp=llamacpp)
    return out


# For a smoke stage rerun whose point is not vLLM: vLLM is proven live once, in the session's
# `tiny_run` (test_smoke.py::test_report_vllm_is_live_with_meta_ids), and its start-up is most of a
# tiny smoke stage (about 19 of 25 s). The report then says "not_run" for vLLM, with the reason.
WITHOUT_VLLM = "smoke.vllm.python=/vllm-not-started-for-this-test/bin/python"


def run_pipeline(*overrides: str, check: bool = True, timeout: int = 1800) -> subprocess.CompletedProcess:
    """`python -m pipeline <overrides>` in a subprocess, as a user runs it."""
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"pipeline {' '.join(overrides)} failed ({result.returncode}):\n{result.stderr[-4000:]}"
        )
    return result


def copy_run(tiny_run: Path, tmp_path: Path, without: tuple[str, ...] = ()) -> Path:
    """A private copy of the session's tiny run, for a test that reruns a stage: the shared run is
    never written to (training checkpoints left out: no later stage reads them)."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir, symlinks=True, ignore=shutil.ignore_patterns("checkpoints"))
    for name in without:
        shutil.rmtree(run_dir / name)
    return run_dir


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One full `stage=all experiment=tiny` run, shared by the tests that inspect its artifacts."""
    run_dir = tmp_path_factory.mktemp("tiny-run")
    run_pipeline("stage=all", "experiment=tiny", f"run_dir={run_dir}")
    return run_dir
