"""Memory: each stage's peak resident memory, measured while it runs, and a check before a stage
loads a model that the machine has room for it, so a run that cannot fit says so at once, naming
what it needs, instead of being OOM-killed hours in.

The estimates count the weights a stage holds at its peak (they dominate at 7B) plus a fixed
allowance for the Python process and its libraries; `memory_limit=` caps what a run may use below
what the machine has free (MemAvailable).
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
from pathlib import Path

from pipeline.machine.diskspace import human
from pipeline.run.errors import PipelineError

# torch, transformers, trl and their buffers in a stage process before any weight is loaded
# (measured: 0.6-0.7 GB RSS for the tiny stages on CPU), rounded up.
PROCESS_BYTES = 1 << 30
# Bytes a weight takes in a 4-bit NF4 base: half a byte, plus bitsandbytes' absmax per 64 weights
# (fp32, or 8-bit with double quantization: 0.5 + 4/64 at most).
NF4_BYTES = 0.5 + 4 / 64
# A LoRA weight in training: float32 weight, gradient, and AdamW's two moments.
LORA_TRAIN_BYTES = 16


class NoMemory(PipelineError, MemoryError):
    """A stage would need more memory than this machine (or `memory_limit`) has for it."""


def parse_size(size, key: str) -> int:
    """`2GB`, `500MB`, `16GiB`, ... in bytes; a bad value is a one-line error naming the key."""
    import re

    from pipeline.run.errors import ConfigError

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper())
    if not match:
        raise ConfigError(f"{key}={size!r}: expected a size like 500MB or 16GB")
    units = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20}
    units.update({"GIB": 2**30, "TIB": 2**40})
    return int(float(match[1]) * units[match[2]])


def available_bytes(cfg) -> tuple[int, str]:
    """(bytes a stage may use, where that figure comes from)."""
    import psutil

    free = psutil.virtual_memory().available
    limit = cfg.get("memory_limit")
    if limit is not None and parse_size(limit, "memory_limit") < free:
        return parse_size(limit, "memory_limit"), f"memory_limit={limit}"
    return free, "available on this machine"


def require_memory(cfg, stage: str, needs: dict[str, int]) -> dict:
    """Raise NoMemory unless the largest of `needs` ({what: bytes}, the stage's phases, which never
    overlap) plus the process allowance fits; returns the estimate for the stage's record."""
    what, peak = max(needs.items(), key=lambda item: item[1])
    need = peak + PROCESS_BYTES
    have, source = available_bytes(cfg)
    if need > have:
        raise NoMemory(
            f"stage {stage} needs about {human(need)} of memory ({what}), {human(have)} {source}: "
            "free memory, or run it on a larger machine"
        )
    return {"estimated_peak_bytes": need, "largest_phase": what, "memory_bytes": have, "memory_from": source}


# -- what the weights of a checkpoint take, from its safetensors headers (nothing is loaded)


def tensor_shapes(files) -> dict[str, list[int]]:
    shapes = {}
    for path in files:
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        shapes.update({k: t["shape"] for k, t in header.items() if k != "__metadata__"})
    return shapes


def is_quantized_linear(name: str, shape: list[int]) -> bool:
    """What bitsandbytes quantizes in a Llama: every 2-D weight but the embeddings and the head."""
    return len(shape) == 2 and not any(part in name for part in ("embed_tokens", "lm_head"))


def weights_bytes(shapes: dict, dtype_bytes: float) -> int:
    return int(sum(math.prod(s) for s in shapes.values()) * dtype_bytes)


def nf4_model_bytes(shapes: dict, compute_bytes: int) -> int:
    """The 4-bit base in memory: quantized linears in NF4, the rest in the compute dtype."""
    quantized = sum(math.prod(s) for n, s in shapes.items() if is_quantized_linear(n, s))
    rest = sum(math.prod(s) for n, s in shapes.items() if not is_quantized_linear(n, s))
    return int(quantized * NF4_BYTES + rest * compute_bytes)


def lora_elements(shapes: dict, r: int) -> int:
    """LoRA A and B of rank r on every quantized linear (target_modules=all-linear)."""
    return sum(r * (s[0] + s[1]) for n, s in shapes.items() if is_quantized_linear(n, s))


# -- the peak of a running stage


