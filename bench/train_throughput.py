"""Train tokens/s of the project's train stage against a plain trl SFTTrainer script and a plain
PyTorch loop (the ceiling), on the CPU.

    python bench/train_throughput.py [--experiment tiny guanaco_tiny] [--steps N] [--repeats R] [--work DIR]

For each experiment (default: `tiny`, then `guanaco_tiny` where ../shared has the real guanaco rows
and Llama-2 tokenizer: varied lengths, where padding costs most), on the same model and data (its
data stage and tiny base, built once into a work dir and copied into every run dir), it measures:

- the project: `python -m pipeline stage=train experiment=E train.sft.max_steps=N` at its defaults
  (padding-free), and its padded (`train.sft.padding_free=false`) variant side by side; on `tiny`
  also `train.sft.packing=true` and the adapter in bf16; figures from metrics/train.json
  (`train_tokens_per_s`);
- a plain trl baseline: SFTTrainer with SFTConfig defaults except output_dir, max_steps=N,
  report_to=none, the project's per-device batch size and no packing (plus bf16=False, which a CPU
  needs: SFTConfig's bf16 default raises "Your setup doesn't support bf16/gpu" without a GPU). The
  data is given as a `messages` dataset with the tokenizer's chat template, and trl tokenizes it
  itself. Same 4-bit NF4 base (the project's BitsAndBytesConfig) and the same LoRA config;
- the same baseline with gradient_checkpointing=False (SFTConfig's default is True, the tiny
  experiment's is False), to show how much of the gap that one setting makes.

Tokens are counted the same way everywhere: include_num_input_tokens_seen="non_padding", tokens
seen between on_train_begin and on_train_end divided by that time (pipeline.stages.train.ThroughputCallback).
Every run is its own process, one after the other, in R interleaved rounds (default 2); the table
gives each run's best round, every round's figure and how many cores other processes kept busy
meanwhile: on a shared 2-core machine their work slows a run by up to an order of magnitude. Before
each run it waits (up to --settle s) for the CPUs to be free. No generation or
eval runs before training in the baseline (on CPU, bitsandbytes repacks 4-bit weights for an
inference kernel on the first no-grad forward, after which backward is wrong).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from harness import (
    ROOT,
    Child,
    Column,
    best,
    compose,
    describe_cpu,
    machine,
    pipeline_command,
    ratio,
    run_child,
    script_command,
    settle,
    table,
    versions,
    versions_line,
)

BASELINE = "trl SFTTrainer defaults"
PROJECT_VARIANTS = {
    "project (padding-free)": [],
    "project padded": ["train.sft.padding_free=false"],
    # trl's own cast kept: the adapter in bf16 (fast only where the CPU has native bf16).
    "project adapter bf16": ["train.adapter_dtype=bfloat16"],
    "project packing": ["train.sft.packing=true"],
}
EXPERIMENTS = ("tiny", "guanaco_tiny")
SHARED = Path(os.environ.get("PIPELINE_SHARED_DIR", ROOT.parent / "shared"))


def build_source(work: Path, experiment: str) -> Path:
    """Data stage via the CLI, then the tiny base via pipeline.models.tiny, into work/source."""
    from pipeline.chat.rows import read_jsonl
    from pipeline.models.tiny import build_tiny_base

    source = work / "source"
    run_child(pipeline_command("stage=data", f"experiment={experiment}", f"run_dir={source}"))
    cfg = compose(f"experiment={experiment}", f"run_dir={source}")
    rows = read_jsonl(source / "data" / "train.jsonl")
    build_tiny_base(cfg.model.tiny, cfg.model.tokenizer_path, rows, source / "base")
    return source


def fresh_run_dir(source: Path, run_dir: Path) -> Path:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    for name in ("data", "base"):
        shutil.copytree(source / name, run_dir / name)
    return run_dir


def measured(command: list[str], read: Callable[[Child], dict]) -> dict:
    """Run `command`: what `read` makes of it, with its wall time and how many cores other processes
    kept busy meanwhile (0: the machine was ours); or, where it failed, why."""
    child = run_child(command, check=False)
    extra = {"wall_s": child.seconds, "other_cores": child.other_cores}
    return {**read(child), **extra} if child.ok else {"error": child.error(), **extra}


def run_project(experiment: str, source: Path, run_dir: Path, steps: int, overrides: list[str]) -> dict:
    def read(_: Child) -> dict:
        metrics = json.loads((run_dir / "metrics" / "train.json").read_text())
        return {
            "tokens_per_s": metrics["train_tokens_per_s"],
            "tokens": metrics["train_tokens"],
            "train_s": metrics["train_seconds"],
            "steps": metrics["steps"],
        }

    fresh_run_dir(source, run_dir)
    command = pipeline_command(
        "stage=train",
        f"experiment={experiment}",
        f"run_dir={run_dir}",
        f"train.sft.max_steps={steps}",
        "train.eval_max_rows=1",
        *overrides,
    )
    return measured(command, read)


def run_baseline(
    experiment: str, source: Path, run_dir: Path, steps: int, gradient_checkpointing: bool | None
) -> dict:
    fresh_run_dir(source, run_dir)
    command = script_command(
        __file__, "--baseline", str(run_dir), "--steps", str(steps), "--experiment", experiment
    )
    if gradient_checkpointing is not None:
        command += ["--gradient-checkpointing", str(gradient_checkpointing).lower()]
    return measured(command, Child.json)


def baseline_main(experiment: str, run_dir: Path, steps: int, gradient_checkpointing: bool | None) -> None:
    """The plain trl script (runs in its own process)."""
    import datasets
    import torch
    from omegaconf import OmegaConf
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from pipeline.chat.rows import read_jsonl
    from pipeline.stages.train import ThroughputCallback

    cfg = compose(f"experiment={experiment}", f"run_dir={run_dir}")
    base = str(run_dir / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)  # carries the Llama-2 chat template
    model = AutoModelForCausalLM.from_pretrained(
        base,
        quantization_config=BitsAndBytesConfig(**OmegaConf.to_container(cfg.train.quantization)),
        dtype=getattr(torch, cfg.train.quantization.bnb_4bit_compute_dtype),
        device_map={"": "cpu"},
    )
    rows = read_jsonl(run_dir / "data" / "train.jsonl")
    dataset = datasets.Dataset.from_list([{"messages": row["messages"]} for row in rows])
    extra = {} if gradient_checkpointing is None else {"gradient_checkpointing": gradient_checkpointing}
    args = SFTConfig(
        output_dir=str(run_dir / "checkpoints"),
        max_steps=steps,
        report_to="none",
        per_device_train_batch_size=cfg.train.batch_size,
        packing=False,
        include_num_input_tokens_seen="non_padding",
        bf16=False,  # SFTConfig's default (True) raises on a machine without a GPU
        **extra,
    )
    throughput = ThroughputCallback()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(**OmegaConf.to_container(cfg.train.lora)),
        callbacks=[throughput],
    )
    trainer.train()
    print(
        json.dumps(
            {
                "tokens_per_s": throughput.figures["train_tokens_per_s"],
                "tokens": throughput.figures["train_tokens"],
                "train_s": throughput.figures["train_seconds"],
                "steps": trainer.state.global_step,
                "gradient_checkpointing": args.gradient_checkpointing,
                "optim": str(args.optim.value if hasattr(args.optim, "value") else args.optim),
            }
        )
    )


def plain_main(experiment: str, run_dir: Path, steps: int) -> None:
    """The ceiling (runs in its own process): a plain PyTorch loop, no Trainer and no trl, over the
    project's 4-bit base and LoRA config, the stage's own encoded rows in batches of the stage's size
    (padded to the longest row, loss on the answer tokens), torch's AdamW at the stage's learning rate."""
    import random

    import torch
    from omegaconf import OmegaConf
    from peft import LoraConfig, get_peft_model

    from pipeline.chat.examples import IGNORE_INDEX, encode_rows
    from pipeline.chat.rows import read_jsonl
    from pipeline.chat.tokenizer import build_tokenizer
    from pipeline.models.load import load_quantized_base

    cfg = compose(f"experiment={experiment}", f"run_dir={run_dir}")
    tokenizer = build_tokenizer(run_dir / "base" / "tokenizer.model")
    rows = read_jsonl(run_dir / "data" / "train.jsonl")
    examples, _ = encode_rows(rows, tokenizer, cfg.train.max_length)
    lora = LoraConfig(**OmegaConf.to_container(cfg.train.lora))
    model = get_peft_model(load_quantized_base(str(run_dir / "base"), cfg), lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.sft.learning_rate)
    batch, rng = cfg.train.batch_size, random.Random(0)

    def collate(picked: list[dict]) -> dict:
        width = max(len(e["input_ids"]) for e in picked)

        def pad(values, fill):
            return torch.tensor([v + [fill] * (width - len(v)) for v in values])

        return {
            "input_ids": pad([e["input_ids"] for e in picked], tokenizer.pad_token_id),
            "attention_mask": pad([[1] * len(e["input_ids"]) for e in picked], 0),
            "labels": pad([e["labels"] for e in picked], IGNORE_INDEX),
        }

    model.train()
    tokens, started = 0, time.perf_counter()
    for _ in range(steps):
        inputs = collate(rng.sample(examples, batch))
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(inputs["attention_mask"].sum())
    seconds = time.perf_counter() - started
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in trainable})
    print(
        json.dumps(
            {
                "tokens_per_s": tokens / seconds,
                "tokens": tokens,
                "train_s": seconds,
                "steps": steps,
                "dtypes": dtypes,
            }
        )
    )


def run_plain(experiment: str, source: Path, run_dir: Path, steps: int) -> dict:
    fresh_run_dir(source, run_dir)
    command = script_command(
        __file__, "--plain", str(run_dir), "--steps", str(steps), "--experiment", experiment
    )
    return measured(command, Child.json)


def cpu_description() -> dict:
    """The CPU model, its AVX-512 and bf16 flags, and what torch makes of bf16 here, measured."""
    import torch

    def mm_ms(dtype) -> float:  # a LoRA-shaped matmul of the tiny model: [832, 768] x [768, 64]
        a, b = torch.randn(832, 768, dtype=dtype), torch.randn(768, 64, dtype=dtype)
        for _ in range(5):
            a @ b
        started = time.perf_counter()
        for _ in range(50):
            a @ b
        return (time.perf_counter() - started) / 50 * 1e3

    fp32, bf16 = mm_ms(torch.float32), mm_ms(torch.bfloat16)
    return {
        **machine(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_mkldnn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "mm_fp32_ms": fp32,
        "mm_bf16_ms": bf16,
        # Any variable that caps the instruction sets oneDNN or ATen use (emulating an older CPU).
        "isa_caps": {
            k: v for k, v in os.environ.items() if k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
        },
    }


CEILING = "plain PyTorch loop"
RUNS = {
    **{name: ("project", overrides) for name, overrides in PROJECT_VARIANTS.items()},
    BASELINE: ("trl", None),
    "trl defaults, no grad ckpt": ("trl", False),
    CEILING: ("plain", None),
}
# On the real guanaco rows: padding-free and padded side by side, against both baselines.
GUANACO_RUNS = ("project (padding-free)", "project padded", BASELINE, CEILING)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="interleaved rounds over all runs; the best counts (default 2)"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=60.0,
        help="before each run, wait up to this many s for other processes to leave the CPUs (default 60)",
    )
    parser.add_argument("--work", type=Path, help="work dir (default: a temp dir, removed afterwards)")
    parser.add_argument(
        "--experiment",
        nargs="+",
        choices=EXPERIMENTS,
        help="experiments to measure (default: tiny, and guanaco_tiny where ../shared has its rows)",
    )
    parser.add_argument("--baseline", type=Path, help=argparse.SUPPRESS)  # internal: run the trl script
    parser.add_argument("--gradient-checkpointing", choices=["true", "false"], help=argparse.SUPPRESS)
    parser.add_argument("--plain", type=Path, help=argparse.SUPPRESS)  # internal: the plain loop
    parser.add_argument("--only", nargs="+", choices=list(RUNS), help="measure only these runs")
    args = parser.parse_args()
    experiment = (args.experiment or ["tiny"])[0]
    if args.baseline:
        gc = None if args.gradient_checkpointing is None else args.gradient_checkpointing == "true"
        baseline_main(experiment, args.baseline, args.steps, gc)
        return
    if args.plain:
        plain_main(experiment, args.plain, args.steps)
        return
    experiments = args.experiment or [
        e
        for e in EXPERIMENTS
        if e == "tiny" or (SHARED / "data" / "guanaco" / "oa_questions.jsonl").is_file()
    ]
    work = args.work or Path(tempfile.mkdtemp(prefix="train-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    cpu = cpu_description()
    print(json.dumps(cpu), file=sys.stderr)
    try:
        for experiment in experiments:
            runs = {
                name: run
                for name, run in RUNS.items()
                if (not args.only or name in args.only) and (experiment == "tiny" or name in GUANACO_RUNS)
            }
            results = measure(experiment, runs, work / experiment, args)
            batch = compose(f"experiment={experiment}", "run_dir=unused").train.batch_size
            print_table(experiment, results, args.steps, batch, cpu)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def measure(experiment: str, runs: dict, work: Path, args) -> dict[str, list[dict]]:
    """Every run of `runs`, in `args.repeats` interleaved rounds, on one built source."""
    results: dict[str, list[dict]] = {name: [] for name in runs}
    print(f"building the {experiment} data and base in {work} ...", file=sys.stderr)
    source = build_source(work, experiment)
    for round_ in range(args.repeats):
        for i, (name, (kind, option)) in enumerate(runs.items()):
            busy = settle(args.settle)
            progress = f"[{round_ + 1}/{args.repeats}] {experiment}: {name} ({args.steps} steps"
            print(f"{progress}, CPUs {busy:.0f}% busy) ...", file=sys.stderr)
            run_dir = work / f"run-{i}"
            if kind == "project":
                result = run_project(experiment, source, run_dir, args.steps, option)
            elif kind == "plain":
                result = run_plain(experiment, source, run_dir, args.steps)
            else:
                result = run_baseline(experiment, source, run_dir, args.steps, option)
            results[name].append(result)
            print(f"    {json.dumps(result)}", file=sys.stderr)
    print(json.dumps({experiment: results}), file=sys.stderr)
    return results


def print_table(experiment: str, results: dict[str, list[dict]], steps: int, batch: int, cpu: dict) -> None:
    def fastest(runs: list[dict]) -> dict | None:
        return best(runs, "tokens_per_s", higher=True)

    baseline, ceiling = (fastest(results.get(name, [])) or {} for name in (BASELINE, CEILING))
    rounds_run = max(len(runs) for runs in results.values())
    print(
        f"\nTrain throughput, tiny model (experiment={experiment}), {steps} steps per run, batch {batch}, "
        f"best of {rounds_run} interleaved round(s)"
        f"\nCPU: {describe_cpu(cpu, flags=True)}; "
        f"torch CPU capability {cpu['torch_cpu_capability']}, "
        f"oneDNN bf16 supported: {cpu['torch_mkldnn_bf16_supported']}; [832,768]x[768,64] mm "
        f"fp32 {cpu['mm_fp32_ms']:.2f} ms, bf16 {cpu['mm_bf16_ms']:.2f} ms"
        + (f"; ISA capped by {cpu['isa_caps']}" if cpu["isa_caps"] else "")
    )
    columns = [Column("run", 28, "<"), Column("tokens/s", 9), Column("all rounds", 19), Column("tokens", 7)]
    columns += [Column("train s", 8), Column("others", 9), Column("vs trl", 7), Column("vs loop", 8)]
    rows = []
    for name, runs in results.items():
        top = fastest(runs)
        if top is None:
            rows.append(f"{name:<28} {'failed':>9}   {runs[0]['error']}")
            continue
        speed = top["tokens_per_s"]
        rows.append(
            (
                name,
                f"{speed:.1f}",
                "/".join(f"{r['tokens_per_s']:.0f}" if "error" not in r else "x" for r in runs),
                f"{top['tokens']:d}",
                f"{top['train_s']:.1f}",
                "/".join(f"{r['other_cores']:.1f}" for r in runs),
                ratio(speed, baseline.get("tokens_per_s")),
                ratio(speed, ceiling.get("tokens_per_s")),
            )
        )
    print(table(columns, rows, rule=True))
    print(
        "\ntokens/s: non-padding input tokens / train time (best round); all rounds: each round's tokens/s;"
        "\nothers: cores kept busy by other processes during each round's run (0 = the machine was ours; a"
        "\nrun sharing the 2 cores is several times slower, so trust rounds with others near 0);"
        "\nvs trl: best tokens/s over the best of the plain trl SFTTrainer baseline (SFTConfig defaults);"
        "\nvs loop: over the best of the plain PyTorch loop (same base, rows, batch and LoRA; the ceiling)."
    )
    if baseline:
        print(
            f"trl baseline settings: gradient_checkpointing={baseline['gradient_checkpointing']}, "
            f"optim={baseline['optim']}, loss on all tokens, bf16=False (CPU)"
        )
    print(versions_line(versions(("torch", "transformers", "trl", "peft", "bitsandbytes"))))


if __name__ == "__main__":
    main()
