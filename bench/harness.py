"""What every bench shares: the repo, its config, children run and timed, the machine described,
and tables of figures against a baseline measured in the same run.

- `ROOT`, `ENV` and `compose`: the repo (put on this process's path on import), the offline
  environment children run in, and the pipeline's config composed as its CLI composes it.
- `run_child`: one child process (`pipeline_command`, `script_command`) run from the repo root, its
  output captured or shown, timed, how many cores other processes kept busy meanwhile, optionally
  sampled while it runs (`tree_memory`); it dies with the bench, however the bench dies. A worker
  prints its figures as its last line of JSON (`Child.json`).
- `settle`, `peak_rss_mb`: waiting for a quiet machine; this process's own peak RSS.
- `machine`, `describe_cpu`, `versions`, `versions_line`, `nvidia_smi`: the report's header.
- `table`, `ratio`, `best`, `save_results`: the report itself.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the benches import the pipeline's own code
    sys.path.insert(0, str(ROOT))
# Every child is offline: the benches build or read their models locally.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
LIBRARIES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets")


def compose(*overrides: str):
    """The pipeline's resolved config for these overrides, composed exactly as the CLI composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pipeline.config import register

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


# ------------------------------------------------------------------ children


def pipeline_command(*overrides: str) -> list[str]:
    """`python -m pipeline OVERRIDES...` in this Python."""
    return [sys.executable, "-m", "pipeline", *overrides]


def script_command(script: str | Path, *args: str) -> list[str]:
    """A bench script (usually the caller's own `__file__`, as a worker) in this Python."""
    return [sys.executable, str(Path(script).resolve()), *args]


@dataclass
class Child:
    """A finished child process: its exit code, captured output ("" where shown instead), wall
    seconds, the cores other processes kept busy meanwhile (0: the machine was the bench's), and
    the samples taken while it ran: (epoch seconds, *what the sampler returned)."""

    command: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    other_cores: float
    samples: list[tuple] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def json(self) -> dict:
        """The figures a worker printed as its last line of output."""
        return json.loads(self.stdout.strip().splitlines()[-1])

    def error(self) -> str:
        """Why it failed, in one line: its last line on stderr (200 characters at most), else its exit."""
        lines = [line for line in self.stderr.strip().splitlines() if line.strip()]
        return lines[-1][:200] if lines else f"exit {self.returncode}"


def run_child(
    command: list[str],
    *,
    what: str | None = None,
    check: bool = True,
    capture_stdout: bool = True,
    capture_stderr: bool = True,
    enter: Callable[[], None] | None = None,
    sample: Callable[[int], tuple] | None = None,
    every: float = 0.5,
) -> Child:
    """Run `command` from the repo root in `ENV` and wait for it. Its stdout and stderr are captured,
    or (`capture_*=False`) go straight to this process's, so a long run shows where it is. The child
    gets SIGTERM when the bench dies (even by SIGKILL) or is interrupted while waiting for it (and
    SIGKILL if it has not ended 10 s later). `enter` runs in the child before the command (joining
    a cgroup, say); `sample(pid)` runs every `every` s while it runs. With `check`, a failure ends
    the bench, naming `what` (default: the command) and showing the end of its stderr."""
    from pipeline.machine.processes import die_with_parent

    def before_exec() -> None:
        die_with_parent()
        if enter is not None:
            enter()

    pipe = {True: subprocess.PIPE, False: None}
    samples: list[tuple] = []
    busy, own, started = busy_cpu_seconds(), children_cpu_seconds(), time.perf_counter()
    with subprocess.Popen(
        command,
        cwd=ROOT,
        env=ENV,
        text=True,
        stdout=pipe[capture_stdout],
        stderr=pipe[capture_stderr],
        preexec_fn=before_exec,
    ) as process:
        stop = threading.Event()
        sampler = None
        if sample is not None:
            sampler = threading.Thread(target=_sample, args=(sample, process.pid, every, samples, stop))
            sampler.start()
        try:
            stdout, stderr = process.communicate()
        except BaseException:  # the bench interrupted: the child unwinds (the pipeline does on SIGTERM)
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
        finally:
            stop.set()
            if sampler is not None:
                sampler.join()
    seconds = time.perf_counter() - started
    others = (busy_cpu_seconds() - busy - (children_cpu_seconds() - own)) / seconds
    child = Child(command, process.returncode, stdout or "", stderr or "", seconds, max(others, 0.0), samples)
    if check and not child.ok:
        log = f":\n{child.stderr[-4000:]}" if capture_stderr else ": its log is above"
        raise SystemExit(f"{what or shlex.join(command)} failed ({child.returncode}){log}")
    return child


