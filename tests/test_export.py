"""Export: the merged model directory (shards + index, config, generation config, tokenizer with the
chat template, model card) and that it answers; the GGUF files and their metadata; the manifest's
truthfulness; ladder floors and merge fidelity; stage caching; bad input; a read-only run dir; and
that a merge or conversion killed mid-write leaves nothing under an artifact's final name.

Everything reads the session's `tiny_run` (one `stage=all experiment=tiny` run) without touching
it: a test that reruns or breaks a stage works on a copy in its own tmp_path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
from conftest import ROOT, WITHOUT_VLLM, copy_run, run_pipeline

from pipeline.chat.format import LLAMA2_CHAT_TEMPLATE, encode_dialog

pytestmark = pytest.mark.slow  # every test here needs the tiny run, or runs stages itself

NAME = "tiny-synthetic"  # export.name=null: <model.name>-<data.name>
GGUF_TYPES = ("F16", "Q8_0", "Q4_K_M")  # export.outtype=f16, export.quants=[Q8_0, Q4_K_M]
STAGE_OF_DIR = {"data": "data", "adapter": "train", "merged": "merge"}
STAGE_OF_GGUF = {"F16": "convert", "Q8_0": "quantize", "Q4_K_M": "quantize"}


def stage_of_gguf_file(name: str) -> str:
    """gguf/ holds each type's GGUF and Modelfile, the importance matrix and the ladder's card."""
    if name == "README.md":
        return "ladder"
    if name.endswith(".imatrix.gguf"):
        return "quantize"
    return STAGE_OF_GGUF[name.rsplit(".", 1)[0].rsplit("-", 1)[-1]]


PIPELINE_STAGES = ("data", "train", "merge", "convert", "quantize", "ladder")
KILL_POLL_SECONDS = 120


# ---------------------------------------------------------------- helpers


def _select(config: dict, dotted_key: str):
    """config["export"]["outtype"] for "export.outtype", as the stage registry names its keys."""
    for part in dotted_key.split("."):
        config = config[part]
    return config


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def gguf(run_dir: Path, type_name: str) -> Path:
    return run_dir / "gguf" / f"{NAME}-{type_name}.gguf"


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def tree(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (hidden ones too), by relative path."""
    if not path.exists():
        return {}
    return {p.relative_to(path).as_posix(): sha256(p) for p in sorted(path.rglob("*")) if p.is_file()}


def artifacts_state(run_dir: Path) -> dict[str, str]:
    """Every file a stage made or reads (not hydra's own .hydra/ and log), plus the manifest."""
    state = {"manifest.json": sha256(run_dir / "manifest.json")}
    for name in ("data", "base", "adapter", "merged", "metrics", "gguf"):
        state.update({f"{name}/{rel}": digest for rel, digest in tree(run_dir / name).items()})
    return state


