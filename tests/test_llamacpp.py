"""One llama.cpp (pipeline/engines/llamacpp.py): the programs built from the pinned llama-cpp-python sdist are
the commit the bindings vendor, built without network features, and recorded where a user looks."""

from __future__ import annotations

import json
import subprocess

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


def test_the_bindings_are_built_without_amx_kernels():
    """llama.cpp's AMX kernels die with SIGILL at this commit (pipeline/engines/llamacpp.py, NO_AMX): the
    bindings must be built with `CMAKE_ARGS="$(python pipeline/engines/llamacpp.py cmake-args)"` as the
    README's install does; a wheel from an install without it (pip caches wheels) shows here."""
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
    # Static llama.cpp libraries: each program stands alone in bin/.
    assert "libllama" not in linked and "libggml" not in linked, linked
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
