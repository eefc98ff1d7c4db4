"""What a run prints: the smoke report's table and one run summary (stages, artifacts, engines, ladder)."""

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
    load = native.get("load")
    if load:
        detail = load.get("reason") or (
            f"{load['completed']}/{load['requests']} requests on {load['parallel_slots']} slots, "
            f"p50 {load['latency_p50_s']} s, p95 {load['latency_p95_s']} s, "
            f"{load['completion_tokens_per_s']} tokens/s" + "".join(f"; {f}" for f in load["failures"])
        )
        row(f"llama-server {commit} under load", load["status"], detail)
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


def ladder_table(manifest_data: dict) -> list[dict]:
    """One row per artifact, from what the ladder stage recorded in the manifest."""
    rungs = manifest_data.get("stages", {}).get("ladder", {}).get("metrics", {}).get("rungs", {})
    return [{"artifact": name, **figures} for name, figures in rungs.items()]


def format_ladder(rows: list[dict]) -> str:
    header = f"{'artifact':<22} {'size':>9} {'KL mean':>9} {'KL p99':>9} {'top-1':>7} {'PPL':>9} {'dPPL':>8}"
    lines = [header]
    for r in rows:
        size = "-" if r.get("size_bytes") is None else f"{r['size_bytes'] / 1e6:.1f} MB"
        mark = " (imatrix)" if r.get("imatrix") else ""
        lines.append(
            f"{r['artifact']:<22} {size:>9} {r['kl_mean']:>9.5f} {r['kl_p99']:>9.5f} "
            f"{r['top1_agreement']:>7.4f} {r['perplexity']:>9.3f} {r['delta_perplexity']:>+8.4f}{mark}"
        )
    return "\n".join(lines)


def stage_results(stages: dict) -> dict[str, str]:
    """One line per stage, from the metrics it recorded in the manifest."""
    m = {name: record.get("metrics", {}) for name, record in stages.items()}
    out = {}
    if "data" in m:
        out["data"] = f"{m['data'].get('train_rows')} train / {m['data'].get('eval_rows')} eval rows"
    if "train" in m:
        t = m["train"]

        def figures(key: str) -> dict:  # a dict, or "not run: <reason>" (FSDP)
            return t.get(key) if isinstance(t.get(key), dict) else {}

        accuracy = figures("answer_accuracy_trained").get("accuracy")
        base = figures("answer_accuracy_untrained_base").get("accuracy")
        busy = t.get("cpu_cores_busy_with_other_work")
        out["train"] = f"{t.get('steps')} steps, {t.get('train_tokens_per_s') or 0:,.0f} train tokens/s" + (
            f" (other work kept {busy} cores busy)" if busy else ""
        )
        step = figures("step")
        if step:
            out["train"] += (
                f"; each step {step['batch_size']} sequences = {step['ranks']} process(es) x micro-batch "
                f"{step['micro_batch_size']} x {step['gradient_accumulation_steps']} accumulated, "
                f"{'padding-free' if step.get('padding_free') else 'padded'}, "
                f"{step.get('attn_implementation')} attention, "
                f"gradient checkpointing {'on' if step['gradient_checkpointing'] else 'off'}, "
                f"{'trl chunked LM-head' if step.get('fused_lm_head') else 'model'} loss"
            )
        if accuracy is not None:
            out["train"] += f", eval answer accuracy {accuracy:.2f} (untrained base {base:.2f})"
        ppl = figures("eval_perplexity")
        if ppl.get("trained") is not None:
            out["train"] += f", eval perplexity {ppl['untrained_base']:.1f} -> {ppl['trained']:.1f}"
    if "merge" in m:
        check = m["merge"].get("self_check", {})
        out["merge"] = (
            f"{m['merge'].get('mode')}, self-check max |dlogit| {check.get('max_abs_logit_diff', 0):.3g}"
        )
    if "convert" in m:
        out["convert"] = f"{m['convert'].get('gguf')}"
    if "quantize" in m:
        files = m["quantize"].get("files", {})
        out["quantize"] = ", ".join(
            f"{t}{' (imatrix)' if f.get('imatrix') else ''}" for t, f in files.items()
        )
    if "ladder" in m and m["ladder"].get("imatrix", {}).get("comparison"):
        helped = [
            t
            for t, c in m["ladder"]["imatrix"]["comparison"].items()
            if c["kl_mean_with"] < c["kl_mean_without"]
        ]
        out["ladder"] = (
            f"{len(m['ladder']['rungs'])} artifacts; imatrix lowered KL for {', '.join(helped) or 'none'}"
        )
    if "smoke" in m:
        out["smoke"] = ", ".join(f"{engine} {status}" for engine, status in m["smoke"].items())
    return out


