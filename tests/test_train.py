"""The train stage: `encode_rows` (loss masking and the truncation policy) on the real Llama-2
tokenizer, the tiny base (deterministic, an ordinary HF directory), the artifacts of a full tiny
run (adapter, metrics, manifest), resuming after a SIGKILL, and the packing / padding-free options."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import string
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
from conftest import ROOT, run_pipeline
from omegaconf import OmegaConf

from pipeline.chat.examples import IGNORE_INDEX, encode_rows
from pipeline.chat.format import LLAMA2_CHAT_TEMPLATE, encode_dialog

TINY_MODEL_CONF = ROOT / "conf" / "model" / "tiny.yaml"
SYNTHETIC_DATA_CONF = ROOT / "conf" / "data" / "synthetic.yaml"
HF_TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tokenizer(llama2_tokenizer_model):
    from pipeline.chat.tokenizer import build_tokenizer

    return build_tokenizer(llama2_tokenizer_model)


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def exchanges(n: int, answer_words: int = 3) -> list[dict]:
    """A dialog of n user/assistant exchanges; answers are `answer_words` words long."""
    out = []
    for i in range(n):
        answer = " ".join(f"word{i}x{j}" for j in range(answer_words))
        out += [msg("user", f"Question number {i}?"), msg("assistant", answer)]
    return out


def spans(labels: list[int]) -> list[tuple[bool, int, int]]:
    """Maximal runs of (masked?, start, end) over the labels."""
    out, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or (labels[i] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            out.append((labels[start] == IGNORE_INDEX, start, i))
            start = i
    return out


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train(run_dir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_pipeline("stage=train", "experiment=tiny", f"run_dir={run_dir}", *overrides, check=check)


def pipeline_log(run_dir: Path, result: subprocess.CompletedProcess | None = None) -> str:
    log = run_dir / "__main__.log"
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    return text + (result.stdout + result.stderr if result is not None else "")


def complete_checkpoints(run_dir: Path) -> dict[int, Path]:
    """step -> checkpoint dir, for checkpoints whose trainer_state.json is written (and parses)."""
    out = {}
    for path in (run_dir / "checkpoints").glob("checkpoint-*"):
        try:
            read_json(path / "trainer_state.json")
        except (OSError, ValueError):
            continue
        out[int(path.name.split("-")[1])] = path
    return out


def tokens_seen(checkpoint: Path) -> int:
    return read_json(checkpoint / "trainer_state.json")["num_input_tokens_seen"]


# ---------------------------------------------------------------- encode_rows


def test_pad_is_not_eos(tokenizer):
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.eos_token_id == 2 and tokenizer.bos_token_id == 1


@pytest.mark.parametrize(
    "messages",
    [
        [msg("user", "What is the capital of France?"), msg("assistant", "Paris is the capital of France.")],
        [
            msg("system", "Be brief."),
            msg("user", "Hi there"),
            msg("assistant", "Hello! How can I help?"),
            msg("user", "2+2?"),
            msg("assistant", "4."),
        ],
        exchanges(3),
    ],
    ids=["one-exchange", "system-two-exchanges", "three-exchanges"],
)
def test_labels_mask_prompts_and_train_answers_with_eos(messages, tokenizer):
    examples, stats = encode_rows([{"messages": messages}], tokenizer, max_length=512)
    assert stats == {"rows": 1, "rows_truncated": 0, "rows_dropped": 0, "max_length": 512}
    [example] = examples
    ids, labels = example["input_ids"], example["labels"]
    assert ids == encode_dialog(messages, tokenizer)  # Meta's token ids, whole dialog
    assert len(labels) == len(ids)

    runs = spans(labels)
    n_exchanges = sum(m["role"] == "assistant" for m in messages)
    assert [masked for masked, _, _ in runs] == [True, False] * n_exchanges
    users = [m["content"] for m in messages if m["role"] == "user"]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    for k in range(n_exchanges):
        _, p0, p1 = runs[2 * k]
        _, a0, a1 = runs[2 * k + 1]
        # Prompt: BOS + [INST] ... [/INST], no loss on any of it.
        assert ids[p0] == tokenizer.bos_token_id
        assert tokenizer.bos_token_id not in ids[p0 + 1 : p1] and tokenizer.eos_token_id not in ids[p0:p1]
        prompt = tokenizer.decode(ids[p0:p1], skip_special_tokens=True).strip()
        assert prompt.startswith("[INST]") and prompt.endswith("[/INST]")
        assert users[k] in prompt
        if system and k == 0:
            assert f"<<SYS>>\n{system}\n<</SYS>>" in prompt
        # Answer: labels are the input ids, ending on the EOS that closes the turn.
        assert labels[a0:a1] == ids[a0:a1]
        assert ids[a1 - 1] == tokenizer.eos_token_id and labels[a1 - 1] == tokenizer.eos_token_id
        assert tokenizer.eos_token_id not in ids[a0 : a1 - 1]
        assert tokenizer.decode(ids[a0:a1], skip_special_tokens=True).strip() == answers[k]
    assert labels[-1] == tokenizer.eos_token_id


def test_truncation_keeps_whole_leading_exchanges(tokenizer):
    messages = exchanges(3)
    two = len(encode_dialog(messages[:4], tokenizer))
    full = len(encode_dialog(messages, tokenizer))
    assert two < full
    for max_length, kept in [(two, 4), (two + 1, 4), (full - 1, 4), (full, 6)]:
        examples, stats = encode_rows([{"messages": messages}], tokenizer, max_length=max_length)
        [example] = examples
        assert example["input_ids"] == encode_dialog(messages[:kept], tokenizer), max_length
        assert len(example["input_ids"]) <= max_length
        assert example["labels"][-1] == tokenizer.eos_token_id  # the last kept answer is whole
        assert stats["rows_truncated"] == (kept < len(messages)) and stats["rows_dropped"] == 0


def test_truncation_stops_at_the_first_exchange_that_does_not_fit(tokenizer):
    """Whole exchanges from the start: a short third exchange is not kept after a long second one."""
    messages = exchanges(1) + exchanges(1, answer_words=60)[:2] + exchanges(1)
    one = len(encode_dialog(messages[:2], tokenizer))
    skipping_the_long_one = len(encode_dialog(messages[:2] + messages[4:], tokenizer))
    assert skipping_the_long_one <= one + 40 < len(encode_dialog(messages[:4], tokenizer))
    examples, stats = encode_rows([{"messages": messages}], tokenizer, max_length=one + 40)
    assert examples[0]["input_ids"] == encode_dialog(messages[:2], tokenizer)
    assert stats["rows_truncated"] == 1


def test_row_whose_first_exchange_does_not_fit_is_dropped(tokenizer):
    long_first = exchanges(1, answer_words=80) + exchanges(1)
    short = exchanges(1)
    max_length = len(encode_dialog(short, tokenizer)) + 5
    assert len(encode_dialog(long_first[:2], tokenizer)) > max_length
    examples, stats = encode_rows(
        [{"messages": short}, {"messages": long_first}, {"messages": exchanges(2)}], tokenizer, max_length
    )
    assert stats == {"rows": 3, "rows_truncated": 1, "rows_dropped": 1, "max_length": max_length}
    assert [e["input_ids"] for e in examples] == [encode_dialog(short, tokenizer)] * 2
    assert all(len(e["input_ids"]) <= max_length for e in examples)


# ---------------------------------------------------------------- the tiny base


def synthetic_train_rows() -> list[dict]:
    from pipeline.chat.synthetic import make_rows

    data = OmegaConf.load(SYNTHETIC_DATA_CONF)
    return make_rows(data.synthetic, None, data.seed)[0]


def build_tiny(out: Path, tokenizer_path: str | None = None) -> Path:
    from pipeline.models.tiny import build_tiny_base

    build_tiny_base(OmegaConf.load(TINY_MODEL_CONF).tiny, tokenizer_path, synthetic_train_rows(), out)
    return out


def test_tiny_base_is_deterministic_and_an_ordinary_hf_dir(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from pipeline.chat.tokenizer import build_tokenizer

    a, b = build_tiny(tmp_path / "a"), build_tiny(tmp_path / "b")
    files = sorted(p.name for p in a.iterdir())
    expected = {
        "model.safetensors",
        "config.json",
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert expected <= set(files)
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs between two builds"

    model = AutoModelForCausalLM.from_pretrained(a)
    assert isinstance(model, LlamaForCausalLM)
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (2, 256)
    tok = AutoTokenizer.from_pretrained(a)
    assert len(tok) == model.config.vocab_size == model.get_input_embeddings().weight.shape[0]
    assert tok.chat_template == LLAMA2_CHAT_TEMPLATE
    text = "What is the capital of Tendorten? The capital of Tendorten is Ruzel."
    assert tok(text)["input_ids"] == build_tokenizer(a / "tokenizer.model")(text)["input_ids"]


def test_tiny_base_with_the_llama2_tokenizer_has_its_vocab(tmp_path, llama2_tokenizer_model):
    from transformers import AutoConfig, AutoTokenizer

    out = build_tiny(tmp_path / "base", str(llama2_tokenizer_model))
    assert AutoConfig.from_pretrained(out).vocab_size == 32000
    assert len(AutoTokenizer.from_pretrained(out)) == 32000
    assert (out / "tokenizer.model").read_bytes() == llama2_tokenizer_model.read_bytes()


# ---------------------------------------------------------------- the full tiny run's artifacts


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ((), "float32"),  # the tiny preset: follows bnb_4bit_compute_dtype=float32
        (("train.adapter_dtype=bfloat16",), "bfloat16"),
        (("train.quantization.bnb_4bit_compute_dtype=bfloat16",), "bfloat16"),
        (("train.quantization.bnb_4bit_compute_dtype=bfloat16", "train.adapter_dtype=float32"), "float32"),
    ],
)
def test_adapter_trains_in_the_configured_dtype_not_trls_bf16(tmp_path, overrides, expected):
    """trl's SFTTrainer casts a quantized model's trainable weights to bfloat16 in __init__; after the
    stage builds its trainer they have the configured dtype (fails if trl's cast comes back)."""
    import datasets
    import torch
    from hydra import compose, initialize_config_dir
    from peft import LoraConfig
    from trl import SFTConfig

    from pipeline.chat.tokenizer import build_tokenizer
    from pipeline.config import register
    from pipeline.models.load import load_quantized_base
    from pipeline.stages.train import adapter_dtype, sft_trainer

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=tiny", *overrides])
    base = build_tiny(tmp_path / "base")
    tokenizer = build_tokenizer(base / "tokenizer.model")
    examples, _ = encode_rows(synthetic_train_rows()[:8], tokenizer, cfg.train.max_length)
    model = load_quantized_base(str(base), cfg)
    trainer = sft_trainer(
        model,
        SFTConfig(
            output_dir=str(tmp_path / "out"), max_steps=1, report_to="none", bf16=False, max_length=None
        ),
        LoraConfig(**OmegaConf.to_container(cfg.train.lora)),
        datasets.Dataset.from_list(examples),
        tokenizer,
        adapter_dtype(cfg),
        callbacks=[],
    )
    trainable = {name: p.dtype for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and any("lora_A" in name for name in trainable)
    assert set(trainable.values()) == {getattr(torch, expected)}, trainable
    assert adapter_dtype(cfg) == expected


def tiny_cfg(*overrides: str):
    from hydra import compose, initialize_config_dir

    from pipeline.config import register

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["experiment=tiny", *overrides])


def test_the_4bit_base_read_tensor_by_tensor_is_transformers_own_load(tmp_path):
    """load_quantized_base hands transformers slices read with pread instead of letting it map every
    shard (mapped shards count in RSS until the load ends: 13 GB at 7B). The model must not change."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from pipeline.models.load import load_quantized_base

    cfg = tiny_cfg()
    base = build_tiny(tmp_path / "base")
    ours = load_quantized_base(str(base), cfg)
    theirs = AutoModelForCausalLM.from_pretrained(
        base,
        quantization_config=BitsAndBytesConfig(**OmegaConf.to_container(cfg.train.quantization)),
        dtype=getattr(torch, cfg.train.quantization.bnb_4bit_compute_dtype),
        device_map={"": "cpu"},
    )
    assert type(ours) is type(theirs) and ours.name_or_path == str(base)
    assert ours.generation_config.to_dict() == theirs.generation_config.to_dict()
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert ours_state.keys() == theirs_state.keys()
    assert any(t.dtype == torch.uint8 for t in ours_state.values())  # packed NF4 weights
    for name, tensor in theirs_state.items():
        assert ours_state[name].dtype == tensor.dtype and torch.equal(ours_state[name], tensor), name
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


def test_adapter_dtype_out_of_range_is_one_line(tmp_path):
    result = run_pipeline(
        "stage=train",
        "experiment=tiny",
        f"run_dir={tmp_path / 'run'}",
        "train.adapter_dtype=int8",
        check=False,
    )
    assert result.returncode != 0
    assert "train.adapter_dtype=int8: expected null or float16, bfloat16, float32" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_adapter_loads_on_its_base_from_another_cwd(tiny_run, tmp_path, monkeypatch):
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tiny_run / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    base = read_json(adapter / "adapter_config.json")["base_model_name_or_path"]
    assert Path(base).is_absolute()
    monkeypatch.chdir(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(base)
    tok = AutoTokenizer.from_pretrained(adapter)
    ids = torch.tensor([encode_dialog([msg("user", "What is the capital of Tendorten?")], tok)])
    with torch.no_grad():
        base_logits = model(ids).logits
    peft_model = PeftModel.from_pretrained(model, str(adapter))
    saved = load_file(adapter / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(peft_model)
    assert set(saved) == set(loaded)
    assert all(torch.equal(saved[k], loaded[k].to(saved[k].dtype)) for k in saved)
    assert any(k.endswith("lora_B.weight") and saved[k].abs().sum() > 0 for k in saved)  # trained
    with torch.no_grad():
        assert not torch.allclose(peft_model(ids).logits, base_logits)


@pytest.mark.slow
def test_adapter_tokenizer_carries_the_chat_template(tiny_run):
    config = read_json(tiny_run / "adapter" / "tokenizer_config.json")
    assert config["chat_template"] == LLAMA2_CHAT_TEMPLATE
    sp_model = (tiny_run / "adapter" / "tokenizer.model").read_bytes()
    assert sp_model == (tiny_run / "base" / "tokenizer.model").read_bytes()


@pytest.mark.slow
def test_train_metrics(tiny_run):
    metrics = read_json(tiny_run / "metrics" / "train.json")
    curve = [point["loss"] for point in metrics["loss_curve"]]
    assert len(curve) >= 2 and curve[-1] < curve[0]
    assert metrics["steps"] == 300 and metrics["resumed_from"] is None
    # The tiny preset trains the adapter in float32 (its compute dtype), not in trl's bfloat16: the
    # dtypes seen as training began, and those saved.
    assert metrics["adapter_dtype"] == "float32" and metrics["adapter_dtypes"] == ["float32"]
    from safetensors import safe_open

    with safe_open(str(tiny_run / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F32"}
    assert metrics["train_tokens_per_s"] > 0 and metrics["train_tokens"] > 0
    assert metrics["peak_rss_mb"] > 0
    assert metrics["answer_accuracy_trained"]["accuracy"] >= 0.9
    assert metrics["answer_accuracy_untrained_base"]["accuracy"] <= 0.1
    assert metrics["answer_accuracy_trained"]["checked"] > 0
    # How each step executed, and why: the whole batch of 16 fits this machine in one micro-batch,
    # padding-free, without checkpointing; SDPA (no flash-attn on a CPU).
    step = metrics["step"]
    assert (
        step["batch_size"],
        step["ranks"],
        step["micro_batch_size"],
        step["gradient_accumulation_steps"],
    ) == (
        16,
        1,
        16,
        1,
    )
    assert (
        step["padding_free"] and step["attn_implementation"] == "sdpa" and not step["gradient_checkpointing"]
    )
    assert step["why"].startswith("micro-batch 16: the whole per-process batch fits")
    assert "gradient checkpointing off: the activations fit without it" in step["why"]


@pytest.mark.slow
def test_manifest_records_adapter_config_and_versions_without_secrets(tiny_run):
    text = (tiny_run / "manifest.json").read_text(encoding="utf-8")
    manifest = json.loads(text)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        artifact = manifest["artifacts"][f"adapter/{name}"]
        assert artifact["stage"] == "train"
        assert artifact["sha256"] == sha256(tiny_run / "adapter" / name)
    config = manifest["config"]
    assert config["train"]["sft"]["max_steps"] == 300 and config["model"]["tiny"]["hidden_size"] == 256
    assert config["run_dir"] == str(tiny_run)
    assert "${" not in json.dumps(config)  # resolved
    for lib in ("torch", "transformers", "trl", "peft", "bitsandbytes"):
        assert manifest["versions"][lib] == metadata.version(lib)
    assert not HF_TOKEN_RE.search(text)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var):
            assert os.environ[var] not in text


# ---------------------------------------------------------------- resuming after a kill

RESUME_MAX_STEPS, RESUME_SAVE_STEPS, KILL_AT = 160, 40, 80


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> tuple[Path, int]:
    """A train run SIGKILLed once checkpoint-80 is complete: (run dir, its last complete checkpoint step).
    Tests copy it before using it."""
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    run_pipeline("stage=data", "experiment=tiny", f"run_dir={run_dir}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out_path = run_dir.parent / "killed.out"
    with out_path.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline",
                "stage=train",
                "experiment=tiny",
                f"run_dir={run_dir}",
                f"train.sft.max_steps={RESUME_MAX_STEPS}",
                f"train.sft.save_steps={RESUME_SAVE_STEPS}",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 600
            while KILL_AT not in complete_checkpoints(run_dir):
                if proc.poll() is not None:
                    pytest.fail(
                        f"train exited ({proc.returncode}) before checkpoint-{KILL_AT}:\n"
                        f"{out_path.read_text()[-3000:]}"
                    )
                if time.monotonic() > deadline:
                    pytest.fail(f"no checkpoint-{KILL_AT} within 600 s:\n{out_path.read_text()[-3000:]}")
                time.sleep(0.1)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    steps = sorted(complete_checkpoints(run_dir))
    assert steps and steps[-1] >= KILL_AT and steps[-1] < RESUME_MAX_STEPS
    return run_dir, steps[-1]


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.mark.slow
def test_killed_run_wrote_no_adapter(killed_run):
    run_dir, _ = killed_run
    assert not (run_dir / "adapter").exists()
    assert not (run_dir / "metrics" / "train.json").exists()
    assert "train" not in read_json(run_dir / "manifest.json")["stages"]


@pytest.mark.slow
def test_resume_auto_continues_from_the_last_checkpoint(killed_run, tmp_path):
    run_dir = copy_run(killed_run[0], tmp_path / "run")
    last = killed_run[1]
    result = train(
        run_dir,
        "train.resume=auto",
        f"train.sft.max_steps={RESUME_MAX_STEPS}",
        f"train.sft.save_steps={RESUME_SAVE_STEPS}",
    )
    logged = re.findall(r"resuming from (\S*checkpoint-(\d+))", pipeline_log(run_dir, result))
    assert logged, "the log does not say it resumed"
    assert {int(step) for _, step in logged} == {last}

    metrics = read_json(run_dir / "metrics" / "train.json")
    assert metrics["resumed_from"] and Path(metrics["resumed_from"]).name == f"checkpoint-{last}"
    assert Path(metrics["resumed_from"]).resolve().parent == (run_dir / "checkpoints").resolve()
    assert metrics["steps"] == RESUME_MAX_STEPS
    # The curve is the whole run's: the killed part (restored from the checkpoint) then the resumed part.
    every = read_json(run_dir / "manifest.json")["config"]["train"]["sft"]["logging_steps"]
    assert [p["step"] for p in metrics["loss_curve"]] == list(range(every, RESUME_MAX_STEPS + 1, every))
    checkpoint_state = read_json(killed_run[0] / "checkpoints" / f"checkpoint-{last}" / "trainer_state.json")
    before = {e["step"]: e["loss"] for e in checkpoint_state["log_history"] if "loss" in e}
    assert {p["step"]: p["loss"] for p in metrics["loss_curve"] if p["step"] <= last} == before
    # Tokens/s counts only what this process trained.
    checkpoints = complete_checkpoints(run_dir)
    final = checkpoints[RESUME_MAX_STEPS]
    at_kill = tokens_seen(killed_run[0] / "checkpoints" / f"checkpoint-{last}")
    assert metrics["train_tokens"] == tokens_seen(final) - at_kill
    assert metrics["train_tokens_per_s"] > 0
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_resume_never_starts_fresh(killed_run, tmp_path):
    run_dir = copy_run(killed_run[0], tmp_path / "run")
    assert complete_checkpoints(run_dir)
    result = train(
        run_dir,
        "train.resume=never",
        "train.sft.max_steps=20",
        "train.sft.save_steps=10",
        "train.eval_max_rows=4",
    )
    assert "resuming from" not in pipeline_log(run_dir, result)
    metrics = read_json(run_dir / "metrics" / "train.json")
    assert metrics["resumed_from"] is None
    assert metrics["steps"] == 20 and metrics["loss_curve"][0]["step"] == 10
    assert sorted(complete_checkpoints(run_dir)) == [10, 20]  # the killed run's checkpoints are gone
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_resume_auto_skips_an_incomplete_checkpoint(killed_run, tmp_path):
    run_dir = copy_run(killed_run[0], tmp_path / "run")
    last = killed_run[1]
    # What a kill during the next save leaves: model and optimizer written, trainer_state.json not yet.
    partial = run_dir / "checkpoints" / f"checkpoint-{last + RESUME_SAVE_STEPS}"
    shutil.copytree(run_dir / "checkpoints" / f"checkpoint-{last}", partial)
    (partial / "trainer_state.json").unlink()
    result = train(
        run_dir,
        "train.resume=auto",
        f"train.sft.max_steps={last + RESUME_SAVE_STEPS}",
        f"train.sft.save_steps={RESUME_SAVE_STEPS}",
        "train.eval_max_rows=4",
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_json(run_dir / "metrics" / "train.json")
    assert Path(metrics["resumed_from"]).name == f"checkpoint-{last}"
    assert metrics["steps"] == last + RESUME_SAVE_STEPS
    final = run_dir / "checkpoints" / f"checkpoint-{last + RESUME_SAVE_STEPS}"
    assert metrics["train_tokens"] < tokens_seen(final)  # only what it trained itself


# ---------------------------------------------------------------- packing and padding-free


def fake_hf_token() -> str:
    return "hf_" + "".join(secrets.choice(string.ascii_letters) for _ in range(34))


def short_train(run_dir: Path, monkeypatch, *overrides: str) -> dict:
    """Data stage, then a 10-step train with a (fake, offline) HF token in the environment."""
    token = fake_hf_token()
    monkeypatch.setenv("HF_TOKEN", token)
    run_pipeline("stage=data", "experiment=tiny", f"run_dir={run_dir}")
    train(run_dir, "train.sft.max_steps=10", "train.eval_max_rows=4", *overrides)
    metrics = read_json(run_dir / "metrics" / "train.json")
    assert metrics["steps"] == 10 and metrics["train_tokens"] > 0 and metrics["train_tokens_per_s"] > 0
    assert all(p["loss"] == p["loss"] for p in metrics["loss_curve"])  # not NaN
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    manifest = read_json(run_dir / "manifest.json")
    for override in overrides:
        key, value = override.split("=")
        node = manifest["config"]
        for part in key.split("."):
            node = node[part]
        assert str(node).lower() == value, (key, node)
    for path in run_dir.rglob("*"):
        if path.is_file() and path.suffix in {".json", ".jsonl", ".log", ".yaml", ".md", ".txt"}:
            assert token not in path.read_text(encoding="utf-8", errors="replace"), path
    return metrics


@pytest.mark.slow
def test_packing_trains(tmp_path, monkeypatch):
    from pipeline.chat.rows import read_jsonl
    from pipeline.chat.tokenizer import build_tokenizer

    run_dir = tmp_path / "run"
    metrics = short_train(run_dir, monkeypatch, "train.sft.packing=true")
    # Packed: a step sees more tokens than its batch of rows could hold unpacked, even at the longest row.
    tokenizer = build_tokenizer(run_dir / "base" / "tokenizer.model")
    rows = read_jsonl(run_dir / "data" / "train.jsonl")
    examples, _ = encode_rows(rows, tokenizer, metrics["encode"]["max_length"])
    batch = metrics["step"]["micro_batch_size"]
    assert metrics["train_tokens"] > metrics["steps"] * batch * max(len(e["input_ids"]) for e in examples)


@pytest.mark.slow
def test_padded_batches_and_the_lean_split_train(tmp_path, monkeypatch):
    """The script's padded batches, one sequence at a time with checkpointing: still 16 per step."""
    metrics = short_train(
        tmp_path / "run",
        monkeypatch,
        "train.sft.padding_free=false",
        "train.micro_batch_size=1",
        "train.gradient_checkpointing=true",
    )
    step = metrics["step"]
    assert (step["micro_batch_size"], step["gradient_accumulation_steps"]) == (1, 16)
    assert step["gradient_checkpointing"] and not step["padding_free"]
