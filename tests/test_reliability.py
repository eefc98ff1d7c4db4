"""Faults and refused settings: nothing lost, no child left behind, nothing sent off the machine."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, run_pipeline


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("override", "key"),
    [("+train.sft.no_such_field=1", "train.sft"), ("+train.lora.no_such_field=1", "train.lora")],
)
def test_a_refused_library_field_keeps_the_checkpoints(override, key, tmp_path):
    run_dir = tmp_path / "run"
    run_pipeline("stage=data", "experiment=tiny", f"run_dir={run_dir}")
    checkpoint = run_dir / "checkpoints" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    result = run_pipeline("stage=train", "experiment=tiny", f"run_dir={run_dir}", override, check=False)
    assert result.returncode != 0
    assert last_line(result.stderr).startswith(f"error: {key}: "), result.stderr[-2000:]
    assert "no_such_field" in last_line(result.stderr)
    assert "Traceback" not in result.stderr
    assert (checkpoint / "trainer_state.json").is_file(), "the run's checkpoints were deleted"


@pytest.mark.parametrize(("setting", "disabled"), [(None, True), ("0", False), ("1", True)])
def test_hub_telemetry_is_off_unless_the_user_opts_in(setting, disabled):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_TELEMETRY", "HF_HUB_OFFLINE")}
    if setting is not None:
        env["HF_HUB_DISABLE_TELEMETRY"] = setting
    code = "import pipeline, huggingface_hub.constants as c; print(c.HF_HUB_DISABLE_TELEMETRY)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == str(disabled)


@pytest.mark.slow
def test_the_converter_dies_with_a_killed_pipeline(tiny_run, tmp_path):
    """SIGKILL of `python -m pipeline stage=convert` takes llama.cpp's converter with it."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run / "merged", run_dir / "merged")
    shutil.copytree(tiny_run / "data", run_dir / "data")
    command = [sys.executable, "-m", "pipeline", "stage=convert", "experiment=tiny", f"run_dir={run_dir}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    pipeline = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        converter = None
        deadline = time.monotonic() + 120
        while converter is None and time.monotonic() < deadline and pipeline.poll() is None:
            children = psutil.Process(pipeline.pid).children(recursive=True)
            converter = next((c for c in children if "convert_hf_to_gguf.py" in " ".join(c.cmdline())), None)
            time.sleep(0.05)
        assert converter is not None, "the converter never started"
        pipeline.send_signal(signal.SIGKILL)
        pipeline.wait()
        # PR_SET_PDEATHSIG: SIGTERM at once. Left alone, it would go on for seconds (importing torch,
        # reading the shards, writing its temporary).
        gone, alive = psutil.wait_procs([converter], timeout=2)
        assert not alive, f"converter {converter.pid} outlived the pipeline"
    finally:
        if pipeline.poll() is None:
            pipeline.kill()
    assert not list(Path(run_dir / "gguf").glob("*.gguf")), "a GGUF was finished under its final name"


# Settings out of range: one line naming the key and what it expects, before any stage runs.
OUT_OF_RANGE = [
    ("data.eval_fraction=1.5", "data.eval_fraction=1.5: expected 0 <= x < 1"),
    ("data.eval_fraction=-0.1", "data.eval_fraction=-0.1: expected 0 <= x < 1"),
    ("data.max_eval_rows=-1", "data.max_eval_rows=-1: expected 0 or more"),
    ("train.max_length=0", "train.max_length=0: expected a positive number"),
    ("train.max_length=-5", "train.max_length=-5: expected a positive number"),
    ("train.sft.max_steps=0", "train.sft.max_steps=0: expected a positive number of steps"),
    ("train.sft.max_steps=-7", "train.sft.max_steps=-7: expected a positive number of steps"),
    ("merge.dtype=float99", "merge.dtype=float99: expected one of float16, bfloat16, float32"),
    ("merge.check_rows=0", "merge.check_rows=0: expected a positive number"),
    ("export.outtype=f8", "export.outtype=f8: expected one of f16, bf16, q8_0, f32"),
    ("export.quants=[]", "export.quants=[]: expected at least one quant type"),
    ("export.ladder_rows=0", "export.ladder_rows=0: expected a positive number"),
    ("smoke.n_ctx=0", "smoke.n_ctx=0: expected a positive number"),
    ("smoke.max_tokens=-1", "smoke.max_tokens=-1: expected a positive number"),
    ("data.synthetic.train_rows=0", "data.synthetic.train_rows=0: expected a positive number"),
]


@pytest.mark.parametrize(("override", "message"), OUT_OF_RANGE, ids=[o for o, _ in OUT_OF_RANGE])
def test_a_setting_out_of_range_is_one_line_before_anything_runs(override, message, tmp_path):
    run_dir = tmp_path / "run"
    result = run_pipeline("stage=data", "experiment=tiny", f"run_dir={run_dir}", override, check=False)
    assert result.returncode != 0
    assert last_line(result.stderr).startswith(f"error: {message}"), result.stderr[-1500:]
    assert "Traceback" not in result.stderr
    assert not (run_dir / "data").exists(), "the data stage ran"


@pytest.mark.parametrize("kind", ["a regular file", "an immutable directory"])
def test_an_unusable_run_dir_is_one_line_before_hydra_writes(kind, tmp_path):
    if kind == "a regular file":
        run_dir = tmp_path / "run"
        run_dir.write_text("not a directory")
        expected = "exists and is not a directory"
    else:
        from test_export import make_read_only

        run_dir = tmp_path / "run"
        run_dir.mkdir()
        undo = make_read_only(run_dir)
        expected = "cannot write to"
    try:
        result = run_pipeline("stage=data", "experiment=tiny", f"run_dir={run_dir}", check=False)
    finally:
        if kind != "a regular file":
            undo()
    assert result.returncode != 0
    assert result.stderr.strip() == f"error: run_dir={run_dir}: " + result.stderr.strip().split(": ", 2)[2]
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    if kind == "a regular file":
        assert run_dir.read_text() == "not a directory"
    else:
        assert list(run_dir.iterdir()) == []


def test_a_damaged_line_in_the_run_data_names_file_and_line(tmp_path):
    run_dir = tmp_path / "run"
    run_pipeline("stage=data", "experiment=tiny", f"run_dir={run_dir}")
    train = run_dir / "data" / "train.jsonl"
    lines = train.read_text().splitlines()
    lines[6] = lines[6][: len(lines[6]) // 2]  # line 7 cut in half
    train.write_text("\n".join(lines) + "\n")
    result = run_pipeline("stage=train", "experiment=tiny", f"run_dir={run_dir}", check=False)
    assert result.returncode != 0
    assert last_line(result.stderr).startswith(f"error: {train}:7: not a JSON row"), result.stderr[-1500:]
    assert "Traceback" not in result.stderr


def test_invalid_utf8_in_a_json_data_file_names_the_file(tmp_path):
    data = tmp_path / "rows.json"
    data.write_bytes(b'[\n{"text": "### Human: hi ### Assistant: ok"},\n{"text": "caf\xe9"}\n]\n')
    result = run_pipeline("stage=data", f"data.path={data}", f"run_dir={tmp_path / 'run'}", check=False)
    assert result.returncode != 0
    assert last_line(result.stderr).startswith(f"error: {data}:3: not UTF-8"), result.stderr[-1500:]
    assert "Traceback" not in result.stderr


PROBE_CONFIG = """
from pathlib import Path
from transformers import LlamaConfig

Path({marker!r}).write_text("yes")  # the remote code ran (transformers runs a copy of this file)


class ProbeConfig(LlamaConfig):
    model_type = "probe_llama"
"""
PROBE_MODEL = """
from transformers import LlamaForCausalLM
from .configuration_probe import ProbeConfig


class ProbeForCausalLM(LlamaForCausalLM):
    config_class = ProbeConfig
"""


@pytest.fixture
def remote_code_base(tmp_path) -> Path:
    """A local base whose config.json needs its own Python (auto_map), as hub repos with custom code do."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base = tmp_path / "probe-base"
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(base)
    config = json.loads((base / "config.json").read_text())
    config.update(
        model_type="probe_llama",
        auto_map={
            "AutoConfig": "configuration_probe.ProbeConfig",
            "AutoModelForCausalLM": "modeling_probe.ProbeForCausalLM",
        },
    )
    (base / "config.json").write_text(json.dumps(config))
    (base / "configuration_probe.py").write_text(PROBE_CONFIG.format(marker=str(base / "executed")))
    (base / "modeling_probe.py").write_text(PROBE_MODEL)
    return base


def test_merge_loads_honour_trust_remote_code(remote_code_base):
    """merge's config and model loads take model.trust_remote_code: refused without it, run with it."""
    from pipeline.stages.merge import quantized_linear_names

    with pytest.raises(ValueError, match="trust_remote_code"):
        quantized_linear_names(remote_code_base, trust_remote_code=False)
    assert not (remote_code_base / "executed").exists()
    names = quantized_linear_names(remote_code_base, trust_remote_code=True)
    assert "model.layers.0.self_attn.q_proj.weight" in names and "lm_head.weight" not in names
    assert (remote_code_base / "executed").is_file()


def test_the_4bit_load_honours_trust_remote_code(remote_code_base):
    """The 4-bit base is built by the base's own class only when model.trust_remote_code says so."""
    from hydra import compose, initialize_config_dir

    from pipeline.config import register
    from pipeline.models.load import load_quantized_base

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=tiny"])
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_quantized_base(str(remote_code_base), cfg)
    assert not (remote_code_base / "executed").exists()
    cfg.model.trust_remote_code = True
    model = load_quantized_base(str(remote_code_base), cfg)
    assert type(model).__name__ == "ProbeForCausalLM" and (remote_code_base / "executed").is_file()
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


def test_a_base_that_is_no_causal_lm_is_refused_in_one_line(tmp_path):
    import torch
    from hydra import compose, initialize_config_dir
    from safetensors.torch import save_file
    from transformers import ViTConfig

    from pipeline.config import register
    from pipeline.models.load import load_quantized_base
    from pipeline.run.errors import ConfigError

    ViTConfig().save_pretrained(tmp_path)
    save_file({"pooler.dense.bias": torch.zeros(768)}, tmp_path / "model.safetensors")
    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=tiny"])
    with pytest.raises(ConfigError, match="config.json: ViTConfig is not a causal LM"):
        load_quantized_base(str(tmp_path), cfg)


def test_trust_remote_code_names_what_will_run(remote_code_base, tmp_path):
    result = run_pipeline(
        "stage=data",
        "experiment=tiny",
        f"run_dir={tmp_path / 'run'}",
        "model.trust_remote_code=true",
        f"model.name_or_path={remote_code_base}",
        check=False,
    )
    warning = next(
        (line for line in result.stderr.splitlines() if line.startswith("warning: model.trust_remote_code")),
        "",
    )
    assert (
        str(remote_code_base) in warning
        and "configuration_probe.py" in warning
        and "modeling_probe.py" in warning
    )


def copy_of(tiny_run: Path, tmp_path: Path, *parts: str) -> Path:
    run_dir = tmp_path / "run"
    for part in parts:
        shutil.copytree(tiny_run / part, run_dir / part)
    return run_dir


@pytest.mark.slow
def test_a_truncated_merged_shard_is_named_before_converting(tiny_run, tmp_path):
    run_dir = copy_of(tiny_run, tmp_path, "merged", "data")
    shard = sorted((run_dir / "merged").glob("*.safetensors"))[-1]
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    result = run_pipeline("stage=convert", "experiment=tiny", f"run_dir={run_dir}", check=False)
    assert result.returncode != 0
    assert last_line(result.stderr).startswith(f"error: {shard}: truncated"), result.stderr[-1500:]
    assert "Traceback" not in result.stderr
    assert not (run_dir / "gguf").exists() or not list((run_dir / "gguf").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("gone", ["moved-run/base", "somewhere/else"])
def test_an_adapter_whose_local_base_is_gone(gone, tiny_run, tmp_path):
    """The tiny run's adapter names its base by absolute path; after the run dir moves, that path is
    gone. It is never taken for a hub id: the run's own base/ is used, anything else is named."""
    run_dir = copy_of(tiny_run, tmp_path, "adapter", "base", "data")
    adapter_config = run_dir / "adapter" / "adapter_config.json"
    config = json.loads(adapter_config.read_text())
    config["base_model_name_or_path"] = str(tmp_path / gone)
    adapter_config.write_text(json.dumps(config))
    result = run_pipeline("stage=merge", "experiment=tiny", f"run_dir={run_dir}", check=False)
    if gone.endswith("/base"):
        assert result.returncode == 0, result.stderr[-2000:]
        assert (run_dir / "merged" / "config.json").is_file()
    else:
        assert result.returncode != 0
        line = last_line(result.stderr)
        assert line.startswith(f"error: {adapter_config}: base_model_name_or_path {tmp_path / gone}"), line
        assert "Traceback" not in result.stderr and "huggingface" not in line.lower()


# Missing or wrong inputs, stage by stage: (overrides, what the one-line error must contain).
# `{run}` is the run dir (with the data stage's output in it), `{tmp}` a scratch directory.
MISSING_INPUTS = {
    "train without data": (
        ["stage=train", "run_dir={tmp}/empty"],
        "train.jsonl not found: run stage=data first",
    ),
    "merge without adapter": (["stage=merge"], "adapter"),
    "convert without merged": (["stage=convert"], "merged not found or incomplete: run stage=merge first"),
    "quantize without F16": (["stage=quantize"], "-F16.gguf not found: run stage=convert first"),
    "smoke without artifacts": (["stage=smoke"], "not found: run the merge/convert/quantize stages first"),
    "smoke of a missing gguf": (
        ["stage=smoke", "smoke.hf_dir={tmp}", "smoke.gguf=[{tmp}/nope.gguf]"],
        "not found",
    ),
    "unknown quant type": (["stage=quantize", "export.quants=[Q9_X]"], "unknown quant type 'Q9_X'"),
    "missing data file": (["stage=data", "data.path={tmp}/nope.jsonl"], "nope.jsonl: data file not found"),
    "csv data file": (["stage=data", "data.path={tmp}/rows.csv"], "unsupported file type '.csv'"),
    "empty data file": (["stage=data", "data.path={tmp}/empty.jsonl"], "no usable rows"),
    "bad guanaco row": (["stage=data", "data.path={tmp}/bad.jsonl"], "bad.jsonl:2"),
    "parquet that is not parquet": (
        ["stage=data", "data.path={tmp}/bad.parquet"],
        "bad.parquet: not a parquet file",
    ),
    "a directory as data file": (["stage=data", "data.path={tmp}"], "data file not found"),
    "non-UTF-8 jsonl line": (["stage=data", "data.path={tmp}/latin1.jsonl"], "latin1.jsonl:1"),
    "missing tokenizer.model": (["stage=train", "model.tokenizer_path={tmp}/nope.model"], "nope.model"),
    "llama.cpp not where configured": (
        ["stage=convert", "llamacpp.dir={tmp}/no-llama.cpp"],
        "run stage=merge first",
    ),
}


@pytest.mark.parametrize("case", list(MISSING_INPUTS), ids=list(MISSING_INPUTS))
def test_a_missing_or_wrong_input_is_one_line(case, tmp_path):
    overrides, expected = MISSING_INPUTS[case]
    run_dir = tmp_path / "run"
    run_pipeline("stage=data", "experiment=tiny", f"run_dir={run_dir}")
    (tmp_path / "rows.csv").write_text("text\nhi\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.parquet").write_text("not parquet at all")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "### Human: caf\xe9 ### Assistant: oui"}\n')
    good = json.dumps({"text": "### Human: hi ### Assistant: hello"})
    (tmp_path / "bad.jsonl").write_text(good + "\n" + json.dumps({"text": "no turns at all"}) + "\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    args = [a.format(tmp=tmp_path, run=run_dir) for a in overrides]
    if not any(a.startswith("run_dir=") for a in args):
        args.append(f"run_dir={run_dir}")
    # A data file is read by the guanaco data config; experiment=tiny would generate its own data.
    preset = [] if any(a.startswith("data.path=") for a in args) else ["experiment=tiny"]
    result = run_pipeline(*preset, *args, check=False)
    assert result.returncode != 0
    line = last_line(result.stderr)
    assert line.startswith("error: ") and expected in line, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    # Hydra's own log and .hydra/ record of the command, and the run's lock file (pipeline.run.runlock),
    # are not artifacts; any other new file is.
    after = [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()]
    written = [
        p
        for p in after
        if p not in before and p.suffix != ".log" and p.name != ".lock" and ".hydra" not in p.parts
    ]
    assert written == [], f"written despite the error: {written}"


@pytest.mark.slow
def test_an_unexpected_error_keeps_its_whole_traceback(tiny_run, tmp_path):
    """A failure that is not one of the project's own errors (here safetensors' own error on a
    damaged adapter; on a GPU, CUDA out of memory or NCCL) is never shortened to one line: its
    traceback reaches stderr and run_dir's log, and the exit is non-zero."""
    run_dir = copy_of(tiny_run, tmp_path, "adapter", "data", "base", "metrics")
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    result = run_pipeline("stage=merge", "experiment=tiny", f"run_dir={run_dir}", check=False)
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr, result.stderr[-2000:]
    assert "load_adapter" in result.stderr  # the frame it failed in, not only the message
    log = (run_dir / "__main__.log").read_text()
    assert "Traceback (most recent call last)" in log and "load_adapter" in log
    assert not (run_dir / "merged").exists()


def test_a_second_run_on_a_busy_run_dir_is_refused_and_a_killed_holder_never_blocks(tmp_path):
    """Two runs, one run dir: the second refuses at once naming the holder's pid, and writes nothing
    (Hydra's .hydra/ of the first is untouched); once the holder is SIGKILLed, its lock is gone."""
    run_dir = tmp_path / "run"
    run_pipeline("stage=data", "experiment=tiny", f"run_dir={run_dir}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    holder = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "stage=train", "experiment=tiny", f"run_dir={run_dir}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        lock = run_dir / ".lock"
        deadline = time.monotonic() + 60
        while not (lock.is_file() and lock.read_text().startswith(f"{holder.pid} ")):
            assert holder.poll() is None and time.monotonic() < deadline, "the train run never took the lock"
            time.sleep(0.2)
        time.sleep(1.0)  # Hydra has written the holder's .hydra/ by now
        hydra_config = (run_dir / ".hydra" / "overrides.yaml").read_bytes()
        started = time.monotonic()
        second = run_pipeline(
            "stage=data", "experiment=tiny", f"run_dir={run_dir}", "force=true", check=False
        )
        assert time.monotonic() - started < 30, "the second run did not refuse at once"
        assert second.returncode != 0
        line = second.stderr.strip()
        assert "\n" not in line and line.startswith(
            f"error: run_dir={run_dir.resolve()} is in use by another run (pid {holder.pid}, started "
        ), line
        assert line.endswith("); wait for it to finish, or choose another run_dir"), line
        assert (run_dir / ".hydra" / "overrides.yaml").read_bytes() == hydra_config
        assert holder.poll() is None, "the refused run disturbed the holder"
    finally:
        holder.kill()
        holder.wait()
    # The lock file is still there with the dead pid in it; the kernel dropped the lock itself.
    assert (run_dir / ".lock").read_text().startswith(f"{holder.pid} ")
    again = run_pipeline("stage=data", "experiment=tiny", f"run_dir={run_dir}", check=False)
    assert again.returncode == 0, again.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["not a GGUF", "truncated"])
@pytest.mark.parametrize("stage", ["smoke", "ladder"])
def test_a_damaged_gguf_is_one_line_naming_it_before_the_stage_works(damage, stage, tiny_run, tmp_path):
    """smoke.gguf= or the run's own GGUF that is not a GGUF, or cut short: one line naming the file,
    before the stage starts any engine (llama-cpp-python's own error is a bare ValueError)."""
    run_dir = tmp_path / "run"
    for name in ("data", "merged", "gguf", "base", "adapter"):
        shutil.copytree(tiny_run / name, run_dir / name, symlinks=True)
    shipped = sorted((run_dir / "gguf").glob("*-F16.gguf"))[0]
    bad = shipped if stage == "ladder" else tmp_path / "bad.gguf"
    if damage == "not a GGUF":
        bad.write_text("this is a text file, not a model\n")
    else:
        data = shipped.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    args = [f"stage={stage}", "experiment=tiny", f"run_dir={run_dir}"]
    if stage == "smoke":
        args += [f"smoke.hf_dir={run_dir / 'merged'}", f"smoke.gguf=[{bad}]"]
    result = run_pipeline(*args, check=False, timeout=300)
    assert result.returncode != 0
    line = last_line(result.stderr)
    assert line.startswith(f"error: {bad}: "), result.stderr[-2000:]
    assert ("not a GGUF file" if damage == "not a GGUF" else "llama.cpp cannot load this GGUF") in line
    assert "Traceback" not in result.stderr
    assert (
        not (run_dir / "smoke" / "report.json").exists()
        and not (run_dir / "metrics" / "ladder.json").exists()
    )


@pytest.fixture
def small_disk(tmp_path):
    """A 72 MB tmpfs (the tiny model's merged dir fits, a GGUF beside it with the stage's margin not)."""
    yield from tmpfs(tmp_path / "disk", "72m")


@pytest.fixture
def merge_disk(tmp_path):
    """A 256 MB tmpfs: room for the tiny merge and the stage's margin, until the filler takes it."""
    yield from tmpfs(tmp_path / "disk", "256m")


def tmpfs(mount: Path, size: str):
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["convert", "quantize"])
def test_a_stage_that_would_fill_the_disk_refuses_before_writing(stage, tiny_run, small_disk):
    """Too little free space for the GGUF(s): one line naming the directory, what the stage needs and
    what is free; no GGUF is written and the manifest is as it was."""
    run_dir = small_disk / "run"
    for name in ("data", "merged") if stage == "convert" else ("data", "merged/generation_config.json"):
        source = tiny_run / name
        if source.is_dir():
            shutil.copytree(source, run_dir / name)
        else:
            (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, run_dir / name)
    if stage == "quantize":
        (run_dir / "gguf").mkdir()
        shipped = sorted((tiny_run / "gguf").glob("*-F16.gguf"))[0]
        shutil.copy(shipped, run_dir / "gguf" / shipped.name)
        shutil.copytree(tiny_run / "merged", run_dir / "merged", dirs_exist_ok=True)
    shutil.copy(tiny_run / "manifest.json", run_dir / "manifest.json")
    manifest = (run_dir / "manifest.json").read_bytes()
    before = sorted(p.name for p in (run_dir / "gguf").glob("*")) if stage == "quantize" else []
    result = run_pipeline(
        f"stage={stage}", "experiment=tiny", f"run_dir={run_dir}", "force=true", check=False
    )
    assert result.returncode != 0
    line = last_line(result.stderr)
    assert line.startswith(f"error: {run_dir / 'gguf'}: not enough free disk space for "), result.stderr[
        -2000:
    ]
    assert "needs about" in line and "MB free there" in line
    assert "Traceback" not in result.stderr
    after = sorted(p.name for p in (run_dir / "gguf").glob("*")) if (run_dir / "gguf").exists() else []
    assert after == before, "a GGUF (or a temporary) was written"
    assert (run_dir / "manifest.json").read_bytes() == manifest


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ('{"stages": ', "not valid JSON"),
        ("[1, 2]", 'expected an object with "artifacts" and "stages" objects'),
        ('{"artifacts": {}, "stages": {"data": {"inputs": {}}}}', "stages.data: expected config_hash"),
        ('{"artifacts": {"data/train.jsonl": {"sha256": 1}}, "stages": {}}', "artifacts.data/train.jsonl"),
    ],
)
def test_a_manifest_edited_by_hand_is_one_line_and_stays_as_it_is(edit, expected, tmp_path):
    run_dir = tmp_path / "run"
    run_pipeline("stage=data", "experiment=tiny", f"run_dir={run_dir}")
    (run_dir / "manifest.json").write_text(edit)
    result = run_pipeline("stage=data", "experiment=tiny", f"run_dir={run_dir}", check=False)
    assert result.returncode != 0
    line = last_line(result.stderr)
    assert line.startswith(f"error: {run_dir / 'manifest.json'}: ") and expected in line, result.stderr[
        -2000:
    ]
    assert line.endswith("restore it, or move it away to rerun every stage")
    assert "Traceback" not in result.stderr
    assert (run_dir / "manifest.json").read_text() == edit


