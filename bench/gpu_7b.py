"""The 7B recipe on a GPU: the train stage against its peers in one run, then merge, convert and
quantize, each against a plain baseline measured in the same run.

    python bench/gpu_7b.py [--layers 32] [--steps 6] [--seq-len 512] [--work DIR] [--out FILE]
    python bench/gpu_7b.py --cpu-check              # the whole code path on a CPU, reduced shape
    python bench/gpu_7b.py --train-only --steps 6   # the train comparison alone (one 10-minute command)

No download: the base is a random-init model with Llama-2-7B's exact config (`LLAMA2_7B`; `--layers`
keeps every width and shortens the stack). It has the real 32,000-piece Llama-2 tokenizer when
`--tokenizer` (default ../shared/data/llama2-tokenizer/tokenizer.model) exists, else a small
SentencePiece trained on the rows (the vocabulary stays 32,000 wide either way). Rows are guanaco-
shaped single exchanges of varied length, from a tenth of `--seq-len` tokens to all of it (where
padding costs most, as in guanaco), the same rows and seed for every run.

1. train, each in its own process on the same base, rows and seed, `--steps` optimizer steps:
   (a) the stage at its defaults (conf/train/qlora.yaml: 16 sequences per step split as the memory
       estimate allows, padding-free, checkpointing only if needed, flash-attn if installed else SDPA);
   (b) the stage executing the paper literally (train=qlora_lean: 1 x 16, checkpointing, paged AdamW);
   (c) plain trl: SFTTrainer with SFTConfig's defaults, the same 4-bit base and LoRA, trl tokenizing
       `messages` itself;
   (d) unsloth, where it is installed in this Python (FastLanguageModel, the same LoRA, rows and step
       split as (a)); otherwise reported as not run, with the reason.
   For each: non-padding tokens/s over train time and peak GPU memory (torch's max allocated); and the
   per-step loss of (a) against (b). Targets: (a) >= 1.5x (c); (b) <= 0.8x (c)'s memory; (a) >= (d).
2. merge on the CPU: the project's shard-by-shard merge against peft's `merge_and_unload` +
   `save_pretrained` (bench/merge_memory.py's workers): peak RSS and wall time.
3. convert and quantize to Q4_K_M: the stages' wall time (from the manifest).

`--train-only` stops after step 1 and holds out no eval rows (`data.max_eval_rows=0`), so the train
stage's after-training eval has nothing to run; merge, convert and quantize need the eval rows.
The results (JSON, `--out`) are rewritten after each part, so a later failure keeps the earlier figures,
with the package versions and, on a GPU, `nvidia-smi`'s name and memory of it.

`--cpu-check` runs every step on the CPU with one layer, 64-token rows, 2 steps of 4 sequences and
CPU-safe settings (fp32 compute, plain AdamW: paged optimizers and bf16 training need CUDA). It proves
the code path; its figures are not a benchmark. Anchors for the real run (not ours): LLaMA-Factory's
table for LLaMA-2-7B, 4-bit, r=8, batch 4, 1,024 tokens on an A100: HF 2,415 tokens/s and 9 GB,
unsloth 3,726 tokens/s and 7 GB; the QLoRA paper: about 5 GB for Guanaco-7B.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from harness import (
    ROOT,
    Column,
    compose,
    machine,
    nvidia_smi,
    pipeline_command,
    ratio,
    run_child,
    save_results,
    script_command,
    table,
    versions,
    versions_line,
)

SHARED_TOKENIZER = ROOT.parent / "shared" / "data" / "llama2-tokenizer" / "tokenizer.model"

# meta-llama/Llama-2-7b-hf's config.json.
LLAMA2_7B = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# On a CPU: what the GPU recipe needs CUDA for, replaced; everything else as the recipe has it.
CPU_OVERRIDES = [
    "train.sft.bf16=false",
    "train.quantization.bnb_4bit_compute_dtype=float32",
    "train.sft.optim=adamw_torch",
    "train.batch_size=4",
    "merge.dtype=float32",
]
# (b): the recipe as the paper's script executes it (conf/train/qlora_lean.yaml).
LEAN = ["train=qlora_lean"]
WORDS = (
    "the a model answer question data river city light energy music history garden simple "
    "because however language people small large write read explain example result method"
).split()


def guanaco_rows(count: int, words_per_row: int, seed: int = 0) -> list[dict]:
    """Single exchanges of varied length: from a tenth of `words_per_row` words to all of them."""
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max(n, 1))).capitalize() + "."

    rows = []
    for _ in range(count):
        words = int(words_per_row * rng.uniform(0.1, 1.0))
        question = max(words // 4, 2)
        rows.append({"text": f"### Human: {text(question)} ### Assistant: {text(words - question)}"})
    return rows


def full_length_row(words: int) -> dict:
    """One exchange of exactly `words` words (the longest a row gets)."""
    rng = random.Random(1)
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return {"text": f"### Human: {text[: len(text) // 4]} ### Assistant: {text[len(text) // 4 :]}"}


def build(work: Path, layers: int, seq_len: int, tokenizer_model: Path | None, rows_count: int) -> dict:
    """The random 7B-shaped base (fp16 safetensors + tokenizer) and the rows file."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.chat.format import encode_dialog
    from pipeline.chat.tokenizer import build_tokenizer, save_tokenizer, train_sentencepiece
    from pipeline.run.io import atomic_dir
    from pipeline.stages.data import parse_guanaco_text

    started = time.perf_counter()
    rows_path, base = work / "rows.jsonl", work / "base"
    sp_dir = work / "sp"
    sp_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_model is None:  # a small SentencePiece over the words; ids stay below 32,000
        corpus = [r["text"] for r in guanaco_rows(400, 64, seed=1)]
        tokenizer_model = sp_dir / "tokenizer.model"
        train_sentencepiece(corpus, 256, tokenizer_model)
    tokenizer = build_tokenizer(tokenizer_model)

    # The longest row just under seq_len tokens (the train stage drops longer ones).
    def tokens(words: int) -> int:
        return len(encode_dialog(parse_guanaco_text(full_length_row(words)["text"]), tokenizer))

    words = 8
    while tokens(words * 2) < seq_len - 8:
        words *= 2
    while tokens(words) > seq_len - 8:
        words = int(words * 0.9)
    rows = guanaco_rows(rows_count, words)
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if not (base / "config.json").is_file():
        config = LlamaConfig(**{**LLAMA2_7B, "num_hidden_layers": layers})
        torch.manual_seed(0)
        torch.set_default_dtype(torch.float16)  # initialise in fp16: a 7B in fp32 would need 28 GB
        # On a GPU the random init takes seconds, not the minutes 6.7B normal_ draws take on a CPU.
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            with device:
                model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(torch.float32)
        with atomic_dir(base) as tmp:  # fp16 safetensors: the train stage loads the base from a path
            model.save_pretrained(tmp, max_shard_size="2GB")
            save_tokenizer(tokenizer, tokenizer_model, tmp)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the stages run in their own processes
    params = sum(
        f.stat().st_size for f in base.glob("*.safetensors")
    )  # bytes of fp16 weights (plus small headers)
    return {
        "layers": layers,
        "fp16_bytes": params,
        "rows_words_max": words,
        "rows": rows_count,
        "build_s": time.perf_counter() - started,
    }


