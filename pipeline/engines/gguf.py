"""GGUF files with llama.cpp's own tools: convert a HF checkpoint (`convert_hf_to_gguf.py`, from the
same llama.cpp tree as the bindings and the server, see `pipeline.engines.llamacpp`), quantize, and check
that a GGUF carries the chat template and BOS/EOS settings that keep Meta's token ids."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

from pipeline.chat.format import LLAMA2_CHAT_TEMPLATE
from pipeline.engines.llamacpp import LlamaCpp
from pipeline.machine.processes import die_with_parent
from pipeline.run.errors import ConfigError, DataError, GGUFCheckError, ToolFailed
from pipeline.run.io import atomic_file
from pipeline.run.layout import OUTTYPES, quant_type
from pipeline.run.progress import stderr_is_terminal


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
        raise ConfigError(f"export.outtype={outtype!r}: expected one of {sorted(OUTTYPES)}")
    converter = (llamacpp or LlamaCpp()).converter()
    with atomic_file(outfile) as tmp:
        command = [sys.executable, str(converter), str(hf_dir), "--outfile", str(tmp), "--outtype", outtype]
        returncode, stderr = run_showing_progress(command + (["--vocab-only"] if vocab_only else []))
        if returncode != 0 or not tmp.is_file():
            raise_tool_failed(f"{converter} failed on {hf_dir}", stderr, tmp)
        if check is not None:
            check(tmp)


def raise_tool_failed(what: str, stderr: str, output: Path):
    """A llama.cpp tool failed: a full disk is the pipeline's one-line ENOSPC report naming the
    output; anything else keeps the tool's own words."""
    if os.strerror(errno.ENOSPC) in stderr:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(output))
    raise ToolFailed(f"{what}:\n{stderr[-3000:]}")


def run_showing_progress(command: list[str]) -> tuple[int, str]:
    """Run a tool that draws its own progress on stderr (the converter's tqdm bar): passed through
    when our stderr is a terminal, kept (its tail, for the error message) either way."""
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=die_with_parent
    )
    show, tail = stderr_is_terminal(), b""
    try:
        while chunk := process.stderr.read1(4096):
            if show:
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
            tail = (tail + chunk)[-6000:]
    except BaseException:
        # SIGTERM or Ctrl-C unwinding the stage: the tool must not go on writing its temporary
        # after atomic_file has removed it (subprocess.run kills its child the same way).
        process.kill()
        process.wait()
        raise
    return process.wait(), tail.decode(errors="replace")


GGUF_MAGIC = b"GGUF"


def open_llama(path: Path, **kwargs):
    """llama-cpp-python's `Llama` over a GGUF; a file that is not one, or that llama.cpp refuses
    (truncated, damaged), is a DataError naming it instead of the binding's bare ValueError."""
    from llama_cpp import Llama

    path = Path(path)
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise DataError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        return Llama(model_path=str(path), verbose=False, **kwargs)
    except ValueError as err:
        raise DataError(f"{path}: llama.cpp cannot load this GGUF (truncated or damaged?): {err}") from err


def check_gguf_loads(path: Path) -> None:
    """Fail, naming the file, unless llama.cpp loads the whole GGUF (its tensors' bounds included;
    memory-mapped, so even a 7B costs page cache, not RAM). Stages check their GGUF inputs with it
    before any work, so none proceeds on a damaged one."""
    open_llama(path, n_ctx=16, n_threads=1).close()


def read_gguf_metadata(path: Path) -> dict:
    """The GGUF's key/value metadata, read by llama.cpp itself (arrays are left out)."""
    llama = open_llama(path, vocab_only=True)
    try:
        return dict(llama.metadata)
    finally:
        llama.close()


def special_ids(hf_dir: Path) -> tuple[int, int]:
    """(BOS, EOS) of a merged directory, from the generation config the merge wrote from its tokenizer
    (read as JSON: no transformers import, seconds of start-up, just for two ids)."""
    import json

    config = json.loads((Path(hf_dir) / "generation_config.json").read_text())
    return config["bos_token_id"], config["eos_token_id"]


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


def known_quant_types() -> dict[str, int]:
    """{"Q4_K_M": ftype, ...}: every type this build of llama.cpp can quantize to."""
    import llama_cpp

    prefix = "LLAMA_FTYPE_MOSTLY_"
    return {name[len(prefix) :]: value for name, value in vars(llama_cpp).items() if name.startswith(prefix)}


def check_quant_types(names) -> None:
    """Before any work: a typo in export.quants must not cost a quantization first."""
    types = known_quant_types()
    unknown = [name for name in names if name not in types]
    if unknown:
        raise ConfigError(
            f"export.quants: unknown quant type {unknown[0]!r}; valid: {', '.join(sorted(types))}"
        )


def quantize_gguf(
    source: Path, outfile: Path, type_name: str, llamacpp: LlamaCpp, imatrix: Path | None = None, check=None
) -> None:
    """llama.cpp's own `llama-quantize` into a temporary, checked, then renamed; with `imatrix`, its
    importance matrix weights the quantization error (`--imatrix`)."""
    check_quant_types([type_name])
    command = [str(llamacpp.tool("llama-quantize"))]
    if imatrix is not None:
        command += ["--imatrix", str(imatrix)]
    # From an already quantized source (export.outtype=q8_0) llama.cpp requantizes only when told;
    # it costs fidelity, which the ladder then shows.
    if quant_type(source) not in ("F16", "BF16", "F32"):
        command.append("--allow-requantize")
    with atomic_file(outfile) as tmp:
        command += [str(source), str(tmp), type_name, str(os.cpu_count() or 1)]
        result = subprocess.run(command, capture_output=True, text=True, preexec_fn=die_with_parent)
        if result.returncode != 0 or not tmp.is_file():
            raise_tool_failed(
                f"llama-quantize {source} -> {type_name} failed ({result.returncode})", result.stderr, tmp
            )
        if check is not None:
            check(tmp)


def compute_imatrix(
    model: Path, calibration_text: Path, outfile: Path, llamacpp: LlamaCpp, ctx: int, chunks: int
) -> dict:
    """llama.cpp's own `llama-imatrix` over `calibration_text` (chat-formatted training rows; special
    tokens parsed, so the ids are those training saw), into a temporary, then renamed."""
    with atomic_file(outfile) as tmp:
        command = [
            str(llamacpp.tool("llama-imatrix")),
            "--model",
            str(model),
            "--file",
            str(calibration_text),
            "--output-file",
            str(tmp),
            "--output-format",
            "gguf",
            "--parse-special",
            "--ctx-size",
            str(ctx),
            "--chunks",
            str(chunks),
            "--no-ppl",
            "--threads",
            str(os.cpu_count() or 1),
            "--seed",
            "0",
        ]
        result = subprocess.run(command, capture_output=True, text=True, preexec_fn=die_with_parent)
        if result.returncode != 0 or not tmp.is_file():
            raise_tool_failed(
                f"llama-imatrix on {calibration_text} failed ({result.returncode})", result.stderr, tmp
            )
    chunk_counts = re.findall(r"computing over (\d+) chunks", result.stderr)
    return {"chunks": int(chunk_counts[-1]) if chunk_counts else None, "ctx": ctx}