def test_the_manifest_reads_a_file_again_only_when_its_stat_changed(tmp_path):
    """A 13.5 GB GGUF is hashed once, not at every stage that names it; any write shows in its stat."""
    from pipeline.run.io import sha256_file
    from pipeline.run.manifest import Manifest

    run_dir = tmp_path / "run"
    (run_dir / "gguf").mkdir(parents=True)
    gguf, key = run_dir / "gguf" / "model.gguf", "gguf/model.gguf"
    gguf.write_bytes(b"a" * 4096)
    manifest = Manifest(run_dir)
    assert manifest.hashes([gguf]) == {key: sha256_file(gguf)}
    assert key not in manifest.data["hashed"]  # written within a clock tick: hashed again next time
    time.sleep(0.1)
    assert manifest.digest(gguf, key) == sha256_file(gguf) and key in manifest.data["hashed"]
    manifest.data["hashed"][key]["sha256"] = "0" * 64  # planted: returned only if the file is not read
    assert manifest.digest(gguf, key) == "0" * 64
    before = gguf.stat()
    with gguf.open("r+b") as f:  # same size, same inode, its modification time set back
        f.write(b"b")
    os.utime(gguf, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert gguf.stat().st_mtime_ns == before.st_mtime_ns
    assert manifest.digest(gguf, key) == sha256_file(gguf) != "0" * 64


def take_all_free_space(filler: Path) -> None:
    """Allocate every free byte of filler's file system to it, at once. The merge writes meanwhile,
    so a request for what was free a moment ago can fail: ask again for half, down to a page."""
    with open(filler, "wb") as f:
        size, want = 0, shutil.disk_usage(filler.parent).free
        while want >= 4096:
            try:
                os.posix_fallocate(f.fileno(), size, want)
                size += want
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                want //= 2


@pytest.mark.slow
def test_a_disk_that_fills_up_during_the_merge_is_one_line_and_loses_nothing(tiny_run, merge_disk):
    """The free space passes the stage's check, then another writer takes it (the filler, the moment
    the merge's temporary directory appears): a real ENOSPC mid-write. One line naming the path and
    what the stage needed; no merged/ under its final name, the old one and the manifest as they were."""
    run_dir = merge_disk / "run"
    for name in ("data", "adapter"):
        shutil.copytree(tiny_run / name, run_dir / name)
    shutil.copy(tiny_run / "manifest.json", run_dir / "manifest.json")
    manifest = (run_dir / "manifest.json").read_bytes()
    command = [sys.executable, "-m", "pipeline", "stage=merge", "experiment=tiny", f"run_dir={run_dir}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    merge = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while not list(run_dir.glob(".merged.tmp-*")) and merge.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    take_all_free_space(merge_disk / "filler")
    _, stderr = merge.communicate(timeout=300)
    assert merge.returncode == 1, stderr[-3000:]
    line = last_line(stderr)
    # Usually the shard being written hits the full disk; when the filler wins the race while the
    # stage writes elsewhere in the run dir, the line names that path instead. Either is one line.
    assert line.startswith(f"error: {run_dir}") and "no space left on the device" in line, stderr[-3000:]
    if line.startswith(f"error: {run_dir}/.merged.tmp-"):
        assert "the stage needs about" in line and "the merged model in float32" in line, line
    assert "Traceback" not in stderr
    assert not (run_dir / "merged").exists() and not list(run_dir.glob(".merged.*"))
    assert (run_dir / "manifest.json").read_bytes() == manifest