def pipeline_stage(stage: str, run_dir: Path, overrides: list[str]) -> dict:
    """The stage in its own process, its log straight on this process's stderr (a long run shows
    where it is); its record in the manifest."""
    run_child(pipeline_command(f"stage={stage}", f"run_dir={run_dir}", *overrides), capture_stderr=False)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return manifest["stages"][stage]


def project_train(run_dir: Path, overrides: list[str]) -> dict:
    """The train stage in its own process: its figures, how it executed a step, its per-step loss."""
    record = pipeline_stage("train", run_dir, overrides)
    metrics = json.loads((run_dir / "metrics" / "train.json").read_text())
    step = metrics["step"]
    return {
        **{
            k: metrics[k]
            for k in ("train_tokens_per_s", "train_tokens", "train_seconds", "peak_gpu_memory_gb")
        },
        "optim": step["optim"],
        "gradient_checkpointing": step["gradient_checkpointing"],
        "batch": step["batch_size"],
        "split": f"{step['micro_batch_size']} x {step['gradient_accumulation_steps']}",
        "padding_free": step["padding_free"],
        "attention": step["attn_implementation"],
        "loss": step["loss_why"],
        "why": step["why"],
        "loss_curve": metrics["loss_curve"],
        "stage_seconds": record["seconds"],
    }