def _sample(sample, pid: int, every: float, samples: list, stop: threading.Event) -> None:
    while not stop.wait(every):
        samples.append((time.time(), *sample(pid)))


def tree_memory(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) summed over a process and its descendants, in bytes: the anonymous memory
    that must fit, and the mapped file pages (checkpoints, GGUFs) the kernel may drop and reread."""
    import psutil

    anon = mapped = 0
    try:
        processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return 0, 0
    for process in processes:
        try:
            for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    anon += int(line.split()[1]) * 1024
                elif line.startswith("RssFile:"):
                    mapped += int(line.split()[1]) * 1024
        except OSError:
            continue
    return anon, mapped


def busy_cpu_seconds() -> float:
    """CPU-seconds the whole machine has spent not idle."""
    import psutil

    t = psutil.cpu_times()
    return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))


def children_cpu_seconds() -> float:
    """CPU-seconds of this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def settle(max_wait: float, busy_percent: float = 20.0) -> float:
    """Wait (at most `max_wait` s) until other processes use < `busy_percent` of the CPUs; returns it."""
    import psutil

    deadline = time.monotonic() + max_wait
    while True:
        used = psutil.cpu_percent(interval=2.0)
        if used < busy_percent or time.monotonic() > deadline:
            return used
        time.sleep(3)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MB (a worker's own, measured in it)."""
    from pipeline.machine.memory import high_water_mark

    return high_water_mark() / 2**20


# ------------------------------------------------------------------ the machine


def machine() -> dict:
    """The CPU model, its core count, its AVX-512 / bf16 / AMX flags, and Python's version."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""

    def first(key: str) -> str:
        return next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith(key)), "")

    flags = set(first("flags").split())
    return {
        "cpu": first("model name") or "?",
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        **{flag: flag in flags for flag in CPU_FLAGS},
    }


def describe_cpu(figures: dict, flags: bool = False) -> str:
    """'MODEL, N cores', and with `flags` each of CPU_FLAGS: 'avx2 yes, avx512f no, ...'."""
    line = f"{figures['cpu']}, {figures['cores']} cores"
    if flags:
        line += "; " + ", ".join(f"{flag} {'yes' if figures[flag] else 'no'}" for flag in CPU_FLAGS)
    return line


def versions(names: Iterable[str] = LIBRARIES) -> dict[str, str | None]:
    """The installed version of each package, None where it is missing (the manifest's lookup)."""
    from pipeline.run.manifest import package_versions

    return package_versions(names)


def versions_line(found: dict) -> str:
    return "versions: " + ", ".join(f"{name} {v}" for name, v in found.items())


def nvidia_smi() -> str | None:
    """The GPUs' names and memory as `nvidia-smi` gives them (CSV); None without one."""
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ------------------------------------------------------------------ the report


@dataclass(frozen=True)
class Column:
    """A table's column: its header, its width, right- ('>') or left-aligned ('<'), and how many
    spaces stand before it."""

    header: str
    width: int
    align: str = ">"
    gap: int = 1


def table(columns: Sequence[Column], rows: Iterable[Sequence[str] | str], rule: bool = False) -> str:
    """The header, a rule of dashes under it (with `rule`), then a line per row of cells (formatted
    strings, one a column); a row that is one string (a run that failed or did not run) stands as
    it is."""

    def line(cells: Sequence[str]) -> str:
        return "".join(
            (" " * column.gap if i else "") + f"{cell:{column.align}{column.width}}"
            for i, (column, cell) in enumerate(zip(columns, cells))
        )

    header = line([column.header for column in columns])
    lines = [header, *(["-" * len(header)] if rule else [])]
    lines += [row if isinstance(row, str) else line(row) for row in rows]
    return "\n".join(lines)


def ratio(value: float | None, baseline: float | None, digits: int = 2, suffix: str = "x") -> str:
    """`value` / `baseline` as '1.23x', or '-' where either is missing (or the baseline is 0)."""
    if value is None or not baseline:
        return "-"
    return f"{value / baseline:.{digits}f}{suffix}"


def best(rounds: Iterable, key: str | None = None, higher: bool = False):
    """The best of a run's rounds: the least (a time) or, with `higher`, the most (a throughput) of
    each round's figure (the round itself, or its `key`); rounds that failed (a dict with "error")
    do not count. None when none succeeded."""
    ok = [r for r in rounds if not (isinstance(r, dict) and "error" in r)]
    if not ok:
        return None
    figure = (lambda r: r[key]) if key else (lambda r: r)
    return (max if higher else min)(ok, key=figure)


def save_results(path: Path | None, results: dict) -> None:
    """Write the results as JSON to `path` (atomically; nothing without a path)."""
    if path is not None:
        from pipeline.run.io import write_json

        write_json(path, results)