def said(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def skipped(result: subprocess.CompletedProcess, stage: str) -> bool:
    return re.search(rf"stage {stage}: [^\n]*skipped", said(result)) is not None


def ran(result: subprocess.CompletedProcess, stage: str) -> bool:
    return f"stage {stage}: running" in said(result)


def temporaries(directory: Path) -> list[Path]:
    """Hidden temporaries of io.atomic_dir / io.atomic_file (`.<name>.tmp-<pid>`, `.<name>.old-<pid>`),
    and merge.compare_bases' scratch model `.merge-compare`."""
    hidden = directory.glob(".*")
    return sorted(p for p in hidden if re.search(r"\.(tmp|old)-\d+$", p.name) or p.name == ".merge-compare")


def popen_pipeline(log: Path, *overrides: str) -> subprocess.Popen:
    """`python -m pipeline` in its own process group, so a kill reaches the converter it spawns too.
    Output goes to `log` (a pipe nobody reads could fill up and stall the stage)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", *overrides],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        )


def kill_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)


def kill_when(process: subprocess.Popen, log: Path, found, what: str) -> Path:
    """Poll (bounded) until `found()` returns a path, then SIGKILL the process group; returns the path."""
    deadline = time.monotonic() + KILL_POLL_SECONDS
    try:
        while time.monotonic() < deadline:
            hit = found()
            if hit is not None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
                return hit
            if process.poll() is not None:
                pytest.fail(
                    f"the stage exited ({process.returncode}) before {what} appeared:\n"
                    f"{log.read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.005)
        pytest.fail(f"no {what} within {KILL_POLL_SECONDS} s")
    finally:
        kill_group(process)


# ---------------------------------------------------------------- merged/ directory


def test_merged_dir_has_config_generation_config_and_chat_template(tiny_run):
    merged = tiny_run / "merged"
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    generation = json.loads((merged / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["bos_token_id"] == 1, generation
    tokenizer_config = json.loads((merged / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == LLAMA2_CHAT_TEMPLATE
    for name in ("tokenizer.json", "tokenizer.model"):  # the tokenizer exactly as trained
        assert sha256(merged / name) == sha256(tiny_run / "adapter" / name)


def test_merged_shards_and_index_cover_every_tensor(tiny_run):
    from safetensors import safe_open

    merged = tiny_run / "merged"
    shards = sorted(merged.glob("*.safetensors"))
    assert len(shards) >= 2, "merge.max_shard_size=4MB must shard the tiny model"
    n = len(shards)
    assert [p.name for p in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    in_files = {}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                assert name not in in_files, f"{name} is in two shards"
                in_files[name] = shard.name
    assert index["weight_map"] == in_files  # every tensor, and each in the shard the index names
    with safe_open(next((tiny_run / "base").glob("*.safetensors")), "pt") as f:
        base_names = set(f.keys())
    assert set(in_files) == base_names  # the merged model has exactly the base model's tensors
    for shard in shards:  # merge.max_shard_size=4MB (a single tensor over the limit may stand alone)
        alone = list(in_files.values()).count(shard.name) == 1
        assert shard.stat().st_size <= 4e6 + 4096 or alone, shard.name


def test_merged_model_card(tiny_run):
    card = (tiny_run / "merged" / "README.md").read_text(encoding="utf-8")
    metrics = json.loads((tiny_run / "metrics" / "merge.json").read_text())
    assert re.search(r"^base_model: tiny local Llama", card, re.M), card[:300]  # model=tiny: no hub id
    assert "merge.base=nf4_roundtrip" in card
    for name, figures in metrics["fidelity"].items():  # the figures measured, not made up
        if "kl_per_token" in figures:
            cells = [figures[k] for k in ("kl_per_token", "max_abs_logit_diff", "top1_agreement")]
            row = f"| {name} | " + " | ".join(f"{v:.4g}" for v in cells) + " |"
            assert row in card, (row, card)
    assert {"merged_nf4_roundtrip", "merged_original"} <= set(metrics["fidelity"])
    assert f"max abs dlogit {metrics['self_check']['max_abs_logit_diff']:.3g}" in card
    assert "TGI" in card and "text-generation-inference" in card
    assert "llama.cpp" in card


def test_merged_model_answers_eval_questions(tiny_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [json.loads(line) for line in (tiny_run / "data" / "eval.jsonl").read_text().splitlines()]
    checked = [row for row in rows if row.get("expected")][:3]
    assert len(checked) == 3
    tokenizer = AutoTokenizer.from_pretrained(tiny_run / "merged")
    model = AutoModelForCausalLM.from_pretrained(tiny_run / "merged", dtype=torch.float32).eval()
    for row in checked:
        prompt = encode_dialog(row["messages"][:-1], tokenizer)
        assert prompt[0] == 1 and prompt[-1] != 2
        ids = torch.tensor([prompt])
        with torch.no_grad():  # eos/pad come from the merged dir's generation_config.json
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False
            )[0, len(prompt) :].tolist()
        reply = tokenizer.decode(out, skip_special_tokens=True)
        assert row["expected"] in reply, (row["messages"][-2]["content"], row["expected"], reply)
        assert out[-1] == 2, f"the answer did not stop on EOS: {reply!r}"


# ---------------------------------------------------------------- GGUF files


@pytest.mark.parametrize("type_name", GGUF_TYPES)
def test_gguf_carries_template_and_meta_ids(tiny_run, type_name):
    import llama_cpp

    from pipeline.engines.gguf import read_gguf_metadata

    path = gguf(tiny_run, type_name)
    assert path.is_file(), sorted(p.name for p in (tiny_run / "gguf").iterdir())
    meta = read_gguf_metadata(path)
    assert meta["tokenizer.chat_template"] == LLAMA2_CHAT_TEMPLATE
    assert meta["tokenizer.ggml.bos_token_id"] == "1"
    assert meta["tokenizer.ggml.eos_token_id"] == "2"
    assert meta["tokenizer.ggml.add_bos_token"] == "true"
    # The type in the name is the type inside.
    assert int(meta["general.file_type"]) == getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}")


def test_check_gguf_rejects_a_gguf_without_chat_template(tiny_run, tmp_path):
    from pipeline.engines.gguf import GGUFCheckError, check_gguf, convert_to_gguf, read_gguf_metadata

    assert check_gguf(gguf(tiny_run, "F16"), 1, 2)["tokenizer.ggml.add_bos_token"] == "true"  # control
    hf_dir = tmp_path / "merged-no-template"
    shutil.copytree(tiny_run / "merged", hf_dir)
    config_path = hf_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["chat_template"]
    config_path.write_text(json.dumps(config, indent=2))
    out = tmp_path / "no-template.gguf"
    convert_to_gguf(hf_dir, out)
    assert "tokenizer.chat_template" not in read_gguf_metadata(out)
    with pytest.raises(GGUFCheckError, match="tokenizer.chat_template"):
        check_gguf(out, 1, 2)


# ---------------------------------------------------------------- manifest


def test_manifest_lists_every_artifact_truthfully(tiny_run):
    m = manifest(tiny_run)
    files = [p for d in ("data", "adapter", "merged", "gguf") for p in sorted((tiny_run / d).rglob("*"))]
    files = [p for p in files if p.is_file()]
    assert len(files) >= 2 + 3 + 10 + 3
    for path in files:
        rel = path.relative_to(tiny_run).as_posix()
        assert rel in m["artifacts"], f"{rel} is not in the manifest"
        top = rel.split("/", 1)[0]
        stage = stage_of_gguf_file(path.name) if top == "gguf" else STAGE_OF_DIR[top]
        expected = {"sha256": sha256(path), "size": path.stat().st_size, "stage": stage}
        assert m["artifacts"][rel] == expected, rel
    for rel, artifact in m["artifacts"].items():  # and nothing listed that is not there
        assert (tiny_run / rel).is_file(), rel
        assert artifact["sha256"] == sha256(tiny_run / rel), rel


def test_manifest_stage_records(tiny_run):
    from pipeline.run.manifest import config_hash
    from pipeline.stages import STAGES

    m = manifest(tiny_run)
    for name in PIPELINE_STAGES:
        record = m["stages"][name]
        # The hash of the config groups that shape the stage, as recorded in the resolved config.
        expected = config_hash({key: _select(m["config"], key) for key in STAGES[name].config_keys})
        assert record["config_hash"] == expected, name
        for rel, digest in record["inputs"].items():  # inputs by path, with their true hashes
            assert digest == sha256(tiny_run / rel), (name, rel)
        assert record["outputs"], name
        for rel in record["outputs"]:
            assert m["artifacts"][rel]["stage"] == name, (name, rel)
    inputs = {name: set(m["stages"][name]["inputs"]) for name in PIPELINE_STAGES}
    assert inputs["train"] == {"data/train.jsonl", "data/eval.jsonl"}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= inputs["merge"]
    assert "data/eval.jsonl" in inputs["merge"]
    merged = {f"merged/{p.name}" for p in (tiny_run / "merged").iterdir()}
    assert {"metrics/train.json"} | {f"base/{p.name}" for p in (tiny_run / "base").iterdir()} <= inputs[
        "merge"
    ]
    assert inputs["convert"] == merged
    # train rows: the importance matrix; never the eval rows, which the ladder measures on
    assert inputs["quantize"] == {f"gguf/{NAME}-F16.gguf", "data/train.jsonl"} | merged
    assert set(m["stages"]["quantize"]["outputs"]) == {
        f"gguf/{NAME}-Q8_0.gguf",
        f"gguf/{NAME}-Q4_K_M.gguf",
        f"gguf/{NAME}-Q8_0.Modelfile",
        f"gguf/{NAME}-Q4_K_M.Modelfile",
        f"gguf/{NAME}.imatrix.gguf",
    }
    assert "data/eval.jsonl" in inputs["ladder"] and "data/train.jsonl" not in inputs["ladder"]
    for library in ("torch", "transformers", "trl", "peft", "llama-cpp-python"):
        assert m["versions"][library] == metadata.version(library), library


def test_ladder_floors_and_merge_fidelity(tiny_run):
    m = manifest(tiny_run)
    ladder = m["stages"]["ladder"]["metrics"]
    assert ladder == json.loads((tiny_run / "metrics" / "ladder.json").read_text())
    rungs = ladder["rungs"]
    assert list(rungs) == ["4-bit base + adapter", "merged", "GGUF F16", "GGUF Q8_0", "GGUF Q4_K_M"]
    f16, q8, q4 = rungs["GGUF F16"], rungs["GGUF Q8_0"], rungs["GGUF Q4_K_M"]
    assert (
        f16["kl_mean"] == 0 and f16["delta_perplexity"] == 0 and f16["top1_agreement"] == 1
    )  # the reference
    assert q8["top1_agreement"] >= 0.95, q8
    assert 0 < q8["kl_mean"] < q4["kl_mean"] and q8["kl_p99"] < q4["kl_p99"]  # fewer bits, further from F16
    assert (
        len({r["tokens"] for r in rungs.values()}) == 1 and f16["tokens"] > 0
    )  # the same tokens for every rung
    assert q4["size_bytes"] < q8["size_bytes"] < f16["size_bytes"] == gguf(tiny_run, "F16").stat().st_size
    assert q4["imatrix"] is True and q8["imatrix"] is False  # conf/experiment/tiny.yaml: imatrix for Q4_K_M
    compared = ladder["imatrix"]["comparison"]["Q4_K_M"]
    assert compared["shipped"] == "with" and compared["kl_mean_with"] == q4["kl_mean"]
    assert compared["kl_mean_without"] > 0 and compared["kl_mean_without"] != compared["kl_mean_with"]
    card = (tiny_run / "gguf" / "README.md").read_text()
    assert "| GGUF Q4_K_M |" in card and "not Llama-2-7B" in card and "| Q8_0 | 0.0040 | 0.00037 |" in card
    merge = m["stages"]["merge"]["metrics"]
    assert merge == json.loads((tiny_run / "metrics" / "merge.json").read_text())
    assert merge["mode"] == "nf4_roundtrip"
    for name in ("merged_nf4_roundtrip", "merged_original"):  # merge.compare_bases=true: both bases measured
        figures = merge["fidelity"][name]
        assert figures["tokens"] > 0 and 0 <= figures["top1_agreement"] <= 1, figures
        assert figures["kl_per_token"] >= 0 and figures["max_abs_logit_diff"] >= 0, figures
    check = merge["self_check"]
    assert check["max_abs_logit_diff_allowed"] == 0.1  # conf/experiment/tiny.yaml
    assert check["max_abs_logit_diff"] <= check["max_abs_logit_diff_allowed"], check


# ---------------------------------------------------------------- caching


def test_rerun_skips_every_stage_and_changes_nothing(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path)
    before, old = artifacts_state(run_dir), manifest(run_dir)
    result = run_pipeline("stage=all", "experiment=tiny", f"run_dir={run_dir}", WITHOUT_VLLM)
    for stage in PIPELINE_STAGES:
        assert skipped(result, stage) and not ran(result, stage), (stage, said(result)[-3000:])
    after, new = artifacts_state(run_dir), manifest(run_dir)
    if "smoke" in old["stages"] or "smoke" in new["stages"]:  # smoke always reruns: its record may change
        before.pop("manifest.json"), after.pop("manifest.json")
    assert after == before

    def of_the_stages(m):
        return (
            {s: m["stages"][s] for s in PIPELINE_STAGES},
            {rel: a for rel, a in m["artifacts"].items() if a["stage"] in PIPELINE_STAGES},
        )

    assert of_the_stages(new) == of_the_stages(old)


def test_force_reruns_convert(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path)
    f16 = gguf(run_dir, "F16")
    inode, old = f16.stat().st_ino, manifest(run_dir)
    result = run_pipeline("stage=convert", "experiment=tiny", f"run_dir={run_dir}", "force=true")
    assert ran(result, "convert") and not skipped(result, "convert"), said(result)[-3000:]
    assert f16.stat().st_ino != inode  # a new file, renamed into place
    new = manifest(run_dir)
    assert new["stages"]["convert"]["finished_at"] >= old["stages"]["convert"]["finished_at"]
    for stage in ("data", "train", "merge", "quantize"):  # force reruns the named stage only
        assert new["stages"][stage] == old["stages"][stage], stage
    assert new["artifacts"][f"gguf/{NAME}-F16.gguf"]["sha256"] == sha256(f16)


@pytest.fixture(scope="module")
def requantized(tiny_run, tmp_path_factory):
    """A copy of the run after `stage=quantize export.quants=[Q8_0,Q5_K_M]`, then `stage=convert` with
    the same override. Returns (run_dir, manifest before, quantize result, convert result)."""
    run_dir = copy_run(tiny_run, tmp_path_factory.mktemp("requantized"))
    before = manifest(run_dir)
    quants = "export.quants=[Q8_0,Q5_K_M]"
    quantize = run_pipeline("stage=quantize", "experiment=tiny", f"run_dir={run_dir}", quants)
    convert = run_pipeline("stage=convert", "experiment=tiny", f"run_dir={run_dir}", quants)
    return run_dir, before, quantize, convert


def test_changed_quants_reruns_quantize(requantized):
    from pipeline.engines.gguf import check_gguf

    run_dir, before, result, _ = requantized
    assert ran(result, "quantize") and not skipped(result, "quantize"), said(result)[-3000:]
    q5 = gguf(run_dir, "Q5_K_M")
    check_gguf(q5, 1, 2)
    m = manifest(run_dir)
    assert set(m["stages"]["quantize"]["outputs"]) == {
        f"gguf/{NAME}-Q8_0.gguf",
        f"gguf/{NAME}-Q5_K_M.gguf",
        f"gguf/{NAME}-Q8_0.Modelfile",
        f"gguf/{NAME}-Q5_K_M.Modelfile",
        f"gguf/{NAME}.imatrix.gguf",
    }
    expected = {"sha256": sha256(q5), "size": q5.stat().st_size, "stage": "quantize"}
    assert m["artifacts"][f"gguf/{NAME}-Q5_K_M.gguf"] == expected
    assert set(m["stages"]["quantize"]["metrics"]["files"]) == {"Q8_0", "Q5_K_M"}
    assert m["stages"]["quantize"]["config_hash"] != before["stages"]["quantize"]["config_hash"]
    assert m["config"]["export"]["quants"] == ["Q8_0", "Q5_K_M"]
    for stage in ("data", "train", "merge"):  # untouched
        assert m["stages"][stage] == before["stages"][stage]


def test_changed_quants_does_not_rerun_convert(requantized):
    _, _, _, result = requantized
    assert skipped(result, "convert") and not ran(result, "convert"), said(result)[-3000:]


def test_changed_quants_leaves_no_unlisted_gguf(requantized):
    run_dir, _, _, _ = requantized
    listed = set(manifest(run_dir)["artifacts"])
    unlisted = [p.name for p in (run_dir / "gguf").iterdir() if f"gguf/{p.name}" not in listed]
    assert not unlisted, unlisted


def test_quantize_works_from_a_q8_0_conversion(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path)
    outtype = "export.outtype=q8_0"
    run_pipeline("stage=convert", "experiment=tiny", f"run_dir={run_dir}", outtype)
    converted = sha256(gguf(run_dir, "Q8_0"))
    result = run_pipeline("stage=quantize", "experiment=tiny", f"run_dir={run_dir}", outtype, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sha256(gguf(run_dir, "Q8_0")) == converted  # one stage's output is not another's to overwrite


def test_unknown_quant_type_fails_before_any_work(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path)
    before, manifest_before = tree(run_dir / "gguf"), manifest(run_dir)
    result = run_pipeline(
        "stage=quantize", "experiment=tiny", f"run_dir={run_dir}", "export.quants=[Q9_X]", check=False
    )
    assert result.returncode != 0
    for text in ("Q9_X", "Q4_K_M", "Q5_K_M", "Q8_0"):  # the bad one, and the valid ones listed
        assert text in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in said(result)
    assert tree(run_dir / "gguf") == before  # no new file, hidden or not, and none changed
    assert manifest(run_dir) == manifest_before


# ---------------------------------------------------------------- bad input


def test_merge_without_adapter_names_it_and_writes_nothing(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path, without=("adapter", "merged"))
    result = run_pipeline("stage=merge", "experiment=tiny", f"run_dir={run_dir}", check=False)
    assert result.returncode != 0
    assert str(run_dir / "adapter") in result.stderr and "stage=train" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in said(result)
    assert not (run_dir / "merged").exists() and not temporaries(run_dir)


def test_convert_without_merged_names_it(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path, without=("merged", "gguf"))
    result = run_pipeline("stage=convert", "experiment=tiny", f"run_dir={run_dir}", check=False)
    assert result.returncode != 0
    assert str(run_dir / "merged") in result.stderr and "stage=merge" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in said(result)
    assert not (run_dir / "gguf").exists() or not any((run_dir / "gguf").iterdir())


def wrong_base_adapter(run_dir: Path) -> None:
    """Rewrite the adapter as one trained for a wider model: every lora_A/lora_B has the wrong shape."""
    import torch
    from safetensors.torch import load_file, save_file

    path = run_dir / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    torch.manual_seed(0)
    wrong = {}
    for name, t in tensors.items():
        r, n = t.shape if ".lora_A." in name else t.shape[::-1]
        shape = (r, 2 * n) if ".lora_A." in name else (2 * n, r)
        wrong[name] = torch.randn(shape, dtype=t.dtype) * 0.01
    save_file(wrong, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def wrong_base_merge(tiny_run, tmp_path_factory):
    """`stage=merge` on a copy whose adapter was made for another (wider) base.
    Returns (run_dir, result, merged/ before, manifest before)."""
    run_dir = copy_run(tiny_run, tmp_path_factory.mktemp("wrong-base"))
    wrong_base_adapter(run_dir)
    merged_before, manifest_before = tree(run_dir / "merged"), manifest(run_dir)
    result = run_pipeline("stage=merge", "experiment=tiny", f"run_dir={run_dir}", check=False)
    return run_dir, result, merged_before, manifest_before


def test_adapter_for_another_base_fails_and_keeps_merged(wrong_base_merge):
    run_dir, result, merged_before, manifest_before = wrong_base_merge
    assert result.returncode != 0
    assert re.search(r"\.(q|k|v|o|gate|up|down)_proj\.", result.stderr), result.stderr[-3000:]  # names them
    assert "Traceback" not in said(result)
    assert tree(run_dir / "merged") == merged_before and not temporaries(run_dir)  # old merged/ untouched
    assert manifest(run_dir) == manifest_before


def test_adapter_for_another_base_is_named_as_such(wrong_base_merge):
    _, result, _, _ = wrong_base_merge
    assert "another base" in result.stderr, result.stderr[-3000:]


def make_read_only(path: Path):
    """Make the tree unwritable; returns the undo. Root ignores permission bits, so as root the
    tree is made immutable (chattr +i), which refuses writes to root too."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None:
            pytest.skip("running as root (permission bits are ignored) and chattr is not available")
        probe = path / "probe"
        probe.write_text("")
        result = subprocess.run(["chattr", "+i", str(probe)], capture_output=True, text=True)
        subprocess.run(["chattr", "-i", str(probe)], capture_output=True)
        probe.unlink()
        if result.returncode != 0:
            pytest.skip(f"running as root (permission bits are ignored) and chattr +i fails: {result.stderr}")

        def undo_immutable():
            subprocess.run(["chattr", "-R", "-i", str(path)], check=True)

        try:
            subprocess.run(["chattr", "-R", "+i", str(path)], check=True)
        except BaseException:
            undo_immutable()
            raise
        return undo_immutable
    modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")] if not p.is_symlink()}
    for p in sorted(modes, key=lambda p: len(p.parts), reverse=True):
        p.chmod(0o555 if p.is_dir() else 0o444)

    def undo():
        for p in sorted(modes, key=lambda p: len(p.parts)):
            p.chmod(modes[p] & 0o7777)

    return undo


@pytest.fixture(scope="module")
def read_only_run(tiny_run, tmp_path_factory):
    """`stage=convert force=true` on a copy of the run that cannot be written to.
    Returns (run_dir, result, files before, files after)."""
    run_dir = copy_run(tiny_run, tmp_path_factory.mktemp("read-only"))
    before = tree(run_dir)
    undo = make_read_only(run_dir)
    try:
        result = run_pipeline(
            "stage=convert", "experiment=tiny", f"run_dir={run_dir}", "force=true", check=False
        )
        after = tree(run_dir)
    finally:
        undo()
    return run_dir, result, before, after


def test_read_only_run_dir_fails_and_changes_nothing(read_only_run):
    run_dir, result, before, after = read_only_run
    assert result.returncode != 0
    assert re.search(r"Permission denied|Operation not permitted", result.stderr), result.stderr[-3000:]
    assert str(run_dir) in result.stderr, result.stderr[-3000:]
    assert after == before  # nothing written, nothing removed, hidden files included


def test_read_only_run_dir_error_is_one_clean_line(read_only_run):
    _, result, _, _ = read_only_run
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    clean = re.search(r"^error: .*(Permission denied|Operation not permitted)", result.stderr, re.M)
    assert clean, result.stderr[-3000:]


# ---------------------------------------------------------------- killed mid-write


def test_merge_killed_mid_write_leaves_no_merged_dir(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path, without=("merged",))
    manifest_before = (run_dir / "manifest.json").read_bytes()

    def merged_tmp_with_a_shard():
        for tmp in run_dir.glob(".merged.tmp-*"):
            if any(tmp.iterdir()):  # the merge is writing into it
                return tmp
        return None

    log = tmp_path / "merge.log"
    process = popen_pipeline(log, "stage=merge", "experiment=tiny", f"run_dir={run_dir}", "force=true")
    killed_in = kill_when(process, log, merged_tmp_with_a_shard, "`.merged.tmp-*` with a shard in it")
    assert not (run_dir / "merged").exists(), f"killed while writing {killed_in.name}, yet merged/ exists"
    assert (run_dir / "manifest.json").read_bytes() == manifest_before

    run_pipeline("stage=merge", "experiment=tiny", f"run_dir={run_dir}")
    assert not temporaries(run_dir), temporaries(run_dir)
    assert (run_dir / "merged" / "model.safetensors.index.json").is_file()
    m = manifest(run_dir)
    for path in (run_dir / "merged").iterdir():
        assert m["artifacts"][f"merged/{path.name}"]["sha256"] == sha256(path)


@pytest.fixture(scope="module")
def convert_killed(tiny_run, tmp_path_factory):
    """A copy of the run without gguf/: `stage=convert force=true` killed while the GGUF temporary
    is being written, then rerun. Returns (run_dir, temporary killed in, gguf/ listing after the kill)."""
    tmp_path = tmp_path_factory.mktemp("convert-killed")
    run_dir = copy_run(tiny_run, tmp_path, without=("gguf",))

    def gguf_tmp():
        if not (run_dir / "gguf").is_dir():
            return None
        return next(iter((run_dir / "gguf").glob(".*.gguf.tmp-*")), None)

    log = tmp_path / "convert.log"
    process = popen_pipeline(log, "stage=convert", "experiment=tiny", f"run_dir={run_dir}", "force=true")
    killed_in = kill_when(process, log, gguf_tmp, "`gguf/.*.gguf.tmp-*`")
    after_kill = sorted(p.name for p in (run_dir / "gguf").iterdir())
    rerun = run_pipeline("stage=convert", "experiment=tiny", f"run_dir={run_dir}")
    return run_dir, killed_in, after_kill, rerun


def test_convert_killed_mid_write_leaves_no_gguf_then_reruns(convert_killed):
    from pipeline.engines.gguf import check_gguf

    run_dir, killed_in, after_kill, rerun = convert_killed
    assert f"{NAME}-F16.gguf" not in after_kill, after_kill
    assert killed_in.name in after_kill  # it was killed mid-write: only the temporary was there
    assert ran(rerun, "convert")
    f16 = gguf(run_dir, "F16")
    check_gguf(f16, 1, 2)
    assert manifest(run_dir)["artifacts"][f"gguf/{NAME}-F16.gguf"]["sha256"] == sha256(f16)


def test_convert_rerun_removes_the_killed_runs_temporary(convert_killed):
    run_dir, killed_in, _, _ = convert_killed
    assert not temporaries(run_dir / "gguf"), temporaries(run_dir / "gguf")


@pytest.mark.slow
def test_every_stage_records_its_wall_clock_time(tiny_run):
    stages = json.loads((tiny_run / "manifest.json").read_text())["stages"]
    assert set(stages) == {"data", "train", "merge", "convert", "quantize", "ladder", "smoke"}
    for name, record in stages.items():
        assert isinstance(record["seconds"], float) and record["seconds"] > 0, (name, record.get("seconds"))


def test_the_summary_prints_stage_times(tmp_path):
    run_dir = tmp_path / "run"
    first = run_pipeline("stage=data", "experiment=tiny", f"run_dir={run_dir}")
    assert f"\nRun summary ({run_dir})\n" in first.stdout, first.stdout
    # stage, time, peak RSS and sampled anonymous memory (blank: the stage ended before a sample)
    line = r"^data +\d+\.\d s +\d+\.\d\d GB +(\d+\.\d\d GB)?  600 train / 48 eval rows$"
    assert re.search(line, first.stdout, re.M), first.stdout
    again = run_pipeline("stage=data", "experiment=tiny", f"run_dir={run_dir}")  # unchanged: skipped
    assert re.search(r"^data +skipped +600 train / 48 eval rows$", again.stdout, re.M), again.stdout
    assert re.search(r"^total +0\.0 s$", again.stdout, re.M), again.stdout


def test_every_gguf_has_an_ollama_modelfile_beside_it(tiny_run):
    """ollama never runs the GGUF's Jinja template: each GGUF gets a Modelfile with the project's Go
    template (checked by tests/test_ollama.py), naming that GGUF."""
    from pipeline.chat.format import LLAMA2_OLLAMA_TEMPLATE

    ggufs = sorted(p for p in (tiny_run / "gguf").glob("*.gguf") if not p.name.endswith(".imatrix.gguf"))
    assert {g.stem.rsplit("-", 1)[-1] for g in ggufs} == {"F16", "Q8_0", "Q4_K_M"}
    for g in ggufs:
        text = g.with_suffix(".Modelfile").read_text(encoding="ascii")
        assert f"FROM ./{g.name}\n" in text and f'TEMPLATE """{LLAMA2_OLLAMA_TEMPLATE}"""' in text
