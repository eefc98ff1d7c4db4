"""The 7B recipe on a GPU: train, merge, convert and quantize a Llama-2-7B-shaped model, each against a
plain baseline measured in the same run.

    python bench/gpu_7b.py [--layers 32] [--steps 20] [--seq-len 512] [--work DIR] [--out FILE]
    python bench/gpu_7b.py --cpu-check              # the whole code path on a CPU, reduced shape
    python bench/gpu_7b.py --train-only --steps 10  # step 1 alone (fits one 10-minute GPU command)

No download: the base is a random-init model with Llama-2-7B's exact config (`LLAMA2_7B`; `--layers`
keeps every width and shortens the stack). It has the real 32,000-piece Llama-2 tokenizer when
`--tokenizer` (default ../shared/data/llama2-tokenizer/tokenizer.model) exists, else a small
SentencePiece trained on the rows (the vocabulary stays 32,000 wide either way). Rows are guanaco-
shaped single exchanges of about `--seq-len` tokens.

1. train: the train stage exactly as `python -m pipeline stage=train` runs it with the default recipe
   (conf/train/qlora.yaml: NF4, double quant, r=64 on all linear layers, paged AdamW 32-bit, bf16,
   gradient checkpointing), `--steps` optimizer steps; against a plain trl QLoRA script: the same
   4-bit base and LoRA, SFTConfig's defaults otherwise, trl tokenizing `messages` itself. Train
   tokens/s and peak GPU memory (torch's max allocated) for both.
2. merge on the CPU: the project's shard-by-shard merge against peft's `merge_and_unload` +
   `save_pretrained` (bench/merge_memory.py's workers): peak RSS and wall time.
3. convert and quantize to Q4_K_M: the stages' wall time (from the manifest).

`--train-only` stops after step 1 and holds out no eval rows (`data.max_eval_rows=0`), so the train
stage's after-training eval has nothing to run; merge, convert and quantize need the eval rows.
The results (JSON, `--out`) are rewritten after each part, so a later failure keeps the earlier figures,
with the package versions and, on a GPU, `nvidia-smi`'s name and memory of it.

`--cpu-check` runs every step on the CPU with one layer, 64-token rows, 2 steps and CPU-safe
settings (fp32 compute, plain AdamW: paged optimizers and bf16 training need CUDA). It proves the
code path; its figures are not a benchmark. Anchors for the real run (not ours): LLaMA-Factory's
table for LLaMA-2-7B, 4-bit, r=8, batch 4, 1,024 tokens on an A100: HF 2,415 tokens/s and 9 GB,
unsloth 3,726 tokens/s and 7 GB; the QLoRA paper: about 5 GB for Guanaco-7B.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
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
    "train.sft.gradient_accumulation_steps=1",
    "merge.dtype=float32",
]
WORDS = (
    "the a model answer question data river city light energy music history garden simple "
    "because however language people small large write read explain example result method"
).split()


def guanaco_rows(count: int, words_per_row: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    question = words_per_row // 4
    return [
        {"text": f"### Human: {text(question)} ### Assistant: {text(words_per_row - question)}"}
        for _ in range(count)
    ]


def build(work: Path, layers: int, seq_len: int, tokenizer_model: Path | None) -> dict:
    """The random 7B-shaped base (fp16 safetensors + tokenizer) and the rows file."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.chat import encode_dialog
    from pipeline.data import parse_guanaco_text
    from pipeline.io import atomic_dir
    from pipeline.tokenizer import build_tokenizer, save_tokenizer, train_sentencepiece

    started = time.perf_counter()
    rows_path, base = work / "rows.jsonl", work / "base"
    sp_dir = work / "sp"
    sp_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_model is None:  # a small SentencePiece over the words; ids stay below 32,000
        corpus = [r["text"] for r in guanaco_rows(400, 64, seed=1)]
        tokenizer_model = sp_dir / "tokenizer.model"
        train_sentencepiece(corpus, 256, tokenizer_model)
    tokenizer = build_tokenizer(tokenizer_model)
    # Rows whose one exchange is just under seq_len tokens (the train stage drops longer ones).
    words = 8
    while (
        len(encode_dialog(parse_guanaco_text(guanaco_rows(1, words * 2)[0]["text"]), tokenizer)) < seq_len - 8
    ):
        words *= 2
    while len(encode_dialog(parse_guanaco_text(guanaco_rows(1, words)[0]["text"]), tokenizer)) > seq_len - 8:
        words = int(words * 0.9)
    rows = guanaco_rows(64, words)
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
        "rows_words": words,
        "build_s": time.perf_counter() - started,
    }


def pipeline_stage(stage: str, run_dir: Path, overrides: list[str]) -> dict:
    command = [sys.executable, "-m", "pipeline", f"stage={stage}", f"run_dir={run_dir}", *overrides]
    # The stage's log goes straight to this process's stderr: a long run shows where it is.
    result = subprocess.run(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}): its log is above")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return manifest["stages"][stage]


def run_baseline(run_dir: Path, steps: int, seq_len: int, cpu: bool) -> dict:
    command = [
        sys.executable,
        __file__,
        "--baseline",
        str(run_dir),
        "--steps",
        str(steps),
        "--seq-len",
        str(seq_len),
    ]
    result = subprocess.run(
        command + (["--cpu-check"] if cpu else []), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"trl baseline failed ({result.returncode}): its log is above")
    return json.loads(result.stdout.strip().splitlines()[-1])


