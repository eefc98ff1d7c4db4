"""Peak memory and wall time of merging a LoRA adapter into a >= 1 GB fp16 Llama: the project's
streaming merge (`pipeline.stages.merge.merge_weights`) against peft's `merge_and_unload()`.

    python bench/merge_memory.py [--size-gb 1.0] [--out DIR] [--shard-size 200MB]
    python bench/merge_memory.py --run-dir RUN_DIR --dtype bfloat16 --shard-size 2GB  # a run's own

`--run-dir` merges a finished run's own base and trained adapter (`RUN_DIR/base`, `RUN_DIR/adapter`;
for experiment=llama2_7b_shape, Llama-2-7B's shape and the recipe's r=64 LoRA) instead of building
a random pair: step 1 is skipped.

1. Builds a randomly initialised Llama of at least `--size-gb` GB of fp16 weights (hidden 2048,
   enough layers to reach the size), saved with `save_pretrained(max_shard_size=...)` so the base
   is sharded, and a random LoRA adapter for it (peft, r=16 on every linear layer, lora_B
   randomised so every delta is non-zero).
2. Runs each merge in its own fresh Python process, so each peak RSS (`ru_maxrss`) is that
   method's alone:
   - project: `pipeline.stages.merge.load_adapter` + `pipeline.stages.merge.merge_weights(...)` into shards;
   - peft: `AutoModelForCausalLM.from_pretrained(dtype=float16)` + `PeftModel.from_pretrained`
     + `merge_and_unload()` + `save_pretrained(max_shard_size=...)`.
   Both workers import the same libraries before the clock starts; the RSS after those imports
   is reported too (`import RSS`), so the merge's own share is visible.
3. Checks that both outputs hold the same tensors (same names and shapes, max |diff| small) and
   that the LoRA deltas were really applied (the merged weights differ from the base).
4. Prints a table: peak RSS MB, seconds, and project / peft ratios.

`--out DIR` keeps the models, the merged outputs and `results.json` there; without it
everything lives in a temporary directory that is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

from harness import Column, peak_rss_mb, ratio, run_child, save_results, script_command, table

HIDDEN, INTERMEDIATE, HEADS, VOCAB = 2048, 5504, 16, 32000
LORA_R, LORA_ALPHA = 16, 32


def llama_config(size_gb: float):
    """A Llama config whose fp16 weights are at least `size_gb` * 1e9 bytes."""
    from transformers import LlamaConfig

    per_layer = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN  # attention, MLP, 2 norms
    fixed = 2 * VOCAB * HIDDEN + HIDDEN  # embed_tokens, lm_head (untied), final norm
    layers = max(1, math.ceil((size_gb * 1e9 / 2 - fixed) / per_layer))
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    return config, (fixed + layers * per_layer)


def build(work: Path, size_gb: float, shard_size: str) -> dict:
    """Random base (sharded safetensors) and random LoRA adapter under `work`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config, n_params = llama_config(size_gb)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    assert sum(p.numel() for p in model.parameters()) == n_params
    base_dir, adapter_dir = work / "base", work / "adapter"
    model.save_pretrained(base_dir, max_shard_size=shard_size)
    lora = LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        target_modules="all-linear",
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # peft initialises B to zero: the merge would be a no-op
                param.normal_(0.0, 0.02)
    peft_model.save_pretrained(adapter_dir)
    del peft_model, model
    shards = sorted(base_dir.glob("*.safetensors"))
    return {
        "layers": config.num_hidden_layers,
        "params": n_params,
        "base_bytes": sum(p.stat().st_size for p in shards),
        "base_shards": len(shards),
        "adapter_bytes": (adapter_dir / "adapter_model.safetensors").stat().st_size,
        "build_seconds": time.perf_counter() - start,
    }


