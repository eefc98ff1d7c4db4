"""`run_dir/manifest.json`: every artifact of a run with its sha256 and size, which stage made it
from which inputs under which config, plus the resolved config and the library versions.

It is also how a stage knows it can be skipped: same config hash, same input hashes, and its
outputs still on disk with the recorded hashes.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from importlib import metadata
from pathlib import Path

from pipeline.errors import DataError
from pipeline.io import sha256_file, write_json
from pipeline.layout import RunDir

LIBRARIES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "bitsandbytes",
    "accelerate",
    "datasets",
    "tokenizers",
    "sentencepiece",
    "safetensors",
    "hydra-core",
    "llama-cpp-python",
    "minijinja",
)


def library_versions(llamacpp_dir: str | None = None) -> dict:
    from pipeline.llamacpp import LlamaCpp

    versions: dict = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    # The one llama.cpp commit behind the converter, quantizer, bindings and server.
    try:
        versions["llama.cpp"] = LlamaCpp(llamacpp_dir).version()
    except (FileNotFoundError, RuntimeError) as err:
        versions["llama.cpp"] = f"not found: {err}"
    return versions


def config_hash(stage_config) -> str:
    return hashlib.sha256(json.dumps(stage_config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def files_of(paths: list[Path]) -> list[Path]:
    """Files under `paths` (directories expanded), sorted; hidden temporaries are not artifacts."""
    files = []
    for path in paths:
        if path.is_dir():
            files += [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
        elif path.is_file():
            files.append(path)
    return sorted(files)


def read_manifest(path: Path) -> dict:
    """The manifest, or a DataError naming it when it is not one the pipeline wrote (edited by hand,
    cut short): a stage never decides what to skip, or records its outputs, on a damaged record."""
    advice = "restore it, or move it away to rerun every stage"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err}): {advice}") from err
    stage_keys = {"config_hash": str, "inputs": dict, "outputs": list}
    artifact_keys = {"sha256": str, "size": int, "stage": str}
    problem = None
    if not isinstance(data, dict) or not isinstance(data.get("artifacts"), dict):
        problem = 'expected an object with "artifacts" and "stages" objects'
    elif not isinstance(data.get("stages"), dict):
        problem = 'expected a "stages" object'
    else:
        for name, record in data["stages"].items():
            if not isinstance(record, dict) or any(
                not isinstance(record.get(k), t) for k, t in stage_keys.items()
            ):
                problem = f"stages.{name}: expected {', '.join(stage_keys)}"
                break
        for rel, artifact in data["artifacts"].items():
            if not isinstance(artifact, dict) or any(
                not isinstance(artifact.get(k), t) for k, t in artifact_keys.items()
            ):
                problem = f"artifacts.{rel}: expected {', '.join(artifact_keys)}"
                break
    if problem:
        raise DataError(f"{path}: not a manifest this pipeline wrote ({problem}): {advice}")
    return data


class Manifest:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = RunDir(self.run_dir).manifest
        if self.path.exists():
            self.data = read_manifest(self.path)
        else:
            self.data = {"artifacts": {}, "stages": {}}

    def rel(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.run_dir.resolve()).as_posix()

    def hashes(self, paths: list[Path]) -> dict[str, str]:
        """sha256 of each file under `paths`, by path relative to the run dir (or absolute outside it)."""
        out = {}
        for f in files_of(paths):
            try:
                key = self.rel(f)
            except ValueError:
                key = str(f.resolve())
            out[key] = sha256_file(f)
        return out

    def is_fresh(self, stage: str, inputs: list[Path], stage_config) -> bool:
        record = self.data["stages"].get(stage)
        if not record or record["config_hash"] != config_hash(stage_config):
            return False
        if record["inputs"] != self.hashes(inputs):
            return False
        for rel in record["outputs"]:
            artifact = self.data["artifacts"].get(rel)
            path = self.run_dir / rel
            if artifact is None or not path.is_file() or path.stat().st_size != artifact["size"]:
                return False
            if sha256_file(path) != artifact["sha256"]:
                return False
        return True

    def record(
        self,
        stage: str,
        outputs: list[Path],
        inputs: list[Path],
        stage_config,
        full_config,
        metrics: dict | None = None,
        seconds: float | None = None,
        memory: dict | None = None,
    ) -> None:
        outputs_hashes = self.hashes(outputs)
        earlier = [
            rel
            for rel, a in self.data["artifacts"].items()
            if a["stage"] == stage and rel not in outputs_hashes
        ]
        for rel in (
            earlier
        ):  # what an earlier run of the stage made stays listed while it is still on disk, unchanged
            path = self.run_dir / rel
            if not path.is_file() or sha256_file(path) != self.data["artifacts"][rel]["sha256"]:
                del self.data["artifacts"][rel]
        for rel, digest in outputs_hashes.items():
            self.data["artifacts"][rel] = {
                "sha256": digest,
                "size": (self.run_dir / rel).stat().st_size,
                "stage": stage,
            }
        self.data["stages"][stage] = {
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": seconds,  # wall clock of the stage's own work
            "memory": memory or {},  # peak resident memory (pipeline.memory.StagePeak)
            "config_hash": config_hash(stage_config),
            "inputs": self.hashes(inputs),
            "outputs": sorted(outputs_hashes),
            "metrics": metrics or {},
        }
        self.data["config"] = full_config
        self.data["versions"] = library_versions((full_config.get("llamacpp") or {}).get("dir"))
        write_json(self.path, self.data)
