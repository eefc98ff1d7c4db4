"""Quantize stage: the converted GGUF -> `gguf/<name>-<TYPE>.gguf` for each of `export.quants`, with
llama.cpp's own quantizer, each checked like the converted one and measured on the fidelity ladder."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.errors import MissingInput
from pipeline.gguf import check_gguf, check_quant_types, quantize_gguf
from pipeline.ladder import gguf_rung
from pipeline.layout import RunDir
from pipeline.progress import progress
from pipeline.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


def run(cfg, run_dir: Path) -> dict:
    layout = RunDir.of(cfg, run_dir)
    check_quant_types(cfg.export.quants)
    source = layout.converted_gguf(cfg.export.outtype)
    if not source.is_file():
        raise MissingInput(f"{source} not found: run stage=convert first")
    tokenizer = load_tokenizer(layout.merged)

    def check(tmp: Path) -> None:
        check_gguf(tmp, tokenizer.bos_token_id, tokenizer.eos_token_id)

    metrics = {"source": source.name, "files": {}, "ladder": {}}
    for type_name in progress(cfg.export.quants, "quantize", unit="type"):
        outfile = layout.gguf(type_name)
        if outfile != source:  # export.outtype=q8_0: the converter already wrote that one
            quantize_gguf(source, outfile, type_name, check=check)
            log.info("wrote %s (%.1f MB)", outfile, outfile.stat().st_size / 1e6)
            metrics["ladder"][type_name] = gguf_rung(cfg, layout, outfile)
        metrics["files"][type_name] = outfile.name
    return metrics
