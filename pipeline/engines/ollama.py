"""An Ollama Modelfile next to a GGUF, so that ollama serves it in Meta's Llama-2 chat layout.

    ollama create NAME -f gguf/<name>-Q4_K_M.Modelfile
    ollama run NAME

ollama renders its own Go text/template (`pipeline.chat.format.LLAMA2_OLLAMA_TEMPLATE`), never the GGUF's
Jinja chat template. `FROM` is relative, so the Modelfile works wherever the GGUF folder is copied
to, as long as the two stay side by side.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.chat.format import CONTROL_TOKEN_TEXT, LLAMA2_OLLAMA_TEMPLATE, TURN_TAGS
from pipeline.run.errors import DataError
from pipeline.run.io import atomic_file

# Stop strings: exactly the texts the template refuses in a message. A well-formed answer ends with
# the EOS token, which ends generation on its own (Meta stops only on EOS too) before any of these
# could match, so they never cut one. An answer that spells one out as text (a model running on into
# a next `[INST]` turn, or writing `</s>`) is cut there instead of going into the conversation's
# history, where it would make the template refuse every later request of that conversation. The
# cost: an answer quoting one of them (say HTML's `<s>` tag) ends at it. Writing any `stop` replaces
# the stop list ollama would otherwise take from an auto-detected template, so the list is complete.
STOP = TURN_TAGS + CONTROL_TOKEN_TEXT


def modelfile_text(gguf_name: str, num_ctx: int = 4096) -> str:
    """The Modelfile for the GGUF file `gguf_name` (only its file name is used: FROM ./<name>)."""
    name = Path(gguf_name).name
    if not (name.isascii() and name.isprintable()) or '"' in name:
        raise DataError(f"{gguf_name!r}: the Modelfile's FROM needs a printable ASCII name without quotes")
    if '"""' in LLAMA2_OLLAMA_TEMPLATE:  # TEMPLATE """...""" has no escapes: it would end there
        raise DataError('the Ollama template must not contain """')
    lines = [
        f"# Llama-2 chat in Meta's layout. Build: ollama create NAME -f {Path(name).stem}.Modelfile",
        f"FROM ./{name}",
        f'TEMPLATE """{LLAMA2_OLLAMA_TEMPLATE}"""',
        f"PARAMETER num_ctx {int(num_ctx)}",
        *(f'PARAMETER stop "{stop}"' for stop in STOP),
    ]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf: Path, num_ctx: int = 4096) -> Path:
    """Write `<gguf stem>.Modelfile` next to `gguf` (atomically) and return its path."""
    gguf = Path(gguf)
    path = gguf.with_suffix(".Modelfile")
    with atomic_file(path) as tmp:
        tmp.write_text(modelfile_text(gguf.name, num_ctx), encoding="ascii")
    return path
