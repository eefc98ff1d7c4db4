"""`run_dir/manifest.json`: every artifact of a run with its sha256 and size, which stage made it
from which inputs under which config, plus the resolved config and the library versions.

It is also how a stage knows it can be skipped: same config hash, same input hashes, and its
outputs still on disk with the recorded hashes.

Every file it hashes is listed under "hashed" with the size, inode and modification and change
times it had then. A file whose four are unchanged is not read again (git's index and make trust
the same): at 7B the merged model and the F16 GGUF are 13.5 GB each, and hashing them again at
every stage that names them took about a minute and pushed the GGUF its next stage reads out of the
page cache. Writing the file, or setting its modification time back, changes its change time.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from importlib import metadata
from pathlib import Path

from pipeline.run.errors import DataError
from pipeline.run.io import sha256_file, write_json
from pipeline.run.layout import RunDir

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


TIMESTAMP_TICK_NS = 50_000_000  # above the kernel's coarse clock tick (4 ms at HZ=250, 10 at 100)


def package_versions(names) -> dict[str, str | None]:
    """The installed version of each package, None where it is missing."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def library_versions(llamacpp_dir: str | None = None) -> dict:
    from pipeline.engines.llamacpp import LlamaCpp

    versions: dict = {"python": platform.python_version(), **package_versions(LIBRARIES)}
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
    elif not isinstance(data.setdefault("hashed", {}), dict):  # absent from manifests before it
        problem = 'expected a "hashed" object'
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
            self.data = {"artifacts": {}, "stages": {}, "hashed": {}}

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
            out[key] = self.digest(f, key)
        return out

    def digest(self, path: Path, key: str) -> str:
        """sha256 of a file: the one recorded under "hashed" while the file's stat is unchanged."""
        stat = path.stat()
        seen = {
            "size": stat.st_size,
            "inode": stat.st_ino,
            "mtime_ns": stat.st_mtime_ns,
            "ctime_ns": stat.st_ctime_ns,
        }
        recorded = self.data["hashed"].get(key)
        if isinstance(recorded, dict) and {k: recorded.get(k) for k in seen} == seen:
            return recorded["sha256"]
        digest = sha256_file(path)
        # File times tick coarsely: a file changed within a tick of its hash could change again
        # unseen, so it is hashed again next time (git's "racily clean" entries).
        if time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) > TIMESTAMP_TICK_NS:
            self.data["hashed"][key] = {**seen, "sha256": digest}
        return digest

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
            if self.digest(path, rel) != artifact["sha256"]:
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
            if not path.is_file() or self.digest(path, rel) != self.data["artifacts"][rel]["sha256"]:
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
            "memory": memory or {},  # peak resident memory (pipeline.machine.memory.StagePeak)
            "config_hash": config_hash(stage_config),
            "inputs": self.hashes(inputs),
            "outputs": sorted(outputs_hashes),
            "metrics": metrics or {},
        }
        self.data["hashed"] = {  # files gone (an older run's GGUFs) are not listed
            key: seen for key, seen in self.data["hashed"].items() if (self.run_dir / key).is_file()
        }
        self.data["config"] = full_config
        self.data["versions"] = library_versions((full_config.get("llamacpp") or {}).get("dir"))
        write_json(self.path, self.data)
