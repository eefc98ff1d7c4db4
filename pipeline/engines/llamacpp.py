"""One llama.cpp for everything, compiled once: converter, quantizer, bindings and server from one tree.

llama-cpp-python's sdist vendors the whole llama.cpp tree it compiles its bindings from
(`vendor/llama.cpp`: the server, the tools, `convert_hf_to_gguf.py`, `gguf-py`). `build` compiles
llama.cpp's own programs and its shared libraries from that same tree and installs them, with its
converter, under one prefix (bin/, lib/, convert/); `LlamaCpp` finds them again for the stages. The
bindings are installed without llama.cpp (`CMAKE_ARGS="$(... cmake-args)"`: -DLLAMA_BUILD=OFF) and
`build` links their `llama_cpp/lib` to the prefix's lib/: the bindings the project imports and the
programs users run (`llama-server`, `llama-cli`, `llama-quantize`, ...) load the same libllama.

    python -m pipeline.engines.llamacpp build            # into <venv>/llama.cpp (the pipeline's default)
    python -m pipeline.engines.llamacpp build --static --prefix /opt/llama.cpp --cmake-arg=-DGGML_NATIVE=OFF

Standard library only, so that a container build can run this file on its own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

try:  # in the pipeline, its own error family: reported as one line
    from pipeline.run.errors import MissingInput, ToolFailed
except ImportError:  # this file also runs alone (Dockerfile.serve builds llama-server with it)
    MissingInput, ToolFailed = FileNotFoundError, RuntimeError

# The pinned bindings (pyproject.toml pins the same version) and the sdist they are built from.
LLAMA_CPP_PYTHON = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# The llama.cpp commit that sdist vendors (its CHANGELOG: "update llama.cpp to ggml-org/llama.cpp@0c1e57098").
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"

TOOLS = ("llama-server", "llama-cli", "llama-quantize", "llama-imatrix", "llama-perplexity")
# No web UI download, no curl, no OpenSSL: nothing in the build reaches the network, and the server
# only ever listens where it is told.
CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
)
# Shared libraries (the default): bin/'s programs and the bindings load one libllama, libggml*, ... from
# lib/; the programs find it through their RPATH ($ORIGIN/../lib: literal, no shell ever sees it), so
# the prefix can move as a whole. Static (`--static`): each program stands alone in bin/ (a container
# that copies one program).
SHARED_ARGS = (
    "-DBUILD_SHARED_LIBS=ON",
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
    "-DCMAKE_INSTALL_RPATH=$ORIGIN/../lib",
)
STATIC_ARGS = ("-DBUILD_SHARED_LIBS=OFF",)
# The bindings' own build (pip's CMAKE_ARGS): the Python package only, no llama.cpp; `build` links
# their llama_cpp/lib to the prefix's lib/.
BINDINGS_CMAKE_ARGS = ("-DLLAMA_BUILD=OFF",)

# llama.cpp's AMX kernels are left out of every build (the bindings load the shared build's libllama):
# at this commit they die with SIGILL at `tileloadd` inside
# ggml_backend_amx_mul_mat on a Sapphire Rapids-class Xeon VM (Q4_K_M and Q8_0, in llama-server,
# llama-perplexity and the bindings alike), where a plain AMX program runs. GGML_NATIVE's
# -march=native would turn them on; an explicit -mno-amx-* wins over -march in GCC and Clang.
# The AVX-512 VNNI kernels serve those types instead.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def cpu_cmake_args() -> list[str]:
    """CMake arguments every llama.cpp build of the project gets, programs and bindings alike."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        return [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
    return []


def build_cmake_args(static: bool = False, extra=()) -> list[str]:
    return [*CMAKE_ARGS, *cpu_cmake_args(), *(STATIC_ARGS if static else SHARED_ARGS), *extra]


# What `convert_hf_to_gguf.py` needs beside it: it imports `conversion` from its own directory and
# puts `gguf-py` on its path.
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")


def default_prefix() -> Path:
    return Path(sys.prefix) / "llama.cpp"


def cache_entry(cmake_args: list[str]) -> Path:
    """Where a finished build is kept for the next environment on this machine, like pip's wheel
    cache: keyed by commit, CMake arguments, CPU architecture and compiler (GGML_NATIVE builds for
    this CPU, so the cache never leaves the machine)."""
    compiler = subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    key = json.dumps([LLAMA_CPP_COMMIT, SDIST_SHA256, cmake_args, platform.machine(), compiler])
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qlora-pipeline" / "llama.cpp"
    return root / f"{LLAMA_CPP_COMMIT[:9]}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _replace_dir(staged: Path, final: Path) -> None:
    """Move a complete directory to `final`; an existing one is removed only after the move.
    (`pipeline.run.io.atomic_dir` does the same for the stages; this file stays standard-library only.)"""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        staged.rename(final)
        shutil.rmtree(old)
    else:
        staged.rename(final)