def run_worker(flag: str, run_dir: Path, args) -> dict:
    """This script's `flag` worker (the trl baseline, unsloth) in its own process; its last line."""
    command = script_command(
        __file__, flag, str(run_dir), "--steps", str(args.steps), "--seq-len", str(args.seq_len)
    )
    command += ["--cpu-check"] if args.cpu_check else []
    return run_child(command, what=f"{flag} worker", capture_stderr=False).json()


def unsloth_or_reason(run_dir: Path, args) -> dict:
    """(d): unsloth where this Python has it and a GPU runs it; otherwise why not."""
    import importlib.util

    import torch

    if importlib.util.find_spec("unsloth") is None:
        return {
            "not_run": "unsloth is not installed in this Python (it pins transformers<=5.17, trl<=1.15 and "
            "datasets<5; its wheel, 28.6 MB, and bitsandbytes', 43 MB, alone exceed the 64 MiB one "
            "device call carries)"
        }
    if not torch.cuda.is_available():
        return {"not_run": "unsloth needs a CUDA GPU"}
    return run_worker("--unsloth", run_dir, args)


def train_with_trl(
    run_dir: Path, name: str, model, tokenizer, steps: int, seq_len: int, peft_config=None, **sft
):
    """trl's SFTTrainer on the run's rows (as `messages`: trl tokenizes them itself) for `steps` steps;
    the figures as project_train reports the stage's. `sft`: SFTConfig fields beyond the common ones."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    from pipeline.chat.rows import read_jsonl
    from pipeline.stages.train import ThroughputCallback

    rows = read_jsonl(run_dir / "data" / "train.jsonl")
    args = SFTConfig(
        output_dir=str(run_dir / f"{name}-checkpoints"),
        max_steps=steps,
        max_length=seq_len,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        include_num_input_tokens_seen="non_padding",
        **sft,
    )
    throughput = ThroughputCallback()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list([{"messages": row["messages"]} for row in rows]),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[throughput],
    )
    trainer.train()
    figures = throughput.figures
    summary = {
        k: figures[k] for k in ("train_tokens_per_s", "train_tokens", "train_seconds", "peak_gpu_memory_gb")
    }
    summary.update(
        steps=trainer.state.global_step,
        optim=str(getattr(args.optim, "value", args.optim)),
        gradient_checkpointing=bool(args.gradient_checkpointing),
        batch=args.per_device_train_batch_size * args.gradient_accumulation_steps,
        split=f"{args.per_device_train_batch_size} x {args.gradient_accumulation_steps}",
        padding_free=bool(args.padding_free),
        loss_curve=[{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e],
    )
    return summary


def baseline_main(run_dir: Path, steps: int, seq_len: int, cpu: bool) -> None:
    """A plain trl QLoRA script (its own process): the recipe's 4-bit base and LoRA, SFTConfig defaults."""
    import torch
    from omegaconf import OmegaConf
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    cfg = compose(*(CPU_OVERRIDES if cpu else []))
    base = str(run_dir.parent / "base")
    quantization = OmegaConf.to_container(cfg.train.quantization)
    model = AutoModelForCausalLM.from_pretrained(
        base,
        quantization_config=BitsAndBytesConfig(**quantization),
        dtype=getattr(torch, quantization["bnb_4bit_compute_dtype"]),
        device_map={"": 0 if torch.cuda.is_available() else "cpu"},
    )
    extra = {"bf16": False} if cpu else {}  # SFTConfig's bf16 default raises without a GPU
    lora = LoraConfig(**OmegaConf.to_container(cfg.train.lora))
    tokenizer = AutoTokenizer.from_pretrained(base)
    print(
        json.dumps(
            train_with_trl(run_dir, "trl", model, tokenizer, steps, seq_len, peft_config=lora, **extra)
        )
    )