class StagePeak:
    """Peak resident memory of a stage: this process's exactly (the kernel's high-water mark,
    reset at the start), and its child processes' (llama.cpp's tools and servers) sampled.

    Resident memory counts the pages of files a process maps (transformers maps every checkpoint
    shard while it loads; llama.cpp maps the whole GGUF): the kernel drops those under pressure and
    reads them again. Anonymous memory (RssAnon: tensors, buffers) cannot be dropped without swap:
    it is what must fit, and is sampled too."""

    INTERVAL = 0.2  # seconds between samples

    def __init__(self):
        self.children_peak = 0
        self.total_peak = 0
        self.anon_peak = 0
        self.phase_anon_peak = 0  # since the last phase_peaks()
        self._stop = threading.Event()

    def __enter__(self) -> StagePeak:
        import psutil

        global _earlier_peak, _active
        _active = self
        self._process = psutil.Process()
        self._self_reset = reset_high_water_mark()
        _earlier_peak = 0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        import psutil

        while not self._stop.wait(self.INTERVAL):
            children, anon = 0, anonymous_bytes(self._process.pid)
            for child in self._process.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    children += child.memory_info().rss
                anon += anonymous_bytes(child.pid)
            self.children_peak = max(self.children_peak, children)
            self.total_peak = max(self.total_peak, children + self._process.memory_info().rss)
            self.anon_peak = max(self.anon_peak, anon)
            self.phase_anon_peak = max(self.phase_anon_peak, anon)

    def __exit__(self, *exc) -> None:
        global _active
        self._stop.set()
        self._thread.join()
        _active = None

    def figures(self) -> dict:
        own = max(high_water_mark(), _earlier_peak)
        return {
            # Exact when the kernel let the mark be reset; else the process's peak since it started.
            "peak_rss_mb": round(own / 1e6, 1),
            "peak_rss_exact": self._self_reset,
            "peak_children_rss_mb": round(self.children_peak / 1e6, 1),
            "peak_total_rss_mb": round(max(self.total_peak, own) / 1e6, 1),
            "peak_anon_mb": round(self.anon_peak / 1e6, 1),  # sampled, this process and its children
            # The memory cgroup's limit this stage ran under, if any: at it the kernel reclaims mapped
            # file pages instead of letting RSS grow, and kills on anonymous memory past it.
            "cgroup_limit_mb": None if (cap := cgroup_memory_limit()) is None else round(cap / 1e6, 1),
        }


def memory_cgroup() -> tuple[Path, str] | None:
    """(directory, "v1" or "v2") of this process's memory cgroup; None where there is none."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    entries = [line.split(":", 2) for line in lines]
    for _, controllers, path in entries:
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/"), "v1"
    for _, controllers, path in entries:
        for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):  # unified, or hybrid's v2 part
            directory = Path(root) / path.lstrip("/")
            if controllers == "" and "memory" in read_text(Path(root) / "cgroup.controllers"):
                return directory, "v2"
    return None


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def cgroup_memory_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 memory.max, or v1 memory.limit_in_bytes), in
    bytes; None where there is none (or it is above the machine's memory, v1's "unlimited")."""
    import psutil

    cgroup = memory_cgroup()
    if cgroup is None:
        return None
    directory, version = cgroup
    value = read_text(directory / ("memory.limit_in_bytes" if version == "v1" else "memory.max")).strip()
    return int(value) if value.isdigit() and int(value) < psutil.virtual_memory().total else None