def describe_run(run_dir: Path) -> dict:
    """The base and adapter of a finished run, as `build` describes the pair it makes."""
    config = json.loads((run_dir / "base" / "config.json").read_text())
    shards = sorted((run_dir / "base").glob("*.safetensors"))
    from pipeline.machine.memory import tensor_shapes

    return {
        "layers": config["num_hidden_layers"],
        "params": sum(math.prod(shape) for shape in tensor_shapes(shards).values()),
        "base_bytes": sum(p.stat().st_size for p in shards),
        "base_shards": len(shards),
        "adapter_bytes": (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size,
    }


# ------------------------------------------------------------------ workers (fresh processes)


def worker(
    method: str, base_dir: Path, adapter_dir: Path, out_dir: Path, shard_size: str, dtype_name: str
) -> dict:
    # The same imports for both methods, before the clock and the baseline RSS.
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from pipeline.stages import merge as project_merge

    import_rss = peak_rss_mb()
    dtype = getattr(torch, dtype_name)
    start = time.perf_counter()
    if method == "project":
        _, deltas = project_merge.load_adapter(adapter_dir)
        base_files = sorted(base_dir.glob("*.safetensors"))
        out_dir.mkdir(parents=True)
        max_bytes = project_merge.parse_size(shard_size)
        stats = project_merge.merge_weights(
            base_files, deltas, out_dir, dtype, max_bytes, roundtrip=set(), quantization={}
        )
    elif method == "peft":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype, device_map="cpu")
        model = PeftModel.from_pretrained(model, str(adapter_dir))
        merged = model.merge_and_unload()
        merged.save_pretrained(out_dir, max_shard_size=shard_size)
        stats = {"shards": len(list(out_dir.glob("*.safetensors")))}
    else:
        raise SystemExit(f"unknown method {method!r}")
    seconds = time.perf_counter() - start
    return {
        "method": method,
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "import_rss_mb": import_rss,
        **stats,
    }


def run_worker(
    method: str, work: Path, shard_size: str, size_gb: float, pair: Path | None = None, dtype: str = "float16"
) -> dict:
    """This script with `--worker <method>` in a fresh Python process; its last stdout line is JSON."""
    out_dir = work / f"merged-{method}"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    command = script_command(
        __file__,
        "--worker",
        method,
        "--out",
        str(work),
        "--shard-size",
        shard_size,
        "--size-gb",
        str(size_gb),
        "--pair",
        str(pair or work),
        "--dtype",
        dtype,
    )
    return run_child(command, what=f"{method} worker").json()


# ------------------------------------------------------------------ checks and report


def compare_outputs(work: Path, pair: Path) -> dict:
    """Same tensor names and shapes in both merged outputs; max |diff| between them and vs the base."""
    import torch
    from safetensors import safe_open

    from pipeline.stages.merge import load_adapter

    def index(directory: Path) -> dict[str, Path]:
        return {
            name: f for f in sorted(directory.glob("*.safetensors")) for name in safe_open(f, "pt").keys()
        }

    def tensor(files: dict[str, Path], name: str) -> torch.Tensor:
        with safe_open(files[name], "pt") as f:
            return f.get_tensor(name)

    project, peft_out, base = (
        index(work / "merged-project"),
        index(work / "merged-peft"),
        index(pair / "base"),
    )
    if set(project) != set(peft_out) or set(project) != set(base):
        raise SystemExit(
            f"tensor names differ: only in project {sorted(set(project) - set(peft_out))[:5]}, only in peft "
            f"{sorted(set(peft_out) - set(project))[:5]}, "
            f"base vs project {sorted(set(base) ^ set(project))[:5]}"
        )
    max_diff, differing, max_delta, changed, changed_peft, adapted = 0.0, 0, 0.0, 0, 0, 0
    _, deltas = load_adapter(pair / "adapter")
    for name in sorted(project):
        x, y, w = tensor(project, name), tensor(peft_out, name), tensor(base, name)
        if x.shape != y.shape or x.dtype != y.dtype:
            raise SystemExit(f"{name}: project {tuple(x.shape)} {x.dtype}, peft {tuple(y.shape)} {y.dtype}")
        diff = (x.float() - y.float()).abs()
        max_diff, differing = max(max_diff, diff.max().item()), differing + int((diff > 0).sum())
        delta = (x.float() - w.float()).abs().max().item()
        max_delta = max(max_delta, delta)
        changed += delta > 0
        changed_peft += not torch.equal(y, w)
        adapted += name in deltas
    return {
        "tensors": len(project),
        "adapted_tensors": adapted,
        "tensors_changed_vs_base": changed,
        "tensors_changed_vs_base_peft": changed_peft,
        "max_abs_diff_project_vs_peft": max_diff,
        "elements_differing_project_vs_peft": differing,
        "max_abs_delta_vs_base": max_delta,
    }