def unsloth_main(run_dir: Path, steps: int, seq_len: int) -> None:
    """(d) unsloth (its own process, GPU only): its 4-bit load and LoRA with the recipe's LoRA config,
    the step split, optimizer and learning rate stage (a) chose, on the same rows, through trl."""
    # unsloth first: it patches transformers and trl as it is imported.
    import unsloth  # noqa: I001
    from unsloth import FastLanguageModel

    import torch

    cfg = compose()
    step = json.loads((run_dir / "metrics" / "train.json").read_text())["step"]
    lora = cfg.train.lora
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(run_dir.parent / "base"),
        max_seq_length=seq_len,
        load_in_4bit=True,
        dtype=torch.bfloat16,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        bias="none",
        use_gradient_checkpointing="unsloth" if step["gradient_checkpointing"] else False,
        random_state=0,
    )
    summary = train_with_trl(
        run_dir,
        "unsloth",
        model,
        tokenizer,
        steps,
        seq_len,
        per_device_train_batch_size=step["micro_batch_size"],
        gradient_accumulation_steps=step["gradient_accumulation_steps"],
        learning_rate=cfg.train.sft.learning_rate,
        optim=cfg.train.sft.optim,
        padding_free=step["padding_free"],
        bf16=True,
    )
    print(json.dumps({**summary, "unsloth": unsloth.__version__}))