def anonymous_bytes(pid: int) -> int:
    """RssAnon of a process (0 once it has gone, or where /proc is missing)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


_earlier_peak = 0  # the highest VmHWM of this stage before a phase reset it (phase_peaks)
_active: StagePeak | None = None  # the running stage's sampler


def reset_high_water_mark() -> bool:
    """Linux: writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS (proc(5))."""
    global _earlier_peak
    _earlier_peak = max(_earlier_peak, high_water_mark())
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    """Collect reference cycles (peft's wrappers hold some), then hand the freed heap back to the
    kernel: glibc keeps freed blocks for reuse, so without malloc_trim the next phase's RSS would
    start from this one's peak."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(libc).malloc_trim(0)


def phase_peaks() -> tuple[float, float | None]:
    """(peak RSS, peak anonymous memory) since the previous call (or the stage's start), in MB; the
    stage's own peaks keep counting them. Anonymous memory is sampled by the running stage's
    StagePeak (None outside one), so a phase shorter than its interval may miss its peak."""
    peak = high_water_mark()
    reset_high_water_mark()
    anon = None
    if _active is not None:
        anon, _active.phase_anon_peak = _active.phase_anon_peak, anonymous_bytes(_active._process.pid)
        anon = round(anon / 1e6, 1)
    return round(peak / 1e6, 1), anon


def high_water_mark() -> int:
    """VmHWM of this process in bytes (ru_maxrss where /proc is missing)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- what each stage holds at its peak


def checkpoint_shapes(directory) -> dict[str, list[int]]:
    """Tensor shapes of a local safetensors checkpoint; {} for a hub id not on disk."""
    directory = Path(directory)
    return tensor_shapes(sorted(directory.glob("*.safetensors"))) if directory.is_dir() else {}


def dtype_bytes(name: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2}[str(name)]


def adapted_4bit_bytes(shapes: dict, cfg) -> int:
    """The 4-bit base with the adapter on top, for evaluation (no optimizer state)."""
    compute = dtype_bytes(cfg.train.quantization.get("bnb_4bit_compute_dtype") or "float32")
    return nf4_model_bytes(shapes, compute) + lora_elements(shapes, cfg.train.lora.r) * 4


def train_activation_bytes(shapes: dict, cfg, micro_batch: int, checkpointing: bool) -> int:
    """The activations one micro-batch keeps for its backward pass, at `train.max_length` tokens per
    sequence (padding-free or padded, a sequence takes at most that). Per token and layer ~20
    hidden-sized and ~5 intermediate-sized tensors are saved (attention and MLP inputs, norms, the
    LoRA inputs); with checkpointing only each layer's input is, plus one layer's whole set while it
    is recomputed. The head's float32 logits, softmax and gradient come on top."""
    compute = dtype_bytes(cfg.train.quantization.get("bnb_4bit_compute_dtype") or "float32")
    hidden = max((s[1] for n, s in shapes.items() if n.endswith("q_proj.weight")), default=0)
    inter = max((s[0] for n, s in shapes.items() if n.endswith("up_proj.weight")), default=0)
    layers = sum(1 for n in shapes if n.endswith("q_proj.weight"))
    vocab = shapes.get("lm_head.weight", [0])[0]
    whole_layer = (20 * hidden + 5 * inter) * compute
    kept = layers * hidden * compute + whole_layer if checkpointing else layers * whole_layer
    return micro_batch * cfg.train.max_length * (kept + 4 * vocab * 4)


def train_needs(shapes: dict, cfg, micro_batch: int, checkpointing: bool) -> dict[str, int]:
    """QLoRA training: the 4-bit base, the adapter with its gradients and AdamW state, and the
    activations of one micro-batch."""
    compute = dtype_bytes(cfg.train.quantization.get("bnb_4bit_compute_dtype") or "float32")
    model = nf4_model_bytes(shapes, compute) + lora_elements(shapes, cfg.train.lora.r) * LORA_TRAIN_BYTES
    activations = train_activation_bytes(shapes, cfg, micro_batch, checkpointing)
    return {"the 4-bit base, the adapter's training state and the activations": model + activations}


def device_memory(cfg) -> tuple[int, str]:
    """(bytes training may use on the device it runs on, where that figure comes from): a GPU's free
    memory less a tenth for the allocator's fragmentation, else the machine's (`available_bytes`);
    `memory_limit` caps either."""
    import torch

    if not torch.cuda.is_available():
        return available_bytes(cfg)
    from accelerate import PartialState

    device = PartialState().device
    free = int(torch.cuda.mem_get_info(device)[0] * 0.9)
    limit = cfg.get("memory_limit")
    if limit is not None and parse_size(limit, "memory_limit") < free:
        return parse_size(limit, "memory_limit"), f"memory_limit={limit}"
    return free, f"free on {torch.cuda.get_device_name(device)} (less 10% for fragmentation)"


def merge_needs(shapes: dict, cfg, max_shard_bytes: int, resident_bytes: int) -> dict[str, int]:
    """The merge's phases: the 4-bit reference, the fold (one output shard filling), and the
    self-check of the merged model with at most `resident_bytes` of it in memory (the rest on disk)."""
    lora = lora_elements(shapes, cfg.train.lora.r) * 4
    largest = max((math.prod(s) for s in shapes.values()), default=0) * 4
    merged = weights_bytes(shapes, dtype_bytes(cfg.merge.dtype))
    return {
        "the 4-bit base + adapter for the reference logits": adapted_4bit_bytes(shapes, cfg),
        "an output shard, the tensor being folded and the adapter": max_shard_bytes + 2 * largest + lora,
        f"the merged model in {cfg.merge.dtype} for the self-check": min(merged, resident_bytes),
    }


def fits(cfg, need: int) -> bool:
    return need + PROCESS_BYTES <= available_bytes(cfg)[0]
