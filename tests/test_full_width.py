"""Llama-2-7B's full width through every stage: `experiment=llama2_7b_shape` cut to 2 of its 32
layers (hidden 4096, intermediate 11008, 32 heads, vocab 32000, r=64 LoRA on every linear layer,
NF4 with double quantization), with the real tokenizer and guanaco rows from ../shared. The 32-layer
run is `bench/full_scale.py` (docs/full_scale.md); this is the same path at a depth CI can afford."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from conftest import GUANACO_QUESTIONS, LLAMA2_TOKENIZER, need, run_pipeline

# The long set (`pytest -m long`, a second command .ci/run also runs): see pyproject.toml.
pytestmark = pytest.mark.long

STAGES = ("data", "train", "merge", "convert", "quantize", "ladder", "smoke")
SHARD = 300_000_000  # small shards, so the base is written in several and the merge check offloads


@pytest.fixture(scope="module")
def full_width_run(tmp_path_factory):
    need(LLAMA2_TOKENIZER), need(GUANACO_QUESTIONS)
    run_dir = tmp_path_factory.mktemp("full-width")
    result = run_pipeline(
        "stage=all",
        "experiment=llama2_7b_shape",
        "model.tiny.num_hidden_layers=2",
        "model.tiny.max_shard_size=300MB",
        "merge.max_shard_size=300MB",
        f"run_dir={run_dir}",
        timeout=1800,
    )
    yield run_dir, result.stdout
    shutil.rmtree(run_dir, ignore_errors=True)  # about 5 GB; the other big runs must find the space


def test_the_base_has_llama2_7b_width_written_in_shards(full_width_run):
    run_dir, _ = full_width_run
    config = json.loads((run_dir / "base" / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"]) == (4096, 11008)
    assert (config["num_attention_heads"], config["vocab_size"], config["num_hidden_layers"]) == (
        32,
        32000,
        2,
    )
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    shards = sorted((run_dir / "base").glob("*.safetensors"))
    assert len(shards) >= 4 and all(s.stat().st_size <= SHARD for s in shards)
    index = json.loads((run_dir / "base" / "model.safetensors.index.json").read_text())
    assert len(index["weight_map"]) == 2 * 9 + 3  # every layer's 7 linears and 2 norms, embed, norm, head


def test_the_adapter_is_the_recipe_lora(full_width_run):
    run_dir, _ = full_width_run
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 64 and adapter["lora_alpha"] == 16
    modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # peft records all-linear as the modules it resolved to, by full name: 7 in each of the 2 layers
    targets = adapter["target_modules"]
    assert {name.rsplit(".", 1)[-1] for name in targets} == modules and len(set(targets)) == 2 * 7
    train = json.loads((run_dir / "metrics" / "train.json").read_text())
    assert train["steps"] == 4 and train["adapter_dtypes"] == ["float32"]


def test_every_stage_records_its_peak_memory_within_its_estimate(full_width_run):
    run_dir, stdout = full_width_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for stage in STAGES:
        memory = manifest["stages"][stage]["memory"]
        assert memory["peak_rss_exact"] and memory["peak_total_rss_mb"] > 0, stage
    for stage in ("convert", "quantize", "ladder", "smoke"):  # llama.cpp's tools and servers are counted
        assert manifest["stages"][stage]["memory"]["peak_children_rss_mb"] > 100, stage
    for stage in ("train", "merge", "ladder"):
        estimate = manifest["stages"][stage]["metrics"]["memory_estimate"]["estimated_peak_bytes"]
        # The estimate refuses runs that cannot fit: it must not be far below the anonymous memory
        # the stage used (what must fit; RSS also counts mapped shards the kernel can drop and reread).
        peak = manifest["stages"][stage]["memory"]["peak_anon_mb"] * 1e6
        assert 0 < peak <= 1.5 * estimate, (stage, peak, estimate)
    assert "peak RSS" in stdout


def test_the_merge_fold_holds_two_shards_and_the_adapter(full_width_run):
    """The fold streams: what it adds to the memory it starts with stays within its bound (two base
    shards: the one read, the one being written; plus the adapter) and one weight's NF4 round trip
    in float32 (measured 0.75 GB for an 11008 x 4096 weight; at 2 layers that exceeds two 300 MB shards)."""
    run_dir, _ = full_width_run
    merge = json.loads((run_dir / "metrics" / "merge.json").read_text())
    assert set(merge["phase_peak_anon_mb"]) == {"4bit_reference", "fold", "self_check"}
    added = merge["phase_peak_anon_mb"]["fold"] - merge["fold_start_anon_mb"]
    assert 0 < added <= merge["fold_bound_mb"] + 1000, (added, merge["fold_bound_mb"])


def test_the_4bit_load_does_not_hold_the_base_mapped(full_width_run):
    """The 4-bit reference load reads the base tensor by tensor: its peak RSS is its anonymous memory
    plus the libraries, not plus the base (transformers' own load maps every shard until it ends,
    which put 13 GB of the 7B base in the merge's RSS)."""
    run_dir, _ = full_width_run
    merge = json.loads((run_dir / "metrics" / "merge.json").read_text())
    base_mb = sum(f.stat().st_size for f in (run_dir / "base").glob("*.safetensors")) / 1e6
    mapped = merge["phase_peak_rss_mb"]["4bit_reference"] - merge["phase_peak_anon_mb"]["4bit_reference"]
    assert mapped < base_mb / 2, (mapped, base_mb)


def test_the_merge_check_reads_what_does_not_fit_from_disk(full_width_run):
    run_dir, _ = full_width_run
    merge = json.loads((run_dir / "metrics" / "merge.json").read_text())
    assert merge["shards"] >= 4 and merge["self_check"]["top1_agreement"] > 0.9
    ladder = json.loads((run_dir / "metrics" / "ladder.json").read_text())
    assert ladder["rungs"]["merged"]["compute_dtype"] in ("float32", "bfloat16")
    assert ladder["rungs"]["GGUF Q8_0"]["kl_mean"] < ladder["rungs"]["GGUF Q4_K_M"]["kl_mean"]


def test_the_served_model_sees_metas_ids_at_full_width(full_width_run):
    run_dir, _ = full_width_run
    report = json.loads((run_dir / "smoke" / "report.json").read_text())
    server = report["llama_server"]
    assert server["parity"]["status"] == "pass" and server["load"]["prompt_ids"] == 0
    assert server["load"]["completed"] == server["load"]["requests"] == 8
    vllm = report["vllm"]
    assert vllm["status"] in ("pass", "not_run"), vllm
    if vllm["status"] == "not_run":
        assert "memory" in vllm["reason"] or "no vLLM" in vllm["reason"]
    sizes = {p: (run_dir / "gguf" / p).stat().st_size for p in ("llama2_7b_shape-guanaco-Q4_K_M.gguf",)}
    elements = 2 * (32000 * 4096) + 2 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert sizes["llama2_7b_shape-guanaco-Q4_K_M.gguf"] < elements * 5.5 / 8  # about 4.9 bits a weight
    assert math.isfinite(report["llama_server"]["load"]["latency_p95_s"])


def test_the_full_scale_bench_reports_a_finished_run(full_width_run):
    import subprocess
    import sys

    from conftest import ROOT

    run_dir, _ = full_width_run
    out = subprocess.run(
        [sys.executable, "bench/full_scale.py", "--report", str(run_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for stage in STAGES:
        assert f"\n{stage:<10} " in out, stage
    assert "llama2_7b_shape-guanaco-Q4_K_M.gguf" in out and "target 90 min" in out
