"""Convert stage: `run_dir/merged/` -> `run_dir/gguf/<name>-<TYPE>.gguf` with llama.cpp's own converter
(`convert_hf_to_gguf.py` and `gguf-py` from the same llama.cpp tree as the bindings and the server,
see `pipeline.llamacpp`), then read the GGUF back and check that it carries the project's chat
template and BOS/EOS settings that keep Meta's token ids.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from pipeline.chat import LLAMA2_CHAT_TEMPLATE
from pipeline.io import atomic_file, check_safetensors
from pipeline.llamacpp import LlamaCpp
from pipeline.processes import die_with_parent

log = logging.getLogger(__name__)

OUTTYPES = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "f32": "F32"}


class GGUFCheckError(ValueError):
    pass


def convert_to_gguf(
    hf_dir: Path,
    outfile: Path,
    outtype: str = "f16",
    vocab_only: bool = False,
    check=None,
    llamacpp: LlamaCpp | None = None,
) -> None:
    """Run llama.cpp's converter into a temporary file, `check(tmp)` it, then rename it to `outfile`."""
    if outtype not in OUTTYPES:
        raise ValueError(f"export.outtype={outtype!r}: expected one of {sorted(OUTTYPES)}")
    converter = (llamacpp or LlamaCpp()).converter()
    with atomic_file(outfile) as tmp:
        command = [sys.executable, str(converter), str(hf_dir), "--outfile", str(tmp), "--outtype", outtype]
        result = subprocess.run(
            command + (["--vocab-only"] if vocab_only else []),
            capture_output=True,
            text=True,
            preexec_fn=die_with_parent,
        )
        if result.returncode != 0 or not tmp.is_file():
            raise RuntimeError(f"{converter} failed on {hf_dir}:\n{result.stderr[-3000:]}")
        if check is not None:
            check(tmp)


def read_gguf_metadata(path: Path) -> dict:
    """The GGUF's key/value metadata, read by llama.cpp itself (arrays are left out)."""
    from llama_cpp import Llama

    llama = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return dict(llama.metadata)
    finally:
        llama.close()


def check_gguf(path: Path, bos_id: int, eos_id: int) -> dict:
    """Fail unless the GGUF serves the project's chat format with Meta's ids."""
    metadata = read_gguf_metadata(path)
    expected = {
        "tokenizer.chat_template": LLAMA2_CHAT_TEMPLATE,
        "tokenizer.ggml.bos_token_id": str(bos_id),
        "tokenizer.ggml.eos_token_id": str(eos_id),
        # The template emits BOS itself; llama-cpp-python then tokenizes with add_bos=False.
        # add_bos_token=true is what plain completion (`/completion`, `Llama(prompt)`) needs.
        "tokenizer.ggml.add_bos_token": "true",
        # Meta's per-exchange sp.encode puts "▁" in front of each segment, also after <s>.
        "tokenizer.ggml.add_space_prefix": "true",
    }
    problems = [
        f"{key}: expected {value!r:.80}, found {metadata.get(key)!r:.80}"
        for key, value in expected.items()
        if metadata.get(key, "true" if key == "tokenizer.ggml.add_space_prefix" else None) != value
    ]
    if problems:
        raise GGUFCheckError(f"{path}: " + "; ".join(problems))
    return {key: metadata.get(key) for key in expected if key != "tokenizer.chat_template"}


def gguf_path(cfg, run_dir: Path, type_name: str) -> Path:
    """`run_dir/gguf/<name>-<TYPE>.gguf`: the file name carries the type."""
    return run_dir / "gguf" / f"{cfg.export.name or cfg.model.name + '-' + cfg.data.name}-{type_name}.gguf"


def run(cfg, run_dir: Path) -> dict:
    from pipeline.ladder import gguf_rung
    from pipeline.tokenizer import load_tokenizer

    merged = run_dir / "merged"
    if not (merged / "config.json").is_file():
        raise FileNotFoundError(f"{merged} not found or incomplete: run stage=merge first")
    for shard in sorted(merged.glob("*.safetensors")):
        check_safetensors(shard)
    tokenizer = load_tokenizer(merged)
    outfile = gguf_path(cfg, run_dir, OUTTYPES[cfg.export.outtype])
    checked = {}
    llamacpp = LlamaCpp(cfg.llamacpp.dir)
    convert_to_gguf(
        merged,
        outfile,
        cfg.export.outtype,
        check=lambda tmp: checked.update(check_gguf(tmp, tokenizer.bos_token_id, tokenizer.eos_token_id)),
        llamacpp=llamacpp,
    )
    log.info("wrote %s (%.1f MB), metadata checked: %s", outfile, outfile.stat().st_size / 1e6, checked)
    return {
        "gguf": outfile.name,
        "metadata": checked,
        "llama_cpp": llamacpp.version(),
        "ladder": {OUTTYPES[cfg.export.outtype]: gguf_rung(cfg, run_dir, outfile)},
    }
