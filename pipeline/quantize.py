"""Quantize stage: the converted GGUF -> `run_dir/gguf/<name>-<TYPE>.gguf` for each of `export.quants`,
with llama.cpp's own quantizer (`llama_cpp.llama_model_quantize`, in-process)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pipeline.convert import OUTTYPES, check_gguf, gguf_path
from pipeline.io import atomic_file

log = logging.getLogger(__name__)


def known_quant_types() -> dict[str, int]:
    """{"Q4_K_M": ftype, ...}: every type this build of llama.cpp can quantize to."""
    import llama_cpp

    prefix = "LLAMA_FTYPE_MOSTLY_"
    return {name[len(prefix) :]: value for name, value in vars(llama_cpp).items() if name.startswith(prefix)}


def quantize_gguf(source: Path, outfile: Path, type_name: str, check=None) -> None:
    import llama_cpp

    types = known_quant_types()
    if type_name not in types:
        raise ValueError(f"export.quants: unknown quant type {type_name!r}; valid: {', '.join(sorted(types))}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = types[type_name]
    params.nthread = os.cpu_count() or 1
    # From an already quantized source (export.outtype=q8_0) llama.cpp requantizes only when told;
    # it costs fidelity, which the ladder then shows.
    params.allow_requantize = not source.stem.endswith(("-F16", "-BF16", "-F32"))
    with atomic_file(outfile) as tmp:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
        if status != 0 or not tmp.is_file():
            raise RuntimeError(f"llama_model_quantize {source} -> {type_name} failed (status {status})")
        if check is not None:
            check(tmp)


def run(cfg, run_dir: Path) -> dict:
    from pipeline.ladder import gguf_rung
    from pipeline.tokenizer import load_tokenizer

    types = known_quant_types()
    unknown = [q for q in cfg.export.quants if q not in types]
    if unknown:  # before any work: a typo must not cost a quantization first
        raise ValueError(f"export.quants: unknown quant type {unknown[0]!r}; valid: {', '.join(sorted(types))}")
    source = gguf_path(cfg, run_dir, OUTTYPES[cfg.export.outtype])
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found: run stage=convert first")
    tokenizer = load_tokenizer(run_dir / "merged")
    metrics = {"source": source.name, "files": {}, "ladder": {}}
    for type_name in cfg.export.quants:
        outfile = gguf_path(cfg, run_dir, type_name)
        if outfile == source:  # export.outtype=q8_0: the converter already wrote this one
            metrics["files"][type_name] = outfile.name
            continue
        quantize_gguf(source, outfile, type_name,
                      check=lambda tmp: check_gguf(tmp, tokenizer.bos_token_id, tokenizer.eos_token_id))  # fmt: skip
        log.info("wrote %s (%.1f MB)", outfile, outfile.stat().st_size / 1e6)
        metrics["files"][type_name] = outfile.name
        metrics["ladder"][type_name] = gguf_rung(cfg, run_dir, outfile)
    return metrics
