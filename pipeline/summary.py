"""What a run prints: the smoke report's table and the run summary (stage times, fidelity ladder)."""

from __future__ import annotations

from pathlib import Path


def format_smoke_report(report: dict) -> str:
    lines = ["", "Smoke test", f"{'check':<58} {'result':<8} detail"]

    def row(check, status, detail=""):
        lines.append(f"{check:<58} {status:<8} {detail}")

    def answers(r):
        ids = r["prompt_ids_match"]
        return f"accuracy {r['accuracy']}, EOS stop {r['stopped_on_eos']}, prompt ids match {ids}"

    t = report["transformers"]
    row("parity: transformers", t["status"], f"{t['equal']}/{t['cases']} equal")
    p = report["tgi"]["offline_parity"]
    row(
        "parity: TGI reproduction (minijinja + tokenizers; not TGI)",
        p["status"],
        f"{p['equal']}/{p['cases']} equal",
    )
    for name, p in report["llamacpp"]["parity"].items():
        row(f"parity: llama-cpp-python {name}", p["status"], f"{p['equal']}/{p['cases']} equal")
    for name, r in report["llamacpp"]["in_process"].items():
        row(f"llama-cpp-python in-process {name}", r["status"], answers(r))
    server = report["llamacpp"]["server"]
    for mode in ("non_streaming", "streaming"):
        row(f"llama-cpp-python server {mode} {server['gguf']}", server[mode]["status"], answers(server[mode]))
    native = report["llama_server"]
    commit = native["llama_cpp"]["commit"]
    p = native["parity"]
    row(
        f"parity: llama-server {commit} (Jinja) {native['gguf']}",
        p["status"],
        f"{p['equal']}/{p['cases']} equal",
    )
    for mode in ("non_streaming", "streaming"):
        row(f"llama-server {commit} {mode}", native[mode]["status"], answers(native[mode]))
    b = native["builtin_no_jinja"]
    row(
        f"llama-server {commit} --no-jinja (built-in format)",
        b["status"],
        f"{b['equal']}/{b['cases']} equal Meta's ids",
    )
    b = native["builtin_c_api"]
    row(
        "llama_chat_apply_template (C API, built-in format)",
        b["status"],
        f"{b['equal']}/{b['cases']} equal Meta's ids",
    )
    tgi = report["tgi"]
    row("TGI live", tgi["status"], tgi.get("reason", "; ".join(tgi.get("failures", []))))
    v = report.get("vllm", {"status": "not_run", "reason": "not checked"})
    if v["status"] == "not_run":
        row("vLLM live", v["status"], v["reason"])
    else:
        p = v["parity"]
        row(f"parity: vLLM ({v['vllm']}) merged/", p["status"], f"{p['equal']}/{p['cases']} equal")
        for mode in ("non_streaming", "streaming"):
            row(f"vLLM {mode}", v[mode]["status"], answers(v[mode]))
    lines.append(
        "space-run tokenization differences (HF vs llama.cpp) on eval rows: "
        f"{len(report['llamacpp'].get('space_run_differences', []))}"
    )
    return "\n".join(lines)


def format_ladder(rows: list[dict]) -> str:
    lines = [f"{'artifact':<22} {'perplexity':>10} {'top-1 vs merged':>16}"]
    for r in rows:
        lines.append(f"{r['artifact']:<22} {r['perplexity']:>10.3f} {r['top1_agreement_with_merged']:>16.4f}")
    return "\n".join(lines)


def print_summary(run_dir: Path, times: dict[str, float | None]) -> None:
    """Stage times of this invocation and the fidelity ladder, from the run's manifest."""
    from pipeline.ladder import ladder_table
    from pipeline.manifest import Manifest

    spent = ", ".join(f"{name} {'skipped' if s is None else f'{s:.1f} s'}" for name, s in times.items())
    print(f"\nStage times ({run_dir}): {spent}; total {sum(s or 0 for s in times.values()):.1f} s")
    rows = ladder_table(Manifest(run_dir).data)
    if rows:
        print(f"\nFidelity ladder ({run_dir}, eval set, assistant tokens):\n{format_ladder(rows)}")
