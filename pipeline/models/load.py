"""Loading models with transformers and peft: the 4-bit NF4 base the adapter is trained against,
the same with the trained adapter, and full-precision checkpoints (merged, or base + adapter)."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.run.errors import ConfigError, DataError, MergeError
from pipeline.run.layout import RunDir

log = logging.getLogger(__name__)


def base_weight_files(base: str, revision: str | None = None) -> tuple[Path, list[Path]]:
    """(directory, safetensors files) of the base model; never pickled .bin checkpoints."""
    base_dir = Path(base)
    if not base_dir.is_dir():
        from huggingface_hub import snapshot_download

        base_dir = Path(
            snapshot_download(base, revision=revision, allow_patterns=["*.safetensors", "*.json", "*.py"])
        )
    files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        raise DataError(f"{base_dir}: no *.safetensors weights (pickled checkpoints are never loaded)")
    return base_dir, files


def causal_lm_class(config, base_dir: Path, trust_remote_code: bool):
    """The class AutoModelForCausalLM would build for `config`: the base's own code when it has
    some and it is trusted, else transformers' (which refuses a config that needs code)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModelForCausalLM" in auto_map:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(auto_map["AutoModelForCausalLM"], str(base_dir))
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ConfigError(
            f"{base_dir / 'config.json'}: {type(config).__name__} is not a causal LM transformers knows"
        )
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def load_quantized_base(base: str, cfg, attn_implementation: str | None = None):
    """The base in 4-bit with `train.quantization` (bitsandbytes), one full copy per process.

    transformers' own load maps every shard and unmaps them only when the load ends, so the whole
    base (13 GB at 7B) counts in resident memory while it is quantized. It is handed slices read
    with pread instead: each tensor is in memory only while bitsandbytes quantizes it."""
    import contextlib

    import torch
    from accelerate import PartialState
    from safetensors import safe_open
    from transformers import AutoConfig, BitsAndBytesConfig, GenerationConfig

    remote_code = cfg.model.trust_remote_code
    base_dir, files = base_weight_files(base, cfg.model.revision if cfg.model.tiny is None else None)
    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=remote_code)
    model_class = causal_lm_class(config, base_dir, remote_code)
    quantization = BitsAndBytesConfig(**OmegaConf.to_container(cfg.train.quantization))
    with contextlib.ExitStack() as stack:
        shards = [stack.enter_context(safe_open(path, "pt", backend="pread")) for path in files]
        model = model_class.from_pretrained(
            None,
            config=config,
            state_dict={name: shard.get_slice(name) for shard in shards for name in shard.keys()},
            quantization_config=quantization,
            dtype=getattr(torch, cfg.train.quantization.bnb_4bit_compute_dtype),
            device_map={"": PartialState().device},  # one full copy per process (DDP), CPU without a GPU
            attn_implementation=attn_implementation,  # None: transformers' default (SDPA)
        )
    model.name_or_path = model.config.name_or_path = base  # what peft records as the adapter's base
    if (base_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(base_dir)
    return model


def load_4bit_with_adapter(base: str, adapter_dir: Path, cfg):
    """What training produced: the 4-bit base with the adapter on top, unmerged."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_quantized_base(base, cfg), str(adapter_dir))


def load_full_precision(
    path,
    dtype,
    adapter_dir: Path | None = None,
    trust_remote_code: bool = False,
    max_memory: int | None = None,
):
    """A checkpoint on the CPU in `dtype`, with an (unmerged) adapter on top when given. With
    `max_memory` (bytes) and `dtype` the checkpoint's own, what does not fit stays on disk: accelerate
    reads those layers from the safetensors files as each forward pass reaches them (no copy is
    written), so a 7B model is measured in a few GB, exactly as if it were loaded whole."""
    import tempfile

    from transformers import AutoModelForCausalLM

    if max_memory is None:
        placement = {"device_map": "cpu"}
    else:
        placement = {
            "device_map": "auto",
            "max_memory": {"cpu": max_memory},
            # Unused for safetensors in their own dtype; accelerate asks for it anyway.
            "offload_folder": tempfile.mkdtemp(prefix="offload-"),
        }
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, trust_remote_code=trust_remote_code, **placement
    )
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model


def local_base(base: str, layout: RunDir) -> str:
    """The adapter's base: a hub id, or a local directory. A local path that is gone is never taken
    for a hub id: the tiny base moves with its run dir, anything else is an error naming it."""
    path = Path(base)
    if path.is_dir() or not (path.is_absolute() or base.startswith((".", "~"))):
        return base
    if path.name == layout.base.name and layout.base.is_dir():  # model=tiny: built into the run dir
        log.info("the adapter's base %s is gone; using %s (the run dir was moved)", base, layout.base)
        return str(layout.base)
    raise MergeError(
        f"{layout.adapter / 'adapter_config.json'}: base_model_name_or_path {base} is a local directory that "
        "does not exist (moved or deleted?): restore it, or retrain"
    )


def input_device(model):
    """Where a model's inputs go: its device, or the CPU for one partly offloaded to disk (whose
    device reads as `meta`)."""
    return "cpu" if model.device.type == "meta" else model.device
