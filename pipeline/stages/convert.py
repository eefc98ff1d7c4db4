"""Convert stage: `merged/` -> `gguf/<name>-<TYPE>.gguf` (TYPE from export.outtype) with llama.cpp's
own converter, checked for the chat template and BOS/EOS settings before it gets its final name."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.engines.gguf import check_gguf, convert_to_gguf, special_ids
from pipeline.engines.llamacpp import LlamaCpp
from pipeline.engines.ollama import write_modelfile
from pipeline.machine.diskspace import gguf_bytes, require_free, safetensors_elements
from pipeline.machine.memory import require_memory
from pipeline.run.errors import MissingInput
from pipeline.run.io import check_safetensors
from pipeline.run.layout import RunDir, quant_type

log = logging.getLogger(__name__)


def run(cfg, run_dir: Path) -> dict:
    layout = RunDir.of(cfg, run_dir)
    if not (layout.merged / "config.json").is_file():
        raise MissingInput(f"{layout.merged} not found or incomplete: run stage=merge first")
    for shard in sorted(layout.merged.glob("*.safetensors")):
        check_safetensors(shard)
    bos_id, eos_id = special_ids(layout.merged)
    llamacpp = LlamaCpp(cfg.llamacpp.dir)

    outfile = layout.converted_gguf(cfg.export.outtype)
    shards = sorted(layout.merged.glob("*.safetensors"))
    elements = safetensors_elements(shards)
    # llama.cpp's converter reads the shards lazily and turns a bfloat16 tensor into float32 on its
    # way to the GGUF type: at most about one shard's tensors in float32 at a time.
    largest = max(shard.stat().st_size for shard in shards)
    memory = require_memory(cfg, "convert", {"a merged shard's tensors in float32": 2 * largest})
    require_free(outfile.parent, gguf_bytes(elements, quant_type(outfile)), f"{outfile.name}")
    checked = {}
    convert_to_gguf(
        layout.merged,
        outfile,
        cfg.export.outtype,
        check=lambda tmp: checked.update(check_gguf(tmp, bos_id, eos_id)),
        llamacpp=llamacpp,
    )
    write_modelfile(outfile)  # ollama never runs the GGUF's Jinja template: its own Go template beside it
    log.info("wrote %s (%.1f MB), metadata checked: %s", outfile, outfile.stat().st_size / 1e6, checked)
    return {
        "gguf": outfile.name,
        "metadata": checked,
        "llama_cpp": llamacpp.version(),
        "memory_estimate": memory,
    }