def merge_workers(work: Path, run_dir: Path) -> dict:
    """bench/merge_memory.py's project and peft workers on this base and the trained adapter."""
    import merge_memory  # beside this script

    merge_work = work / "merge"
    merge_work.mkdir(exist_ok=True)
    for name, target in (("base", work / "base"), ("adapter", run_dir / "adapter")):
        link = merge_work / name
        if not link.exists():
            link.symlink_to(target.resolve())
    size_gb = sum(f.stat().st_size for f in (work / "base").glob("*.safetensors")) / 1e9
    return {
        method: merge_memory.run_worker(method, merge_work, "2GB", size_gb) for method in ("project", "peft")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--tokenizer", type=Path, default=SHARED_TOKENIZER)
    parser.add_argument("--work", type=Path, help="work dir (default: a new temp dir, kept)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--cpu-check", action="store_true", help="the code path on a CPU, reduced shape")
    parser.add_argument(
        "--train-only", action="store_true", help="only the train stage and the trl baseline (step 1)"
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="pipeline overrides for the project's stages, replacing the bench's own for the same key",
    )
    parser.add_argument("--baseline", type=Path, help=argparse.SUPPRESS)  # internal: the trl script
    parser.add_argument("--unsloth", type=Path, help=argparse.SUPPRESS)  # internal: the unsloth script
    args = parser.parse_args()
    if args.cpu_check:
        args.layers, args.seq_len, args.steps = min(args.layers, 1), min(args.seq_len, 64), min(args.steps, 2)
    if args.baseline:
        baseline_main(args.baseline, args.steps, args.seq_len, args.cpu_check)
        return
    if args.unsloth:
        unsloth_main(args.unsloth, args.steps, args.seq_len)
        return

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no CUDA)"
    if not torch.cuda.is_available() and not args.cpu_check:
        raise SystemExit("no CUDA device: run on a GPU, or --cpu-check for the code path at a reduced shape")
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-7b-"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = args.tokenizer if args.tokenizer and args.tokenizer.is_file() else None
    results = {
        "device": device,
        "mode": "cpu-check (not a benchmark)" if args.cpu_check else "benchmark",
        "train_only": args.train_only,
        "steps": args.steps,
        "seq_len": args.seq_len,
        "machine": machine(),
        "versions": versions(),
        "nvidia_smi": nvidia_smi(),
    }

    def save() -> None:  # after each part: a later failure keeps the earlier figures
        save_results(args.out, results)

    save()
    print(f"building the {args.layers}-layer Llama-2-7B-shaped base in {work} ...", file=sys.stderr)
    # Enough rows for every step's 16 sequences to be new ones.
    results["base"] = build(work, args.layers, args.seq_len, tokenizer, rows_count=16 * (args.steps + 2))
    results["base"]["tokenizer"] = (
        str(tokenizer) if tokenizer else "small SentencePiece (no Llama-2 tokenizer.model)"
    )

    run_dir = work / "run"
    overrides = [
        f"model.name_or_path={work / 'base'}",
        "model.name=llama2_7b_shape",
        f"data.path={work / 'rows.jsonl'}",
        "data.eval_fraction=0.05",
        f"data.max_eval_rows={0 if args.train_only else 2}",
        "train.eval_max_rows=2",
        "train.eval_max_new_tokens=8",
        f"train.max_length={args.seq_len}",
        f"train.sft.max_steps={args.steps}",
        "train.sft.save_steps=100000",
        "train.sft.logging_steps=1",
        "merge.check_rows=2",
        "export.ladder_rows=2",
        "export.quants=[Q4_K_M]",
        *(CPU_OVERRIDES if args.cpu_check else []),
    ]
    replaced = {item.split("=", 1)[0] for item in args.set}
    overrides = [o for o in overrides if o.split("=", 1)[0] not in replaced] + args.set
    results["overrides"] = args.set
    pipeline_stage("data", run_dir, overrides)
    lean_dir = work / "run-lean"
    pipeline_stage("data", lean_dir, overrides)
    results["train"] = {}
    for name, directory, extra in (("project", run_dir, []), ("project_lean", lean_dir, LEAN)):
        print(f"train: {name} ...", file=sys.stderr)
        results["train"][name] = project_train(directory, overrides + extra)
        save()
    print("train: the plain trl script ...", file=sys.stderr)
    results["train"]["trl"] = run_worker("--baseline", run_dir, args)
    save()
    print("train: unsloth ...", file=sys.stderr)
    results["train"]["unsloth"] = unsloth_or_reason(run_dir, args)
    save()
    if args.train_only:
        print(json.dumps(results))
        print(report(results))
        return
    print("merge: project vs peft (CPU) ...", file=sys.stderr)
    results["merge"] = merge_workers(work, run_dir)
    print("merge, convert, quantize: the stages ...", file=sys.stderr)
    for stage in ("merge", "convert", "quantize"):
        results.setdefault("stages", {})[stage] = pipeline_stage(stage, run_dir, overrides)["seconds"]
    results["gguf_bytes"] = {p.name: p.stat().st_size for p in sorted((run_dir / "gguf").glob("*.gguf"))}
    save()
    print(json.dumps(results))
    print(report(results))


