"""Wall time of the convert and quantize stages against calling llama.cpp's own tools directly on the
same merged model, in the same run; prints the overhead ratio (target: at most 1.05).

    python bench/convert_quantize.py RUN_DIR [--experiment NAME] [--repeats 3]

RUN_DIR is a finished run (its merged/ and data/ are read, linked into a scratch run dir; its gguf/
is left alone: everything is written to the scratch dir, one side's GGUFs at a time). Both sides
do the same work:
- direct: `python convert_hf_to_gguf.py merged --outtype f16`, then `llama-imatrix` over the same
  calibration text when the config asks for an importance matrix, then `llama-quantize` per type
  (with `--imatrix` for the types that use it);
- stages: `python -m pipeline stage=convert` then `stage=quantize force=true` (which add the GGUF
  checks, the calibration text, the manifest and Python start-up), timed whole and by the seconds
  each stage records for its own work (without the start-up, a fixed cost of a few seconds that
  weighs on a tiny model and vanishes on a 7B).
Rounds alternate between the two; the best round of each counts. The scratch run's manifest starts
with the hashes of merged/ and data/, which the merge and data stages record when they write them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from harness import best, compose, pipeline_command, ratio, run_child


def timed(command: list[str]) -> float:
    return run_child(command).seconds


def direct(cfg, run_dir: Path, out: Path, calibration: Path) -> float:
    from pipeline.engines.llamacpp import LlamaCpp

    llamacpp = LlamaCpp(cfg.llamacpp.dir)
    f16 = out / "model-F16.gguf"
    seconds = timed(
        [
            sys.executable,
            str(llamacpp.converter()),
            str(run_dir / "merged"),
            "--outfile",
            str(f16),
            "--outtype",
            cfg.export.outtype,
        ]
    )
    imatrix = out / "imatrix.gguf"
    settings = cfg.export.imatrix
    if settings.types:
        seconds += timed(
            [
                str(llamacpp.tool("llama-imatrix")),
                "-m",
                str(f16),
                "-f",
                str(calibration),
                "-o",
                str(imatrix),
                "--parse-special",
                "-c",
                str(settings.ctx),
                "--chunks",
                str(settings.chunks),
                "--no-ppl",
                "-t",
                str(os.cpu_count()),
            ]
        )
    for type_name in cfg.export.quants:
        extra = ["--imatrix", str(imatrix)] if type_name in settings.types else []
        seconds += timed(
            [
                str(llamacpp.tool("llama-quantize")),
                *extra,
                str(f16),
                str(out / f"model-{type_name}.gguf"),
                type_name,
                str(os.cpu_count()),
            ]
        )
    return seconds


def stages(experiment: str, scratch_run: Path) -> tuple[float, float]:
    """(wall time of both commands, the stages' own seconds from the manifest: no Python start-up)."""
    base = [f"experiment={experiment}", f"run_dir={scratch_run}", "force=true"]
    wall = timed(pipeline_command(*base, "stage=convert")) + timed(pipeline_command(*base, "stage=quantize"))
    recorded = json.loads((scratch_run / "manifest.json").read_text())["stages"]
    return wall, recorded["convert"]["seconds"] + recorded["quantize"]["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--experiment", default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from pipeline.chat.rows import read_jsonl
    from pipeline.chat.tokenizer import load_tokenizer
    from pipeline.run.io import write_json
    from pipeline.run.manifest import Manifest
    from pipeline.stages.quantize import calibration_text

    cfg = compose(f"experiment={args.experiment}", f"run_dir={args.run_dir}")
    with tempfile.TemporaryDirectory(prefix="convert-quantize-") as scratch:
        scratch = Path(scratch)
        scratch_run = scratch / "run"
        scratch_run.mkdir()
        for part in ("merged", "data"):  # read only by both sides: linked, not copied (13.5 GB at 7B)
            (scratch_run / part).symlink_to((args.run_dir / part).resolve(), target_is_directory=True)
        # In a pipeline run the merge and data stages hash what they wrote: convert starts from a
        # manifest that has those hashes, and so does this run.
        known = Manifest(scratch_run)
        known.hashes([scratch_run / "merged", scratch_run / "data"])
        write_json(known.path, known.data)
        tokenizer = load_tokenizer(scratch_run / "merged")
        rows = read_jsonl(scratch_run / "data" / "train.jsonl")
        text, _ = calibration_text(rows, tokenizer, cfg.export.imatrix.ctx * cfg.export.imatrix.chunks)
        calibration = scratch / "calibration.txt"
        calibration.write_text(text, encoding="utf-8")
        rounds = {"direct": [], "stages": [], "stages_own": []}
        for _ in range(args.repeats):
            out = scratch / "direct"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            rounds["direct"].append(direct(cfg, scratch_run, out, calibration))
            shutil.rmtree(out)  # so that one side's GGUFs are on disk at a time (25 GB at 7B)
            wall, own = stages(args.experiment, scratch_run)
            rounds["stages"].append(wall)
            rounds["stages_own"].append(own)
    fastest = {side: best(times) for side, times in rounds.items()}
    print(json.dumps({"rounds": rounds, "best": fastest}))
    print(
        f"\nconvert + quantize {list(cfg.export.quants)} (imatrix for {list(cfg.export.imatrix.types)}), "
        f"{args.run_dir}, best of {args.repeats}, {os.cpu_count()} CPUs"
    )
    direct_s, stages_s, own = fastest["direct"], fastest["stages"], fastest["stages_own"]
    print(f"llama.cpp's tools directly: {direct_s:.2f} s   the stages: {stages_s:.2f} s")
    print(f"overhead ratio (stages / direct): {ratio(stages_s, direct_s, 3, '')} (target <= 1.05)")
    print(
        f"the stages' own seconds (manifest; no Python start-up): {own:.2f} s, "
        f"ratio {ratio(own, direct_s, 3, '')}"
    )


if __name__ == "__main__":
    main()