def artifact_sizes(artifacts: dict) -> list[tuple[str, int]]:
    """(artifact, bytes): the deployables, a directory summed."""
    sizes: dict[str, int] = {}
    for rel, record in artifacts.items():
        top = rel.split("/")[0]
        key = rel if top == "gguf" else f"{top}/"
        if top in ("merged", "adapter", "gguf"):
            sizes[key] = sizes.get(key, 0) + record["size"]
    return sorted(sizes.items())


def engine_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(engine, parity, accuracy, EOS stop) per engine the smoke stage ran."""

    def parity(p):
        return f"{p['equal']}/{p['cases']}"

    def answers(r):
        return (str(r.get("accuracy")), str(r.get("stopped_on_eos")))

    rows = [("transformers", parity(report["transformers"]), "-", "-")]
    rows.append(("TGI reproduction (not TGI)", parity(report["tgi"]["offline_parity"]), "-", "-"))
    if report["tgi"].get("status") == "not_run":
        rows.append(("TGI live", "not run", "-", "-"))
    for name, p in report["llamacpp"]["parity"].items():
        rows.append((f"llama-cpp-python {name}", parity(p), *answers(report["llamacpp"]["in_process"][name])))
    native = report["llama_server"]
    rows.append(
        (f"llama-server {native['gguf']}", parity(native["parity"]), *answers(native["non_streaming"]))
    )
    vllm = report.get("vllm", {})
    if vllm.get("status") == "not_run":
        rows.append(("vLLM", "not run", "-", "-"))
    elif vllm:
        rows.append((f"vLLM ({vllm['vllm']})", parity(vllm["parity"]), *answers(vllm["non_streaming"])))
    return rows


def print_summary(run_dir: Path, times: dict[str, float | None]) -> None:
    """One summary of the run, from its manifest and smoke report: stages with their times and
    results, the artifacts and their sizes, the engines, and the fidelity ladder."""
    import json

    from pipeline.run.layout import RunDir
    from pipeline.run.manifest import Manifest

    data = Manifest(run_dir).data
    stages = data.get("stages", {})
    results = stage_results(stages)
    print(f"\nRun summary ({run_dir})")
    print(f"{'stage':<10} {'time':>9} {'peak RSS':>9} {'anon':>8}  result")
    for name, seconds in times.items():
        spent = "skipped" if seconds is None else f"{seconds:.1f} s"
        # Pipeline process and its children (llama.cpp's tools and servers) together; RSS includes
        # the mapped checkpoint and GGUF pages, anon what cannot be dropped (pipeline.machine.memory).
        memory = (stages.get(name, {}).get("memory") or {}) if seconds is not None else {}
        rss, anon = (
            f"{memory[k] / 1e3:.2f} GB" if memory.get(k) else ""
            for k in ("peak_total_rss_mb", "peak_anon_mb")
        )
        print(f"{name:<10} {spent:>9} {rss:>9} {anon:>8}  {results.get(name, '')}")
    print(f"{'total':<10} {sum(s or 0 for s in times.values()):>7.1f} s")
    sizes = artifact_sizes(data.get("artifacts", {}))
    if sizes:
        print(f"\n{'artifact':<44} {'size':>10}")
        for rel, size in sizes:
            print(f"{rel:<44} {size / 1e6:>7.1f} MB")
    report_path = RunDir(Path(run_dir)).smoke_report
    if "smoke" in times and report_path.is_file():
        print(f"\n{'engine':<50} {'parity':>8} {'accuracy':>9} {'EOS stop':>9}")
        for engine, parity, accuracy, eos in engine_rows(json.loads(report_path.read_text())):
            print(f"{engine:<50} {parity:>8} {accuracy:>9} {eos:>9}")
    rows = ladder_table(data)
    if rows:
        print(f"\nFidelity ladder (eval set, assistant tokens, against the F16 GGUF):\n{format_ladder(rows)}")
