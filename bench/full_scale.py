"""Every stage at Llama-2-7B's full size on this CPU machine: `python -m pipeline stage=all
experiment=llama2_7b_shape`, with each stage's time and peak memory, the GGUF sizes and llama-server's
tokens/s, against the 90-minute and 16 GB targets.

    python bench/full_scale.py [--run-dir DIR] [--layers 32] [--memory-limit 16GB]
    python bench/full_scale.py --run-dir DIR --stage merge  # rerun one stage of a finished run
    python bench/full_scale.py --report DIR [--samples FILE]  # the table of a finished run

The run is a random-init model of Llama-2-7B's exact shape (conf/model/llama2_7b_shape.yaml) with
the real tokenizer and guanaco rows of ../shared; the preset (conf/experiment/llama2_7b_shape.yaml)
says what is cut to fit the time. It needs about 60 GB of free disk (base, merged, F16, Q8_0 and
Q4_K_M, and the ladder's scratch quant) and 24 GB of memory.

The run goes into a memory cgroup of its own whose limit is --memory-limit (cgroup v1 or v2, where
this user may make one; --no-cap runs it without): the kernel then holds the whole process tree to
that limit, as a machine of that size would, reclaiming mapped checkpoint and GGUF pages instead of
letting RSS grow past it, and OOM-killing if anonymous memory does not fit. The cgroup's own peak
(page cache included) and its OOM-kill count are reported beside the stages' figures.

Besides the manifest's figures (the pipeline's own: VmHWM of the stage process, exact; its children
sampled), this script samples the whole process tree every 0.5 s from outside, split into anonymous
memory (what must fit) and mapped file pages (checkpoint shards, GGUFs: the kernel drops and rereads
them under pressure), and prints both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from harness import (
    ROOT,
    Column,
    describe_cpu,
    machine,
    pipeline_command,
    run_child,
    save_results,
    table,
    tree_memory,
)

TARGET_SECONDS = 90 * 60
TARGET_BYTES = 16e9


def make_memory_cgroup(limit_bytes: int) -> tuple[Path | None, str]:
    """A new memory cgroup under this process's, limited to `limit_bytes`: (its directory, its
    version), or (None, why not)."""
    from pipeline.machine.memory import memory_cgroup

    own = memory_cgroup()
    if own is None or not os.access(own[0], os.W_OK):
        return None, "no writable memory cgroup (v1 memory controller or v2) for this user"
    parent, version = own
    cgroup = parent / f"full-scale-{os.getpid()}"
    try:
        cgroup.mkdir()
        limit_file = "memory.limit_in_bytes" if version == "v1" else "memory.max"
        (cgroup / limit_file).write_text(str(limit_bytes))
    except OSError as err:
        return None, f"cannot make a memory cgroup under {parent}: {err.strerror}"
    return cgroup, version


def cgroup_figures(cgroup: Path, version: str) -> dict:
    """The cgroup's limit, its peak usage (anonymous memory and page cache, as the kernel charges
    them) and how many processes its OOM killer killed."""

    def read(name: str) -> str:
        path = cgroup / name
        return path.read_text() if path.is_file() else ""

    if version == "v1":
        limit, peak = read("memory.limit_in_bytes"), read("memory.max_usage_in_bytes")
        events = read("memory.oom_control")
    else:
        limit, peak, events = read("memory.max"), read("memory.peak"), read("memory.events")
    kills = [int(line.split()[1]) for line in events.splitlines() if line.startswith("oom_kill ")]
    return {
        "version": version,
        "limit_gb": round(int(limit) / 1e9, 2) if limit.strip().isdigit() else None,
        "peak_usage_gb": round(int(peak) / 1e9, 2) if peak.strip().isdigit() else None,
        "oom_kills": kills[0] if kills else None,
    }


def stage_windows(manifest: dict) -> dict[str, tuple[float, float]]:
    """(start, end) epoch seconds of each stage, from its finish time and duration."""
    windows = {}
    for name, record in manifest["stages"].items():
        end = time.mktime(time.strptime(record["finished_at"][:19], "%Y-%m-%dT%H:%M:%S"))
        windows[name] = (end - (record.get("seconds") or 0) - 1, end + 1)
    return windows


def report(run_dir: Path, samples: list | None = None, stage: str = "all") -> dict:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    windows = stage_windows(manifest)
    rows = {}
    for name, record in manifest["stages"].items():
        if stage not in ("all", name):
            continue
        memory = record.get("memory") or {}
        inside = [s for s in samples or [] if windows[name][0] <= s[0] <= windows[name][1]]
        rows[name] = {
            "seconds": record.get("seconds"),
            "peak_rss_gb": (memory.get("peak_total_rss_mb") or 0) / 1e3,
            "cgroup_limit_gb": (memory.get("cgroup_limit_mb") or 0) / 1e3 or None,
            "peak_anon_gb": max((s[1] for s in inside), default=0) / 1e9
            or (memory.get("peak_anon_mb") or 0) / 1e3,
            "peak_anon_plus_mapped_gb": max((s[1] + s[2] for s in inside), default=0) / 1e9,
        }
    smoke = (
        json.loads((run_dir / "smoke" / "report.json").read_text()) if (run_dir / "smoke").is_dir() else {}
    )
    load = (smoke.get("llama_server") or {}).get("load") or {}
    sizes = {p.name: p.stat().st_size for p in sorted((run_dir / "gguf").glob("*.gguf"))}
    total = sum(r["seconds"] or 0 for r in rows.values())
    return {
        "machine": machine(),
        "versions": manifest.get("versions"),
        "stages": rows,
        "total_seconds": total,
        "gguf_bytes": sizes,
        "llama_server_q4_k_m": {
            k: load.get(k) for k in ("completion_tokens_per_s", "latency_p50_s", "latency_p95_s")
        },
        "vllm": (smoke.get("vllm") or {}).get("status"),
        "vllm_reason": (smoke.get("vllm") or {}).get("reason"),
    }


def print_report(figures: dict) -> None:
    print(f"\n{describe_cpu(figures['machine'])}")
    columns = [Column("stage", 10, "<"), Column("time", 9), Column("peak RSS", 9), Column("anon", 8)]
    columns += [Column("cap", 8), Column("", 0, "<", gap=0)]
    rows = []
    for name, row in figures["stages"].items():
        over = " > 16 GB" if max(row["peak_rss_gb"], row["peak_anon_gb"]) * 1e9 > TARGET_BYTES else ""
        cap = f"{row['cgroup_limit_gb']:.1f} GB" if row.get("cgroup_limit_gb") else "none"
        seconds, rss, anon = row["seconds"] or 0, row["peak_rss_gb"], row["peak_anon_gb"]
        rows.append((name, f"{seconds:.1f} s", f"{rss:.2f} GB", f"{anon:.2f} GB", cap, over))
    print(table(columns, rows))
    minutes = figures["total_seconds"] / 60
    print(f"{'total':<10} {minutes:>6.1f} min (target {TARGET_SECONDS / 60:.0f} min)")
    for name, size in figures["gguf_bytes"].items():
        print(f"{name:<48} {size / 1e9:>6.2f} GB")
    print(f"llama-server Q4_K_M under load: {figures['llama_server_q4_k_m']}")
    print(f"vLLM: {figures['vllm']} {figures['vllm_reason'] or ''}")
    if "cgroup" in figures:
        print(f"memory cgroup: {figures['cgroup']}")


def limit_bytes(size: str) -> int:
    from pipeline.machine.memory import parse_size

    return parse_size(size, "--memory-limit")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=ROOT / "outputs" / "full-scale")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--memory-limit", default="16GB")
    parser.add_argument(
        "--stage", default="all", help="one stage of a finished run, rerun (force=true) and reported alone"
    )
    parser.add_argument(
        "--no-cap", action="store_true", help="no memory cgroup: memory_limit only checks the estimates"
    )
    parser.add_argument("--report", type=Path, help="print the table of this finished run and exit")
    parser.add_argument(
        "--samples", type=Path, help="with --report: 'epoch anon mapped' lines sampled meanwhile"
    )
    args = parser.parse_args()
    if args.report:
        lines = args.samples.read_text().splitlines() if args.samples else []
        samples = [tuple(float(x) for x in line.split()[:3]) for line in lines]
        print_report(report(args.report, samples))
        return 0
    command = pipeline_command(
        f"stage={args.stage}",
        *([] if args.stage == "all" else ["force=true"]),
        "experiment=llama2_7b_shape",
        f"model.tiny.num_hidden_layers={args.layers}",
        f"memory_limit={args.memory_limit}",
        f"run_dir={args.run_dir}",
    )
    cgroup, version = (
        (None, "--no-cap") if args.no_cap else make_memory_cgroup(limit_bytes(args.memory_limit))
    )
    if cgroup is None:
        print(f"not capped: {version}; memory_limit={args.memory_limit} only checks the estimates")

    def enter_cgroup() -> None:  # in the child, before it runs: it and all it starts are held to the cap
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    # The run's log goes straight to the terminal; the whole process tree is sampled every 0.5 s.
    child = run_child(
        command,
        check=False,
        capture_stdout=False,
        capture_stderr=False,
        enter=enter_cgroup,
        sample=tree_memory,
    )
    code, samples = child.returncode, child.samples
    figures = report(args.run_dir, samples, args.stage)
    figures["exit_code"] = code
    figures["cgroup"] = cgroup_figures(cgroup, version) if cgroup else {"not_capped": version}
    if cgroup is not None:
        try:
            cgroup.rmdir()
        except OSError as err:
            print(f"{cgroup}: not removed ({err.strerror})")
    name = "full_scale.json" if args.stage == "all" else f"full_scale-{args.stage}.json"
    save_results(args.run_dir / name, figures)
    print_report(figures)
    return code


if __name__ == "__main__":
    sys.exit(main())