def report(results: dict[str, dict]) -> str:
    p, q = results["project"], results["peft"]
    rows = [
        ("peak RSS MB", p["peak_rss_mb"], q["peak_rss_mb"]),
        ("  of which imports MB", p["import_rss_mb"], q["import_rss_mb"]),
        ("  above imports MB", p["peak_rss_mb"] - p["import_rss_mb"], q["peak_rss_mb"] - q["import_rss_mb"]),
        ("seconds", p["seconds"], q["seconds"]),
    ]
    columns = [Column("", 22, "<"), Column("project", 10), Column("peft", 10), Column("project/peft", 13)]
    return table(columns, [(label, f"{a:.1f}", f"{b:.1f}", ratio(a, b, suffix="")) for label, a, b in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="fp16 size of the random base, GB (1e9 B)")
    parser.add_argument("--out", type=Path, help="keep everything here (default: a temporary directory)")
    parser.add_argument("--shard-size", default="200MB", help="max shard size of the base and both outputs")
    parser.add_argument("--run-dir", type=Path, help="merge this finished run's base and adapter")
    parser.add_argument("--dtype", default="float16", help="of the base and both outputs")
    parser.add_argument("--worker", choices=["build", "project", "peft"], help=argparse.SUPPRESS)
    parser.add_argument("--pair", type=Path, help=argparse.SUPPRESS)  # the directory with base/, adapter/
    args = parser.parse_args()

    if args.worker == "build":
        print(json.dumps(build(args.out, args.size_gb, args.shard_size)))
        return
    if args.worker:
        out_dir = args.out / f"merged-{args.worker}"
        base, adapter = args.pair / "base", args.pair / "adapter"
        print(json.dumps(worker(args.worker, base, adapter, out_dir, args.shard_size, args.dtype)))
        return

    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="merge-memory-")
    work = args.out or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        pair = args.run_dir or work
        if args.run_dir:
            model = describe_run(args.run_dir)
            print(
                f"base: {args.run_dir / 'base'}, {model['layers']} layers, {model['params'] / 1e6:.0f}M "
                f"params, {model['base_bytes'] / 1e9:.2f} GB in {model['base_shards']} shards; its trained "
                f"adapter, {model['adapter_bytes'] / 1e6:.1f} MB"
            )
        else:
            for name in ("base", "adapter"):
                if (work / name).exists():
                    shutil.rmtree(work / name)
            # a child too: this process stays small
            model = run_worker("build", work, args.shard_size, args.size_gb, work, args.dtype)
            print(
                f"base: random Llama, hidden {HIDDEN}, {model['layers']} layers, "
                f"{model['params'] / 1e6:.0f}M params, {model['base_bytes'] / 1e9:.2f} GB fp16 in "
                f"{model['base_shards']} shards; adapter r={LORA_R} all-linear, "
                f"{model['adapter_bytes'] / 1e6:.1f} MB (built in {model['build_seconds']:.0f} s)"
            )
            if model["base_bytes"] < args.size_gb * 1e9:
                raise SystemExit(f"base is {model['base_bytes']} bytes, below --size-gb {args.size_gb}")

        results = {}
        for method in ("project", "peft"):
            results[method] = run_worker(method, work, args.shard_size, args.size_gb, pair, args.dtype)
        check = compare_outputs(work, pair)
        print(
            f"outputs: {check['tensors']} tensors, same names and shapes; max |project - peft| "
            f"{check['max_abs_diff_project_vs_peft']:.3g} ({check['elements_differing_project_vs_peft']} "
            f"elements differ); tensors changed vs the base: "
            f"project {check['tensors_changed_vs_base']}, peft "
            f"{check['tensors_changed_vs_base_peft']}, of {check['adapted_tensors']} adapted "
            f"(max |delta| {check['max_abs_delta_vs_base']:.3g})"
        )
        print()
        print(report(results))
        if check["max_abs_diff_project_vs_peft"] > 1e-2:
            raise SystemExit("the two merges disagree: max |diff| > 1e-2")
        adapted = check["adapted_tensors"]
        if not check["tensors_changed_vs_base"] == check["tensors_changed_vs_base_peft"] == adapted > 0:
            raise SystemExit("the adapted tensors and the tensors the merges changed differ")
        if args.out:
            save_results(work / "results.json", {"model": model, "results": results, "check": check})
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