def install_from_cache(prefix: Path, cmake_args: list[str]) -> dict | None:
    entry = cache_entry(cmake_args)
    if not (entry / "build.json").is_file():
        return None
    staged = prefix.with_name(f".{prefix.name}.tmp-{os.getpid()}")
    shutil.copytree(entry, staged, symlinks=True)
    _replace_dir(staged, prefix)
    return json.loads((prefix / "build.json").read_text())


# --- build ---------------------------------------------------------------------------------------


def download_sdist(dest: Path) -> Path:
    """llama-cpp-python's pinned sdist from the package index (`build` checks its sha256)."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--dest",
        str(dest),
        f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
    ]
    subprocess.run(command, check=True)
    (sdist,) = dest.glob("llama_cpp_python-*.tar.gz")
    return sdist


def vendored_commit(source: Path) -> str:
    """The commit of the sdist's `vendor/llama.cpp` submodule, from the git metadata it ships."""
    head = source.parent.parent / ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD"
    commit = head.read_text().strip() if head.is_file() else ""
    if commit != LLAMA_CPP_COMMIT:
        raise ToolFailed(
            f"{head}: vendored llama.cpp commit {commit or 'missing'}, expected {LLAMA_CPP_COMMIT}"
        )
    return commit


def _run_logged(command: list[str], log_path: Path) -> None:
    with log_path.open("a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise ToolFailed(f"{command[0]} failed ({result.returncode}); last lines of {log_path}:\n{tail}")


def build(
    prefix: Path, sdist: Path | None = None, jobs: int | None = None, extra_cmake_args=(), static=False
) -> dict:
    """Compile `TOOLS` (and, unless `static`, the shared libraries they load) from the pinned sdist's
    llama.cpp tree and install them with its converter.

    Everything is built in a temporary directory and moved under `prefix` only when complete; an
    existing install is replaced only then.
    """
    started = time.monotonic()
    prefix = Path(prefix).resolve()
    cmake_args = build_cmake_args(static, extra_cmake_args)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama.cpp-build-", dir=prefix.parent) as work:
        work = Path(work)
        sdist = Path(sdist) if sdist else download_sdist(work)
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise ToolFailed(
                f"{sdist}: sha256 {digest}, expected {SDIST_SHA256} (llama-cpp-python=={LLAMA_CPP_PYTHON})"
            )
        with tarfile.open(sdist) as tar:
            tar.extractall(work / "sdist", filter="data")
        (root,) = (work / "sdist").iterdir()
        source = root / "vendor" / "llama.cpp"
        commit = vendored_commit(source)
        log_path = work / "build.log"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        configure = ["cmake", "-S", str(source), "-B", str(work / "build"), *generator, *cmake_args]
        _run_logged(configure + [f"-DLLAMA_BUILD_COMMIT={commit[:9]}"], log_path)
        jobs = jobs or os.cpu_count() or 1
        _run_logged(["cmake", "--build", str(work / "build"), "-j", str(jobs), "--target", *TOOLS], log_path)

        staged = work / "install"
        (staged / "bin").mkdir(parents=True)
        (staged / "convert").mkdir()
        for tool in TOOLS:
            shutil.copy2(work / "build" / "bin" / tool, staged / "bin" / tool)
        libraries = []
        if not static:  # libllama.so -> libllama.so.0 -> libllama.so.0.0.N: the links as links
            (staged / "lib").mkdir()
            for path in sorted((work / "build" / "bin").glob("lib*.so*")):
                if path.is_symlink():
                    (staged / "lib" / path.name).symlink_to(os.readlink(path))
                else:
                    shutil.copy2(path, staged / "lib" / path.name)
                libraries.append(path.name)
        for name in CONVERTER_FILES:
            path = source / name
            if path.is_dir():
                shutil.copytree(path, staged / "convert" / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(path, staged / "convert" / name)
        record = {
            "llama_cpp_python": LLAMA_CPP_PYTHON,
            "sdist_sha256": digest,
            "commit": commit,
            "tools": list(TOOLS),
            "libraries": libraries,
            "cmake_args": cmake_args,
            "jobs": jobs,
            "build_seconds": round(time.monotonic() - started, 1),
        }
        (staged / "build.json").write_text(json.dumps(record, indent=2) + "\n")
        shutil.copy2(log_path, staged / "build.log")
        entry = cache_entry(cmake_args)
        entry.parent.mkdir(parents=True, exist_ok=True)
        cached = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
        shutil.copytree(staged, cached, symlinks=True)
        _replace_dir(cached, entry)
        _replace_dir(staged, prefix)
    return record


# --- the bindings ----------------------------------------------------------------------------------


def bindings_lib_dir() -> Path | None:
    """The installed llama_cpp package's `lib/`, found without importing it (which fails without it)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations or not spec.origin:
        return None  # not installed (or only a leftover directory: a namespace package)
    return Path(spec.origin).parent / "lib"


def link_bindings(prefix: Path) -> dict:
    """Point the installed bindings at the prefix's shared libraries: a relative link in `llama_cpp/lib`
    for each of `prefix/lib/lib*.so*`, when the bindings are the pinned version and carry no libllama of
    their own (links from an earlier `build` are replaced). What it did, as `build.json`'s "bindings"."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("llama-cpp-python")
    except PackageNotFoundError:
        installed = None
    target = bindings_lib_dir()
    record = {"llama_cpp_python": installed, "lib": str(target) if target else None, "linked": False}
    libraries = sorted((prefix / "lib").glob("lib*.so*")) if (prefix / "lib").is_dir() else []
    own = target / "libllama.so" if target else None
    if installed is None or target is None:
        record["why"] = "llama-cpp-python is not installed in this environment"
    elif installed != LLAMA_CPP_PYTHON:
        record["why"] = f"llama-cpp-python {installed} is installed, not the pinned {LLAMA_CPP_PYTHON}"
    elif own.exists() and not own.is_symlink():
        record["why"] = (
            f"the bindings carry their own llama.cpp ({own}): installed without "
            'CMAKE_ARGS="$(python pipeline/engines/llamacpp.py cmake-args)"; they keep it'
        )
    elif not libraries:
        dangling = sorted(p.name for p in target.glob("lib*.so*") if p.is_symlink() and not p.exists())
        record["why"] = f"{prefix} has no shared libraries (a --static build)" + (
            f"; the bindings' links are now dangling ({', '.join(dangling)}): build without --static"
            if dangling
            else ""
        )
    else:
        target.mkdir(exist_ok=True)
        for old in target.glob("lib*.so*"):
            if old.is_symlink():
                old.unlink()
        for library in libraries:
            (target / library.name).symlink_to(os.path.relpath(library, target))
        record.update(linked=True, to=str(prefix / "lib"), libraries=[p.name for p in libraries])
    return record


def _install_bindings_record(prefix: Path) -> dict:
    bindings = link_bindings(prefix)
    path = prefix / "build.json"
    record = json.loads(path.read_text())
    record["bindings"] = bindings
    path.write_text(json.dumps(record, indent=2) + "\n")
    return bindings


def _say_bindings(bindings: dict) -> None:
    if bindings["linked"]:
        print(f"bindings: {bindings['lib']} -> {bindings['to']} ({len(bindings['libraries'])} libraries)")
    else:
        print(f"bindings: not linked: {bindings['why']}")


# --- use --------------------------------------------------------------------------------------------


class LlamaCpp:
    """The llama.cpp programs and converter the stages run.

    `directory` is the install `build` writes (`bin/`, `convert/`), or a llama.cpp checkout of
    the user's own (`build/bin/`, `convert_hf_to_gguf.py` at its root); null means the default prefix.
    """

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory).expanduser() if directory else default_prefix()
        self.configured = directory is not None

    def _missing(self, what: str) -> FileNotFoundError:
        where = f"llamacpp.dir={self.directory}" if self.configured else f"{self.directory} (the default)"
        return MissingInput(
            f"{what} not found in {where}: build llama.cpp with `python -m pipeline.engines.llamacpp build`, "
            "or set llamacpp.dir= to a llama.cpp install (bin/, convert/) or checkout (build/bin/)"
        )

    def tool(self, name: str) -> Path:
        for candidate in (
            self.directory / "bin" / name,
            self.directory / "build" / "bin" / name,
            self.directory / name,
        ):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
        raise self._missing(name)

    def converter(self) -> Path:
        for candidate in (
            self.directory / "convert" / "convert_hf_to_gguf.py",
            self.directory / "convert_hf_to_gguf.py",
        ):
            if candidate.is_file():
                return candidate
        raise self._missing("convert_hf_to_gguf.py")

    def build_record(self) -> dict | None:
        path = self.directory / "build.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def version(self) -> dict:
        """llama.cpp's own account of itself (`llama-server --version`), beside the bindings'.

        `same_commit` says whether the programs are the commit the pinned bindings vendor.
        """
        result = subprocess.run(
            [str(self.tool("llama-server")), "--version"], capture_output=True, text=True, timeout=60
        )
        text = result.stdout + result.stderr
        # "version: 0.5.0-dev (build 1, commit 0c1e570)"
        match = re.search(r"version: (\S+) \(build (\d+), commit ([0-9a-f]+|unknown)\)", text)
        if result.returncode != 0 or not match:
            raise ToolFailed(
                f"{self.tool('llama-server')} --version gave no version ({result.returncode}): {text[-300:]}"
            )
        commit = match.group(3)
        from importlib.metadata import PackageNotFoundError, version

        try:
            bindings = version("llama-cpp-python")
        except PackageNotFoundError:  # the bindings are not installed: nothing to compare
            bindings = None
        return {
            "commit": commit,
            "version": match.group(1),
            "llama_cpp_python": bindings,
            "bindings_commit": LLAMA_CPP_COMMIT if bindings == LLAMA_CPP_PYTHON else None,
            "same_commit": bindings == LLAMA_CPP_PYTHON and LLAMA_CPP_COMMIT.startswith(commit),
            "directory": str(self.directory),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.engines.llamacpp", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build_parser = sub.add_parser(
        "build", help=f"compile {', '.join(TOOLS)} and install them with the converter"
    )
    build_parser.add_argument(
        "--prefix", type=Path, default=default_prefix(), help="install here (default: %(default)s)"
    )
    build_parser.add_argument(
        "--sdist", type=Path, help=f"a local llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    )
    build_parser.add_argument("--jobs", type=int, help="parallel compile jobs (default: all cores)")
    build_parser.add_argument(
        "--cmake-arg", action="append", default=[], help="an extra CMake argument (repeatable)"
    )
    build_parser.add_argument(
        "--force", action="store_true", help="compile even if this build is installed or cached"
    )
    build_parser.add_argument(
        "--static",
        action="store_true",
        help="static programs only, each standing alone in bin/ (no lib/: the bindings are not linked)",
    )
    sub.add_parser("version", help="the installed programs' llama.cpp commit, beside the bindings'")
    sub.add_parser(
        "cmake-args",
        help="the CMake arguments for the bindings' build (no llama.cpp: `build` links them to its own): "
        'CMAKE_ARGS="$(...)" pip install --no-cache-dir',
    )
    args = parser.parse_args(argv)
    if args.command == "cmake-args":
        import shlex

        print(shlex.join(BINDINGS_CMAKE_ARGS))
        return 0
    if args.command == "version":
        print(json.dumps(LlamaCpp().version(), indent=2))
        return 0
    prefix = args.prefix.resolve()
    cmake_args = build_cmake_args(args.static, args.cmake_arg)
    existing = LlamaCpp(prefix).build_record()
    if (
        not args.force
        and existing
        and existing["commit"] == LLAMA_CPP_COMMIT
        and existing["cmake_args"] == cmake_args
    ):
        print(
            f"{prefix}: llama.cpp {LLAMA_CPP_COMMIT[:9]} already built ({', '.join(existing['tools'])}); "
            "--force rebuilds"
        )
        _say_bindings(_install_bindings_record(prefix))
        return 0
    if not args.force and install_from_cache(prefix, cmake_args):
        print(
            f"{prefix}: llama.cpp {LLAMA_CPP_COMMIT[:9]} installed from {cache_entry(cmake_args)}; "
            "--force rebuilds"
        )
        _say_bindings(_install_bindings_record(prefix))
        return 0
    print(
        f"building llama.cpp {LLAMA_CPP_COMMIT[:9]} ({', '.join(TOOLS)}"
        f"{', static' if args.static else ' and its shared libraries'}) into {args.prefix} ...",
        flush=True,
    )
    try:
        record = build(prefix, args.sdist, args.jobs, args.cmake_arg, args.static)
        print(f"built in {record['build_seconds']:.0f} s: {prefix / 'bin'}", flush=True)
        _say_bindings(_install_bindings_record(prefix))
    except (RuntimeError, subprocess.CalledProcessError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
