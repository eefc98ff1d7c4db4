"""experiment=guanaco_tiny: the whole pipeline on real parts (the 32,000-piece Llama-2 tokenizer and
the real guanaco conversations of ../shared, read in place), with the quant ladder against the F16
GGUF and the importance matrix from the training rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import GUANACO_QUESTIONS, LLAMA2_TOKENIZER, need, run_pipeline

from pipeline.chat.format import encode_dialog
from pipeline.chat.rows import read_jsonl
from pipeline.chat.tokenizer import load_tokenizer

# The long set (`pytest -m long`, a second command .ci/run also runs): see pyproject.toml.
pytestmark = pytest.mark.long

QUANTS = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "IQ4_XS"]
NAME = "tiny-llama2vocab-guanaco"


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    need(LLAMA2_TOKENIZER), need(GUANACO_QUESTIONS)
    run_dir = tmp_path_factory.mktemp("guanaco-tiny")
    run_pipeline("stage=all", "experiment=guanaco_tiny", f"run_dir={run_dir}")
    return run_dir


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


@pytest.mark.slow
def test_real_tokenizer_and_data_go_end_to_end(real_run):
    from llama_cpp import Llama

    m = manifest(real_run)
    assert m["config"]["data"]["path"].endswith("data/guanaco/oa_questions.jsonl")
    assert m["stages"]["data"]["metrics"]["rows_skipped"] == 0
    assert json.loads((real_run / "base" / "config.json").read_text())["vocab_size"] == 32000
    assert (real_run / "base" / "tokenizer.model").read_bytes() == LLAMA2_TOKENIZER.read_bytes()
    gguf = real_run / "gguf" / f"{NAME}-F16.gguf"
    llama = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    assert llama.n_vocab() == 32000
    llama.close()
    report = json.loads((real_run / "smoke" / "report.json").read_text())
    for section in ("transformers", "llamacpp", "llama_server", "vllm"):
        assert report[section]["status"] == "pass", section
    assert report["ladder"] == m["stages"]["ladder"]["metrics"]
    # Some guanaco prompts are longer than the 512-token context: those are not asked, 8 others are.
    assert report["questions"] == {"asked": 8, "context": 512, "max_tokens": 32}
    assert all(r["answers"] == 8 for r in report["llamacpp"]["in_process"].values())
    tokenizer = load_tokenizer(real_run / "merged")
    prompts = [row["messages"][:-1] for row in read_jsonl(real_run / "data" / "eval.jsonl")]
    assert [p for p in prompts if len(encode_dialog(p, tokenizer)) > 512 - 32]  # so the filter matters


@pytest.mark.slow
def test_training_lowers_held_out_answer_perplexity(real_run):
    ppl = json.loads((real_run / "metrics" / "train.json").read_text())["eval_perplexity"]
    assert ppl["rows"] > 0 and ppl["tokens"] > 1000
    assert ppl["trained"] < 0.8 * ppl["untrained_base"], ppl  # measured: 33,840 -> 21,286 (-37%)


@pytest.mark.slow
def test_the_ladder_covers_every_artifact_against_f16(real_run):
    ladder = manifest(real_run)["stages"]["ladder"]["metrics"]
    rungs = ladder["rungs"]
    expected = ["4-bit base + adapter", "merged", "GGUF F16", *(f"GGUF {q}" for q in QUANTS)]
    assert list(rungs) == expected
    for name, r in rungs.items():
        assert r["kl_mean"] >= 0 and r["kl_p99"] >= 0 and 0 < r["top1_agreement"] <= 1, name
        assert "delta_perplexity" in r and r["tokens"] == rungs["GGUF F16"]["tokens"] > 1000, name
    kl = {q: rungs[f"GGUF {q}"]["kl_mean"] for q in QUANTS}
    assert kl["Q8_0"] < kl["Q6_K"] < kl["Q4_K_M"] < kl["Q3_K_M"], kl  # fewer bits, further from F16
    sizes = [rungs[f"GGUF {q}"]["size_bytes"] for q in ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M")]
    assert sizes == sorted(sizes, reverse=True)
    assert set(ladder["imatrix"]["comparison"]) == set(QUANTS)
    card = (real_run / "gguf" / "README.md").read_text()
    assert all(f"| GGUF {q} |" in card for q in QUANTS) and "not Llama-2-7B" in card


@pytest.mark.slow
def test_imatrix_comes_from_training_rows_in_the_chat_format(real_run, llama2_vocab_gguf):
    """The calibration text is the training rows rendered with the template: tokenized as llama-imatrix
    does (BOS added, special tokens parsed) it is exactly the ids training saw, row after row; no eval
    row is in it."""
    from llama_cpp import Llama

    from pipeline.stages.quantize import calibration_text

    m = manifest(real_run)
    record = m["stages"]["quantize"]["metrics"]["imatrix"]
    assert record["calibration"] == "data/train.jsonl"
    assert record["calibration_sha256"] == m["stages"]["quantize"]["inputs"]["data/train.jsonl"]
    assert record["tokens"] > 0 and record["chunks"] > 0 and record["types"] == ["Q5_K_M", "IQ4_XS"]
    tokenizer = load_tokenizer(real_run / "merged")
    rows = read_jsonl(real_run / "data" / "train.jsonl")[:40]
    text, used = calibration_text(rows, tokenizer, max_tokens=10**9)
    llama = Llama(model_path=str(llama2_vocab_gguf), vocab_only=True, verbose=False)
    ids = llama.tokenize(text.encode(), add_bos=True, special=True)
    llama.close()
    assert ids == [t for row in rows for t in encode_dialog(row["messages"], tokenizer)]
    assert used == {"rows": 40, "tokens": len(ids)}
    everything, _ = calibration_text(
        read_jsonl(real_run / "data" / "train.jsonl"), tokenizer, max_tokens=10**9
    )
    answers = [row["messages"][-1]["content"] for row in read_jsonl(real_run / "data" / "eval.jsonl")]
    assert not [a for a in answers if len(a) > 40 and a in everything]
    gguf_files = manifest(real_run)["stages"]["quantize"]["metrics"]["files"]
    assert {t for t, f in gguf_files.items() if f["imatrix"]} == {"Q5_K_M", "IQ4_XS"}
