"""The benchmarks' code paths, run for real at a reduced shape (their figures are printed by the
scripts themselves, measured against a baseline in the same run; nothing here times anything), and
the pieces of their shared harness (bench/harness.py) that hold logic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from conftest import ROOT

from pipeline.engines.llamacpp import LlamaCpp


@pytest.fixture(scope="module")
def harness():
    sys.path.insert(0, str(ROOT / "bench"))
    import harness

    return harness


def test_the_harness_table_lines_figures_up_with_their_ratio_to_a_baseline(harness):
    Column, ratio = harness.Column, harness.ratio
    columns = [Column("run", 8, "<"), Column("tokens/s", 9), Column("vs base", 8)]
    columns += [Column("optimizer", 0, "<", gap=2)]
    rows = [
        ("base", "100.0", ratio(100.0, 100.0), "adamw"),
        ("fast", "150.0", ratio(150.0, 100.0), "paged"),
        ("alone", "50.0", ratio(50.0, None), "adamw"),  # no baseline measured: no ratio
        "broken   failed: out of memory",  # a row that is one string stands as it is
    ]
    assert harness.table(columns, rows, rule=True).splitlines() == [
        "run       tokens/s  vs base  optimizer",
        "-" * 38,
        "base         100.0    1.00x  adamw",
        "fast         150.0    1.50x  paged",
        "alone         50.0        -  adamw",
        "broken   failed: out of memory",
    ]
    assert ratio(3.0, 2.0, 3, "") == "1.500" and ratio(None, 2.0) == ratio(1.0, 0.0) == "-"


def test_the_harness_takes_the_best_round_and_skips_failed_ones(harness):
    assert harness.best([3.0, 2.0, 5.0]) == 2.0  # times: the least
    rounds = [{"tokens_per_s": 10.0}, {"error": "killed"}, {"tokens_per_s": 12.5}]
    assert harness.best(rounds, "tokens_per_s", higher=True) == {"tokens_per_s": 12.5}
    assert harness.best([{"error": "killed"}], "tokens_per_s", higher=True) is None


def test_the_harness_runs_a_child_from_the_repo_offline_timed_and_sampled(harness, tmp_path):
    code = (
        "import json, os, sys, time; print('working', file=sys.stderr); time.sleep(1.2); "
        "print(json.dumps({'pid': os.getpid(), 'cwd': os.getcwd(), 'offline': os.environ['HF_HUB_OFFLINE']}))"
    )
    entered = tmp_path / "entered"  # as full_scale.py's child writes itself into its cgroup

    def enter() -> None:
        entered.write_text(str(os.getpid()))

    child = harness.run_child(
        [sys.executable, "-c", code], enter=enter, sample=harness.tree_memory, every=0.2
    )
    assert child.ok and child.json() == {"pid": int(entered.read_text()), "cwd": str(ROOT), "offline": "1"}
    assert child.stderr.strip() == "working" and child.seconds >= 1.2 and child.other_cores >= 0
    assert len(child.samples) >= 3 and any(anon > 0 for _, anon, _ in child.samples)

    failing = [sys.executable, "-c", "import sys; print('partial'); sys.exit('out of memory')"]
    child = harness.run_child(failing, check=False)
    assert child.returncode == 1 and child.error() == "out of memory"
    with pytest.raises(SystemExit, match=r"^the worker failed \(1\):\n(.|\n)*out of memory"):
        harness.run_child(failing, what="the worker")


def test_a_benchs_child_dies_with_the_bench_even_by_sigkill(harness, tmp_path):
    bench = tmp_path / "bench.py"
    bench.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(ROOT / "bench")!r})
            import harness
            sleeper = "import os, time; print(os.getpid(), flush=True); time.sleep(120)"
            harness.run_child([sys.executable, "-c", sleeper], capture_stdout=False)
            """
        )
    )
    with subprocess.Popen([sys.executable, str(bench)], stdout=subprocess.PIPE, text=True) as process:
        child = psutil.Process(int(process.stdout.readline()))
        process.kill()

    def alive() -> bool:
        try:
            return child.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive()


@pytest.mark.slow
@pytest.mark.long
def test_gpu_7b_bench_runs_its_whole_path_on_a_cpu(tmp_path, llamacpp: LlamaCpp):
    """bench/gpu_7b.py --cpu-check: a 1-layer model with Llama-2-7B's widths goes through the train
    stage and the plain trl script, both merges, convert and quantize (not measured on a GPU here)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_7b

    out = tmp_path / "results.json"
    result = subprocess.run(
        [
            sys.executable,
            "bench/gpu_7b.py",
            "--cpu-check",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["mode"].startswith("cpu-check") and "not a benchmark" in r["mode"]
    assert r["machine"]["cores"] >= 1 and r["versions"]["torch"]  # the report's header
    config = json.loads((tmp_path / "work" / "base" / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size", "rms_norm_eps"):
        assert config[key] == gpu_7b.LLAMA2_7B[key], key  # real widths, fewer layers
    assert config["num_hidden_layers"] == r["base"]["layers"] == 1
    for name in ("project", "project_lean", "trl"):
        train = r["train"][name]
        assert train["train_tokens"] > 0 and train["train_tokens_per_s"] > 0, (name, train)
        assert train["peak_gpu_memory_gb"] is None  # no GPU: not reported as a figure
    # (a) the defaults split the step as memory allows; (b) executes the paper's script literally
    project, lean = r["train"]["project"], r["train"]["project_lean"]
    assert project["split"] == "4 x 1" and project["padding_free"] and not project["gradient_checkpointing"]
    assert lean["split"] == "1 x 4" and lean["gradient_checkpointing"] and lean["batch"] == project["batch"]
    # the same math: per-step losses of (a) and (b) agree (float32 on a CPU)
    for a, b in zip(project["loss_curve"], lean["loss_curve"], strict=True):
        assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) < 1e-3, (a, b)
    assert r["train"]["unsloth"]["not_run"]  # no unsloth here: reported, not measured
    assert "per-step loss, (a) vs (b)" in result.stdout and "(d) unsloth" in result.stdout
    for method in ("project", "peft"):
        assert r["merge"][method]["seconds"] > 0 and r["merge"][method]["peak_rss_mb"] > 0
    assert set(r["stages"]) == {"merge", "convert", "quantize"}
    assert any(name.endswith("-Q4_K_M.gguf") for name in r["gguf_bytes"])
    assert "targets: (a)/(c) tokens/s" in result.stdout


@pytest.mark.slow
def test_convert_quantize_bench_measures_both_sides(tiny_run):
    result = subprocess.run(
        [sys.executable, "bench/convert_quantize.py", str(tiny_run), "--repeats", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[0])
    assert figures["best"]["direct"] > 0 and figures["best"]["stages"] > 0
    assert "overhead ratio (stages / direct)" in result.stdout
    assert not (tiny_run / "gguf" / "model-F16.gguf").exists()  # the run's own gguf/ is left alone


@pytest.mark.slow
def test_merge_memory_bench_merges_a_runs_own_adapter_both_ways(tiny_run):
    """`--run-dir`: the project's merge and peft's merge_and_unload on a finished run's base and
    trained adapter (how it runs at the 7B shape); the bench fails itself if the two disagree."""
    result = subprocess.run(
        [sys.executable, "bench/merge_memory.py", "--run-dir", str(tiny_run), "--dtype", "float32"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"base: {tiny_run / 'base'}" in result.stdout and "same names and shapes" in result.stdout
    assert "project/peft" in result.stdout and not list(tiny_run.glob("merged-*"))
