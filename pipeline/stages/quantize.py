"""Quantize stage: the converted GGUF -> `gguf/<name>-<TYPE>.gguf` for each of `export.quants`, with
llama.cpp's own `llama-quantize`, each checked like the converted one.

Types in `export.imatrix.types` are quantized with an importance matrix that llama.cpp's own
`llama-imatrix` computes from the training rows, rendered in the chat format with special tokens
parsed, so it sees the ids training saw; never the eval rows, which the ladder measures on. Its
inputs (rows, tokens, chunks, context) are recorded in the stage's metrics in the manifest.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from pipeline.chat.format import encode_dialog
from pipeline.chat.rows import read_jsonl
from pipeline.chat.tokenizer import load_tokenizer
from pipeline.engines.gguf import check_gguf, check_quant_types, compute_imatrix, quantize_gguf, special_ids
from pipeline.engines.llamacpp import LlamaCpp
from pipeline.engines.ollama import write_modelfile
from pipeline.machine.diskspace import GGUF_BITS, gguf_bytes, require_free
from pipeline.machine.memory import require_memory
from pipeline.run.errors import MissingInput
from pipeline.run.io import sha256_file
from pipeline.run.layout import RunDir, quant_type
from pipeline.run.progress import progress

log = logging.getLogger(__name__)


def calibration_text(rows: list[dict], tokenizer, max_tokens: int) -> tuple[str, dict]:
    """Training rows rendered with the chat template, up to `max_tokens` of Meta's ids. The first BOS
    is left to llama.cpp, which adds one to the text it tokenizes."""
    texts, tokens = [], 0
    for row in rows:
        if tokens >= max_tokens:
            break
        texts.append(tokenizer.apply_chat_template(row["messages"], tokenize=False))
        tokens += len(encode_dialog(row["messages"], tokenizer))
    text = "".join(texts).removeprefix(tokenizer.bos_token)
    return text, {"rows": len(texts), "tokens": tokens}


def make_imatrix(cfg, layout: RunDir, source: Path, tokenizer, llamacpp: LlamaCpp) -> dict:
    settings = cfg.export.imatrix
    rows = read_jsonl(layout.train_rows)
    text, used = calibration_text(rows, tokenizer, settings.ctx * settings.chunks)
    with tempfile.TemporaryDirectory(prefix="imatrix-") as scratch:
        calibration = Path(scratch) / "calibration.txt"
        calibration.write_text(text, encoding="utf-8")
        computed = compute_imatrix(
            source, calibration, layout.imatrix, llamacpp, settings.ctx, settings.chunks
        )
    record = {
        "file": layout.imatrix.name,
        "calibration": layout.train_rows.relative_to(layout.root).as_posix(),  # never data/eval.jsonl
        "calibration_sha256": sha256_file(layout.train_rows),
        **used,
        **computed,
        "model": source.name,
        "types": list(settings.types),
    }
    log.info("imatrix from %s: %s", record["calibration"], record)
    return record


def run(cfg, run_dir: Path) -> dict:
    layout = RunDir.of(cfg, run_dir)
    check_quant_types(cfg.export.quants)
    check_quant_types(cfg.export.imatrix.types)
    source = layout.converted_gguf(cfg.export.outtype)
    if not source.is_file():
        raise MissingInput(f"{source} not found: run stage=convert first")
    bos_id, eos_id = special_ids(layout.merged)
    llamacpp = LlamaCpp(cfg.llamacpp.dir)

    def check(tmp: Path) -> None:
        check_gguf(tmp, bos_id, eos_id)

    # Each type against the F16 GGUF's 16 bits a weight (the converter's output, export.outtype).
    elements = source.stat().st_size * 8 / GGUF_BITS.get(quant_type(source), 16.0)
    new_types = [t for t in cfg.export.quants if layout.gguf(t) != source]
    require_free(
        layout.gguf_dir, sum(gguf_bytes(elements, t) for t in new_types), f"the quants {', '.join(new_types)}"
    )
    metrics = {"source": source.name, "files": {}, "imatrix": None}
    if cfg.export.imatrix.types:
        mapped = {f"{source.name}, which llama-imatrix maps whole": source.stat().st_size}
        metrics["memory_estimate"] = require_memory(cfg, "quantize", mapped)
        metrics["imatrix"] = make_imatrix(cfg, layout, source, load_tokenizer(layout.merged), llamacpp)
    for type_name in progress(cfg.export.quants, "quantize", unit="type"):
        outfile = layout.gguf(type_name)
        with_imatrix = type_name in cfg.export.imatrix.types
        if outfile != source:  # export.outtype=q8_0: the converter already wrote that one
            imatrix = layout.imatrix if with_imatrix else None
            quantize_gguf(source, outfile, type_name, llamacpp, imatrix=imatrix, check=check)
            write_modelfile(outfile)  # ollama renders its own Go template, not the GGUF's Jinja one
            log.info(
                "wrote %s (%.1f MB%s)", outfile, outfile.stat().st_size / 1e6, ", imatrix" * with_imatrix
            )
        metrics["files"][type_name] = {"file": outfile.name, "imatrix": with_imatrix and outfile != source}
    return metrics
