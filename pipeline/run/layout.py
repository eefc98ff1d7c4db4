"""The run directory's layout, written once. The stage table (`pipeline.stages`), the stages and
the tests find every path of a run here, and a GGUF's quant type is read back from its name here.

    run_dir/
      data/{train,eval}.jsonl         data
      base/                           train (model=tiny: the random base it builds)
      checkpoints/, adapter/          train
      metrics/<stage>.json            train, merge
      merged/                         merge (safetensors, tokenizer, chat template, model card)
      gguf/<name>-<TYPE>.gguf         convert (export.outtype), quantize (export.quants)
      gguf/<name>-<TYPE>.Modelfile    the same stage: Ollama's Modelfile next to each GGUF
      gguf/<name>.imatrix.gguf        quantize (importance matrix from the training rows)
      metrics/ladder.json, gguf/README.md   ladder (every artifact against the F16 GGUF)
      smoke/report.json               smoke
      manifest.json                   every stage (pipeline.run.manifest)
      .lock                           held by the run using the dir (pipeline.run.runlock)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# export.outtype (the converter's --outtype) -> the GGUF type name in the file name.
OUTTYPES = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "f32": "F32"}


def gguf_stem(cfg) -> str:
    """The name every GGUF of the run starts with: export.name, or <model.name>-<data.name>."""
    return cfg.export.name or f"{cfg.model.name}-{cfg.data.name}"


def quant_type(gguf: Path) -> str:
    """The type a GGUF's file name carries: `<name>-Q4_K_M.gguf` -> `Q4_K_M`."""
    return Path(gguf).stem.rsplit("-", 1)[-1]


@dataclass(frozen=True)
class RunDir:
    root: Path
    name: str = "model"  # gguf_stem(cfg)

    @classmethod
    def of(cls, cfg, root: Path | str | None = None) -> RunDir:
        return cls(Path(root if root is not None else cfg.run_dir), gguf_stem(cfg))

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def train_rows(self) -> Path:
        return self.data / "train.jsonl"

    @property
    def eval_rows(self) -> Path:
        return self.data / "eval.jsonl"

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    def metrics(self, stage: str) -> Path:
        return self.root / "metrics" / f"{stage}.json"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def merge_compare(self) -> Path:
        return self.root / ".merge-compare"  # hidden: a scratch merge, never an artifact

    @property
    def gguf_dir(self) -> Path:
        return self.root / "gguf"

    def gguf(self, type_name: str) -> Path:
        return self.gguf_dir / f"{self.name}-{type_name}.gguf"

    def modelfile(self, type_name: str) -> Path:
        """The Ollama Modelfile next to a GGUF (`<name>-<TYPE>.Modelfile`, FROM that GGUF)."""
        return self.gguf(type_name).with_suffix(".Modelfile")

    @property
    def imatrix(self) -> Path:
        """llama-imatrix's importance matrix from the training rows (`<name>.imatrix.gguf`)."""
        return self.gguf_dir / f"{self.name}.imatrix.gguf"

    def converted_gguf(self, outtype: str) -> Path:
        """The converter's output for export.outtype (f16 -> `<name>-F16.gguf`)."""
        return self.gguf(OUTTYPES[outtype])

    @property
    def smoke(self) -> Path:
        return self.root / "smoke"

    @property
    def smoke_report(self) -> Path:
        return self.smoke / "report.json"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"