def report(r: dict) -> str:
    train = r["train"]
    project, lean, trl, unsloth = (train[k] for k in ("project", "project_lean", "trl", "unsloth"))

    def gb(x):
        return "-" if x is None else f"{x:.1f} GB"

    names = {
        "project": "(a) stage, defaults",
        "project_lean": "(b) stage, paper literal (lean)",
        "trl": "(c) plain trl, SFTConfig defaults",
        "unsloth": "(d) unsloth",
    }
    columns = [Column("train", 36, "<"), Column("tokens/s", 9), Column("vs (c)", 7), Column("peak GPU", 9)]
    columns += [Column("vs (c)", 7), Column("split", 7), Column("pad-free", 8), Column("ckpt", 5)]
    columns += [Column("optimizer", 0, "<", gap=2)]
    rows = []
    for key, name in names.items():
        t = train[key]
        if "not_run" in t:
            rows.append(f"{name:<36} not run: {t['not_run']}")
            continue
        speed, memory = t["train_tokens_per_s"], t["peak_gpu_memory_gb"]
        rows.append(
            (
                name,
                f"{speed:.1f}",
                ratio(speed, trl["train_tokens_per_s"]),
                gb(memory),
                ratio(memory, trl["peak_gpu_memory_gb"]),
                t["split"],
                "yes" if t["padding_free"] else "no",
                "on" if t["gradient_checkpointing"] else "off",
                t["optim"],
            )
        )
    lines = [
        f"\n{r['mode']} on {r['device']}: {r['base']['layers']}-layer Llama-2-7B shape, "
        f"{r['base']['fp16_bytes'] / 1e9:.1f} GB fp16, {r['steps']} steps, "
        f"rows of up to {r['seq_len']} tokens",
        table(columns, rows),
    ]
    lines.append(f"(a) chose: {project['why']}; {project['attention']} attention; {project['loss']}")
    a_loss = {e["step"]: e["loss"] for e in project["loss_curve"]}
    b_loss = {e["step"]: e["loss"] for e in lean["loss_curve"]}
    shared = sorted(set(a_loss) & set(b_loss))
    if shared:
        diffs = [abs(a_loss[s] - b_loss[s]) for s in shared]
        lines.append(
            f"per-step loss, (a) vs (b) over steps {shared[0]}-{shared[-1]}: max |diff| {max(diffs):.4f}, "
            f"mean |diff| {sum(diffs) / len(diffs):.4f}; (a) "
            + " ".join(f"{a_loss[s]:.4f}" for s in shared)
            + "; (b) "
            + " ".join(f"{b_loss[s]:.4f}" for s in shared)
        )

    def target(label: str, value: float, baseline: float, limit: float, higher: bool) -> str:
        met = value / baseline >= limit if higher else value / baseline <= limit
        bound = f"{'>=' if higher else '<='} {limit}"
        return f"{label} {ratio(value, baseline)} (target {bound}: {'met' if met else 'NOT met'})"

    speed = "train_tokens_per_s"
    targets = [target("(a)/(c) tokens/s", project[speed], trl[speed], 1.5, higher=True)]
    if lean.get("peak_gpu_memory_gb") and trl.get("peak_gpu_memory_gb"):
        memory = lean["peak_gpu_memory_gb"], trl["peak_gpu_memory_gb"]
        targets.append(target("(b)/(c) memory", *memory, 0.8, higher=False))
    if "not_run" not in unsloth:
        targets.append(target("(a)/(d) tokens/s", project[speed], unsloth[speed], 1.0, higher=True))
    lines.append("targets: " + "; ".join(targets))
    if "merge" in r:
        ours, peft = r["merge"]["project"], r["merge"]["peft"]
        lines.append(
            f"merge (CPU): project {ours['seconds']:.1f} s, peak RSS {ours['peak_rss_mb']:.0f} MB; "
            f"peft {peft['seconds']:.1f} s, {peft['peak_rss_mb']:.0f} MB "
            f"({ratio(ours['peak_rss_mb'], peft['peak_rss_mb'])} RSS, "
            f"{ratio(ours['seconds'], peft['seconds'])} time)"
        )
    if "stages" in r:
        stages = r["stages"]
        lines.append(
            f"stages: merge {stages['merge']:.1f} s, convert {stages['convert']:.1f} s, "
            f"quantize Q4_K_M {stages['quantize']:.1f} s"
        )
    if "merge" not in r and "stages" not in r:
        lines.append("merge, convert, quantize: not run (--train-only)")
    if r.get("versions"):
        lines.append(versions_line(r["versions"]))
    if r.get("nvidia_smi"):
        lines.append("nvidia-smi: " + r["nvidia_smi"].replace("\n", "; "))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
