"""One llama.cpp (pipeline/engines/llamacpp.py): the programs built from the pinned llama-cpp-python sdist are
the commit the bindings vendor, built without network features, and recorded where a user looks; the
bindings load the same shared libraries as the programs."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from pipeline.engines.llamacpp import (
    CMAKE_ARGS,
    LLAMA_CPP_COMMIT,
    LLAMA_CPP_PYTHON,
    SDIST_SHA256,
    TOOLS,
    LlamaCpp,
    cpu_cmake_args,
)


def test_programs_are_the_commit_the_bindings_vendor(llamacpp):
    version = llamacpp.version()
    assert version["llama_cpp_python"] == LLAMA_CPP_PYTHON
    assert LLAMA_CPP_COMMIT.startswith(version["commit"]) and len(version["commit"]) >= 7
    assert version["same_commit"] is True
    record = llamacpp.build_record()
    assert record is not None, f"{llamacpp.directory}/build.json missing"
    assert record["commit"] == LLAMA_CPP_COMMIT
    assert record["sdist_sha256"] == SDIST_SHA256
    assert record["tools"] == list(TOOLS)
    assert record["cmake_args"][: len(CMAKE_ARGS)] == list(CMAKE_ARGS)
    assert record["cmake_args"][len(CMAKE_ARGS) :][: len(cpu_cmake_args())] == cpu_cmake_args()


def test_the_bindings_load_the_programs_libraries(llamacpp):
    """The bindings are installed without llama.cpp (`CMAKE_ARGS="$(python pipeline/engines/llamacpp.py
    cmake-args)"`: -DLLAMA_BUILD=OFF) and `build` links their llama_cpp/lib to the prefix's lib/: the
    libllama they load is the one the programs load, compiled once."""
    record = llamacpp.build_record()
    if "-DBUILD_SHARED_LIBS=OFF" in record["cmake_args"]:
        pytest.skip(f"{llamacpp.directory}: a --static build (no lib/)")
    assert record["bindings"]["linked"] is True, record["bindings"]
    import llama_cpp.llama_cpp

    loaded = Path(os.path.realpath(llama_cpp.llama_cpp._lib._name))
    assert loaded.parent == (llamacpp.directory / "lib").resolve(), loaded


def test_the_bindings_are_built_without_amx_kernels():
    """llama.cpp's AMX kernels die with SIGILL at this commit (pipeline/engines/llamacpp.py, NO_AMX): the
    bindings must load the libllama `build` compiled without them; bindings pip built with their own
    llama.cpp (an install without the README's CMAKE_ARGS, or a wheel pip cached) show here."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    assert "CPU" in info, info
    if cpu_cmake_args():
        assert "AMX_INT8 = 1" not in info, f"bindings built with AMX kernels: {info}"


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_runs_and_links_no_network_library(tool, llamacpp):
    path = llamacpp.tool(tool)
    linked = subprocess.run(["ldd", str(path)], capture_output=True, text=True).stdout
    for library in ("libcurl", "libssl", "libcrypto"):
        assert library not in linked, f"{tool} links {library}:\n{linked}"
    # Shared: llama.cpp's libraries come from the prefix's lib/ (RPATH $ORIGIN/../lib), never from
    # elsewhere on the machine. Static (--static): each program stands alone in bin/.
    # "libllama.so.0 => /venv/llama.cpp/bin/../lib/libllama.so.0 (0x...)"
    ours = re.findall(r"^\s*(?:libllama|libggml|libmtmd)\S* => (\S+)", linked, re.MULTILINE)
    if "-DBUILD_SHARED_LIBS=OFF" in llamacpp.build_record()["cmake_args"]:
        assert not ours, linked
    else:
        lib = (llamacpp.directory / "lib").resolve()
        assert ours and all(Path(os.path.realpath(path)).parent == lib for path in ours), linked
    # It runs (llama-quantize answers --help with its usage and exit status 1).
    result = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=60)
    assert "usage" in (result.stdout + result.stderr).lower(), (result.returncode, result.stderr[-500:])


def test_a_missing_build_is_one_line_naming_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        LlamaCpp(tmp_path).tool("llama-server")
    message = str(err.value)
    assert "\n" not in message
    assert f"llamacpp.dir={tmp_path}" in message and "python -m pipeline.engines.llamacpp build" in message
    with pytest.raises(FileNotFoundError, match="convert_hf_to_gguf.py not found"):
        LlamaCpp(tmp_path).converter()


def test_a_checkout_layout_is_found(tmp_path, llamacpp):
    """`llamacpp.dir=` a llama.cpp checkout: tools in build/bin/, the converter at its root."""
    (tmp_path / "build" / "bin").mkdir(parents=True)
    (tmp_path / "build" / "bin" / "llama-server").symlink_to(llamacpp.tool("llama-server"))
    (tmp_path / "convert_hf_to_gguf.py").symlink_to(llamacpp.converter())
    checkout = LlamaCpp(tmp_path)
    assert checkout.tool("llama-server") == tmp_path / "build" / "bin" / "llama-server"
    assert checkout.converter() == tmp_path / "convert_hf_to_gguf.py"
    assert checkout.version()["commit"] == llamacpp.version()["commit"]


@pytest.mark.slow
def test_the_run_records_its_llama_cpp(tiny_run):
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    recorded = manifest["versions"]["llama.cpp"]
    assert recorded["same_commit"] is True and LLAMA_CPP_COMMIT.startswith(recorded["commit"])
    assert manifest["stages"]["convert"]["metrics"]["llama_cpp"]["commit"] == recorded["commit"]
    card = (tiny_run / "merged" / "README.md").read_text()
    assert LLAMA_CPP_COMMIT in card and f"llama-cpp-python {LLAMA_CPP_PYTHON}" in card