def baseline_main(run_dir: Path, steps: int, seq_len: int, cpu: bool) -> None:
    """A plain trl QLoRA script (its own process): the recipe's 4-bit base and LoRA, SFTConfig defaults."""
    import datasets
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from pipeline.config import register
    from pipeline.rows import read_jsonl
    from pipeline.train import ThroughputCallback

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=CPU_OVERRIDES if cpu else [])
    base = str(run_dir.parent / "base")
    quantization = OmegaConf.to_container(cfg.train.quantization)
    model = AutoModelForCausalLM.from_pretrained(
        base,
        quantization_config=BitsAndBytesConfig(**quantization),
        dtype=getattr(torch, quantization["bnb_4bit_compute_dtype"]),
        device_map={"": 0 if torch.cuda.is_available() else "cpu"},
    )
    rows = read_jsonl(run_dir / "data" / "train.jsonl")
    dataset = datasets.Dataset.from_list([{"messages": row["messages"]} for row in rows])
    extra = {"bf16": False} if cpu else {}  # SFTConfig's bf16 default raises without a GPU
    args = SFTConfig(
        output_dir=str(run_dir / "trl-checkpoints"),
        max_steps=steps,
        max_length=seq_len,
        report_to="none",
        save_strategy="no",
        include_num_input_tokens_seen="non_padding",
        **extra,
    )
    throughput = ThroughputCallback()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(base),
        peft_config=LoraConfig(**OmegaConf.to_container(cfg.train.lora)),
        callbacks=[throughput],
    )
    trainer.train()
    figures = throughput.figures
    summary = {
        k: figures[k] for k in ("train_tokens_per_s", "train_tokens", "train_seconds", "peak_gpu_memory_gb")
    }
    summary.update(
        steps=trainer.state.global_step,
        optim=str(args.optim),
        gradient_checkpointing=args.gradient_checkpointing,
        batch=args.per_device_train_batch_size * args.gradient_accumulation_steps,
    )
    print(json.dumps(summary))


def merge_workers(work: Path, run_dir: Path) -> dict:
    """bench/merge_memory.py's project and peft workers on this base and the trained adapter."""
    sys.path.insert(0, str(ROOT / "bench"))
    import merge_memory

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


def environment() -> dict:
    """The versions this run used (the first of each on sys.path) and, where there is one, the GPU."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    env = {"python": sys.version.split()[0], "versions": versions}
    try:
        env["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["nvidia_smi"] = None
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
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
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.cpu_check:
        args.layers, args.seq_len, args.steps = min(args.layers, 1), min(args.seq_len, 64), min(args.steps, 2)
    if args.baseline:
        baseline_main(args.baseline, args.steps, args.seq_len, args.cpu_check)
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
        **environment(),
    }

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(results, indent=2) + "\n")

    save()
    print(f"building the {args.layers}-layer Llama-2-7B-shaped base in {work} ...", file=sys.stderr)
    results["base"] = build(work, args.layers, args.seq_len, tokenizer)
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
    print("train: the project's stage ...", file=sys.stderr)
    train = pipeline_stage("train", run_dir, overrides)
    figures = train["metrics"]
    sft = json.loads((run_dir / "manifest.json").read_text())["config"]["train"]["sft"]
    results["train"] = {
        "project": {
            **{
                k: figures[k]
                for k in ("train_tokens_per_s", "train_tokens", "train_seconds", "peak_gpu_memory_gb")
            },
            "optim": sft["optim"],
            "gradient_checkpointing": sft["gradient_checkpointing"],
            "batch": sft["per_device_train_batch_size"] * sft["gradient_accumulation_steps"],
        },
        "stage_seconds": train["seconds"],
    }
    save()
    print("train: the plain trl script ...", file=sys.stderr)
    results["train"]["trl"] = run_baseline(run_dir, args.steps, args.seq_len, args.cpu_check)
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
    project, trl = r["train"]["project"], r["train"]["trl"]

    def gb(x):
        return "-" if x is None else f"{x:.1f} GB"

    lines = [
        f"\n{r['mode']} on {r['device']}: {r['base']['layers']}-layer Llama-2-7B shape, "
        f"{r['base']['fp16_bytes'] / 1e9:.1f} GB fp16",
        f"{'train':<30} {'tokens/s':>10} {'peak GPU':>10} {'batch':>6}  optimizer",
        *(
            f"{name:<30} {t['train_tokens_per_s']:>10.1f} {gb(t['peak_gpu_memory_gb']):>10} "
            f"{t['batch']:>6}  {t['optim']}"
            for name, t in (("project (qlora.yaml)", project), ("plain trl (SFTConfig defaults)", trl))
        ),
        f"ratio (project / trl): {project['train_tokens_per_s'] / trl['train_tokens_per_s']:.2f}x tokens/s",
    ]
    if "merge" in r:
        ours, peft = r["merge"]["project"], r["merge"]["peft"]
        lines.append(
            f"merge (CPU): project {ours['seconds']:.1f} s, peak RSS {ours['peak_rss_mb']:.0f} MB; "
            f"peft {peft['seconds']:.1f} s, {peft['peak_rss_mb']:.0f} MB "
            f"({ours['peak_rss_mb'] / peft['peak_rss_mb']:.2f}x RSS, "
            f"{ours['seconds'] / peft['seconds']:.2f}x time)"
        )
    if "stages" in r:
        stages = r["stages"]
        lines.append(
            f"stages: merge {stages['merge']:.1f} s, convert {stages['convert']:.1f} s, "
            f"quantize Q4_K_M {stages['quantize']:.1f} s"
        )
    if "merge" not in r and "stages" not in r:
        lines.append("merge, convert, quantize: not run (--train-only)")
    versions = r.get("versions") or {}
    if versions:
        lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if r.get("nvidia_smi"):
        lines.append("nvidia-smi: " + r["nvidia_smi"].replace("\n", "; "))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
