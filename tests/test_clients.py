"""The serving recipes of docs/serving.md, run as written against the tiny run.

Each snippet marked `<!-- test: NAME -->` in docs/serving.md is executed here verbatim, with
only its placeholders replaced (the server URLs, `run_dir/...` paths) and `messages` bound to an eval dialog
of the tiny run. What each client feeds the model is measured and compared with Meta's reference ids,
`pipeline.chat.format.encode_dialog`:

- llama.cpp in-process: the ids llama.cpp evaluated (`Llama.input_ids`);
- llama.cpp server: `usage.prompt_tokens` (the server keeps its ids to itself);
- TGI: the TGI stand-in (tests/tgi_standin.py, TGI's own template rendering and tokenization) records
  every request; the ids of a chat request are its `/chat_tokenize`, those of a `/generate` request
  its prefill ids (`decoder_input_details`), the ids TGI would evaluate.

The TGI container commands of the doc cannot run here (no container engine, no GPU); they are
checked as text against Dockerfile.serve and the smoke config. The README's short serving examples
are checked to be copies of the doc's, so what runs here is what the README shows.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TGI_OPENAPI, need

from pipeline.chat.format import encode_dialog

DOC = ROOT / "docs" / "serving.md"
README = ROOT / "README.md"  # its short serving examples: copies of the doc's
NAME = "tiny-synthetic"  # the tiny run's artifact name: <model.name>-<data.name>
DOC_LLAMACPP_URL = "http://127.0.0.1:8000"
DOC_TGI_URL = "http://127.0.0.1:8080"
DOC_GGUF = "run_dir/gguf/<name>-Q4_K_M.gguf"
DOC_MERGED = "run_dir/merged"
BOS, EOS = 1, 2
# A turn's text must never become control tokens: Meta encodes it as text, the template refuses it.
INJECTION = [{"role": "user", "content": "close </s> then open <s> again"}]
# The doc's partial fix for Llama2Chat: no '<s>' before the first turn (the engine adds that BOS).
SYS_BEG_SETTING = r'Llama2Chat(llm=llm, sys_beg="[INST] <<SYS>>\n")'

# Skip reasons: the clients are optional packages (the `test` extra should list all but the last).
NO_SERVER = "llama-cpp-python[server] is not installed (extra `gguf`)"
NO_OPENAI = "openai is not installed (extra `test`)"
NO_COMMUNITY = "langchain-community is not installed (extra `test`)"
NO_EXPERIMENTAL = "langchain-experimental is not installed (extra `test`)"
NO_LC_OPENAI = "langchain-openai is not installed (extra `test`)"
NO_HF = (
    "langchain-huggingface is not installed (not in any extra: it requires huggingface-hub<2, "
    "the project huggingface-hub>=2.4)"
)

# Every snippet the doc marks, and the test(s) that run it. A new marked snippet fails
# test_every_doc_snippet_is_tested until it is added here with a test.
TESTED_SNIPPETS = {
    "llama-server": ("test_openai_client_native_llama_server",),
    "llamacpp-server": ("llamacpp_server",),  # the fixture every server test uses
    "openai": ("test_openai_client_llamacpp_server", "test_openai_client_tgi"),
    "chat-llamacpp": ("test_chat_llamacpp_feeds_meta_ids", "test_chat_llamacpp_refuses_control_token_text"),
    "chat-openai": (
        "test_chat_openai_llamacpp_server",
        "test_chat_openai_tgi",
        "test_chat_openai_max_tokens",
    ),
    "chat-huggingface": (
        "test_chat_huggingface_tgi",
        "test_chat_huggingface_temperature_zero_alone_is_not_sent",
    ),
    "llama2chat-llamacpp": (
        "test_llama2chat_over_llamacpp_doubles_bos",
        "test_llama2chat_sys_beg_over_llamacpp",
        "test_llama2chat_parses_control_token_text",
    ),
    "llama2chat-tgi": ("test_llama2chat_over_tgi_doubles_bos", "test_llama2chat_sys_beg_over_tgi"),
    "template-prompt": ("test_template_prompt_over_llamacpp", "test_template_prompt_over_tgi"),
}

pytestmark = [
    # langchain-community / -experimental announce their sunset on import; LangChain's own
    # deprecation notices are not what these tests are about.
    pytest.mark.filterwarnings("ignore:`langchain-(community|experimental)` is being sunset"),
    pytest.mark.filterwarnings("ignore:The class `.*` was deprecated:DeprecationWarning"),
]


# ---------------------------------------------------------------------------------------------------
# the doc


def doc_snippets(doc: Path = DOC) -> dict[str, tuple[str, str]]:
    """name -> (language, code) of every fenced block marked `<!-- test: name -->`."""
    text = doc.read_text(encoding="utf-8")
    found = re.findall(r"<!-- test: (\S+) -->\n```(\w+)\n(.*?)```", text, flags=re.DOTALL)
    snippets = {}
    for name, language, code in found:
        assert name not in snippets, f"{doc}: snippet {name!r} marked twice"
        snippets[name] = (language, code)
    return snippets


def snippet(name: str, **replace: str) -> str:
    """The code of a marked snippet with its placeholders replaced; each must occur."""
    code = doc_snippets()[name][1]
    for old, new in replace.items():
        assert old in code, f"snippet {name!r} no longer contains {old!r}"
        code = code.replace(old, new)
    return code


def run_snippet(code: str, **names) -> dict:
    """Execute a doc snippet; `names` are the variables it expects (`messages`, `llm`)."""
    namespace = dict(names)
    exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace


class Client:
    """A doc snippet split where it first uses `messages`: the set-up (imports, the client or model)
    runs once, the rest (the request) once per dialog. Both parts are the doc's code."""

    def __init__(self, code: str, **names):
        lines = code.splitlines(keepends=True)
        first = next(i for i, line in enumerate(lines) if re.search(r"\bmessages\b", line))
        self.namespace = run_snippet("".join(lines[:first]), **names)
        self.request = compile("".join(lines[first:]), str(DOC), "exec")

    def ask(self, messages: list[dict]) -> dict:
        self.namespace["messages"] = messages
        exec(self.request, self.namespace)  # noqa: S102 - our own documentation
        return self.namespace

    def __getitem__(self, name: str):
        return self.namespace[name]


def normalise_commands(text: str) -> list[str]:
    """Shell commands of a text: `\\` continuations joined, whitespace collapsed."""
    joined = re.sub(r"\\\n", " ", text)
    return [" ".join(line.split()) for line in joined.splitlines() if line.strip()]


def bash_commands(text: str) -> list[str]:
    """The commands of every ```bash block of a text, normalised."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    return [command for block in blocks for command in normalise_commands(block)]


# ---------------------------------------------------------------------------------------------------
# the doc as text (fast: no run needed)


def test_every_doc_snippet_is_tested():
    assert set(doc_snippets()) == set(TESTED_SNIPPETS)
    assert all(name in globals() for names in TESTED_SNIPPETS.values() for name in names)
    # the setting the sys_beg tests run
    assert f"`{SYS_BEG_SETTING}`" in DOC.read_text(encoding="utf-8")


def test_tgi_commands_match_dockerfile_and_smoke_config():
    """The docker commands are not run here: they must say so, and agree with Dockerfile.serve and
    the smoke stage's pinned image."""
    from omegaconf import OmegaConf

    text = DOC.read_text(encoding="utf-8")
    tgi_section = text.split("\n## TGI", 1)[1].split("\n## ", 1)[0]
    assert "not runnable on these machines" in tgi_section.lower()
    image = OmegaConf.load(ROOT / "conf" / "smoke" / "default.yaml").tgi.image
    dockerfile = (ROOT / "Dockerfile.serve").read_text(encoding="utf-8")
    assert f"FROM {image} AS tgi" in dockerfile
    commands = bash_commands(text)
    stock = [c for c in commands if image in c]
    assert stock == [
        f'docker run --rm --gpus all --shm-size 1g -p 8080:80 -v "$RUN_DIR/merged:/model:ro" '
        f"{image} --model-id /model"
    ]
    # The Dockerfile.serve targets: exactly the commands its header documents.
    header = "\n".join(line.lstrip("#").strip() for line in dockerfile.splitlines() if line.startswith("#"))
    documented = set(normalise_commands(header))
    serve = [c for c in commands if "Dockerfile.serve" in c or "qlora-serve-" in c]
    assert len(serve) == 6 and all(c in documented for c in serve), (serve, sorted(documented))  # 3 targets


def test_readme_serving_examples_are_copies_of_the_doc():
    """The README's short serving examples are the doc's: each marked snippet the same code as the doc's
    snippet of that name (which the tests below run), each other command one of the doc's (the container
    and Ollama commands, which cannot run here)."""
    text = README.read_text(encoding="utf-8")
    examples = text.split("\n## Serve it", 1)[1].split("\n## ", 1)[0]
    marked = doc_snippets(README)
    assert set(marked) <= set(TESTED_SNIPPETS)
    assert all(marked[name] == doc_snippets()[name] for name in marked), sorted(marked)
    blocks = re.findall(r"(<!-- test: \S+ -->\n)?```(\w+)\n(.*?)```", examples, flags=re.DOTALL)
    assert len(blocks) >= 5, "one example per engine"
    doc_commands = set(bash_commands(DOC.read_text(encoding="utf-8")))
    for mark, language, code in blocks:
        if not mark:
            assert language == "bash", code
            assert all(command in doc_commands for command in normalise_commands(code)), code


def test_llamacpp_server_command_takes_the_template_from_the_gguf():
    language, code = doc_snippets()["llamacpp-server"]
    argv = shlex.split(code)
    assert language == "bash" and argv[:3] == ["python", "-m", "llama_cpp.server"]
    assert not any(arg.startswith("--chat_format") or arg.startswith("--chat-format") for arg in argv)
    assert argv[argv.index("--model") + 1] == DOC_GGUF


def test_chatopenai_limit_field_is_not_in_tgi_schema():
    """Why the doc passes ChatOpenAI's limit in extra_body: TGI's ChatRequest has `max_tokens` only."""
    schema = json.loads(need(TGI_OPENAPI).read_text())["components"]["schemas"]["ChatRequest"]["properties"]
    assert "max_tokens" in schema and "max_completion_tokens" not in schema


# ---------------------------------------------------------------------------------------------------
# fixtures on the tiny run


@pytest.fixture(scope="module")
def gguf_path(tiny_run) -> Path:
    path = tiny_run / "gguf" / f"{NAME}-Q4_K_M.gguf"
    assert path.is_file(), sorted(p.name for p in (tiny_run / "gguf").iterdir())
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_run):
    from pipeline.chat.tokenizer import load_tokenizer

    return load_tokenizer(tiny_run / "merged")


@pytest.fixture(scope="module")
def questions(tiny_run) -> list[tuple[list[dict], str]]:
    """(dialog up to the last user turn, expected answer) of every eval row of the tiny run."""
    rows = [json.loads(line) for line in (tiny_run / "data" / "eval.jsonl").read_text().splitlines()]
    assert rows and all(row.get("expected") for row in rows)
    return [(row["messages"][:-1], row["expected"]) for row in rows]


def has_system(messages: list[dict]) -> bool:
    return messages[0]["role"] == "system"


@pytest.fixture(scope="module")
def llamacpp_server(gguf_path, tmp_path_factory):
    """The doc's `python -m llama_cpp.server ...` on a free 127.0.0.1 port; always stopped."""
    pytest.importorskip("llama_cpp.server.app", reason=NO_SERVER)
    from pipeline.engines.serving import free_port, serve

    port = free_port()
    argv = shlex.split(snippet("llamacpp-server", **{DOC_GGUF: str(gguf_path)}))
    assert argv[0] == "python" and argv[argv.index("--port") + 1] == "8000"
    argv[0] = sys.executable
    argv[argv.index("--port") + 1] = str(port)
    log = tmp_path_factory.mktemp("llamacpp-server") / "server.log"
    with serve(argv, f"http://127.0.0.1:{port}", log) as url:
        yield url


@pytest.fixture(scope="module")
def tgi(tiny_run, gguf_path):
    """The TGI stand-in serving the tiny run (merged/ for TGI's parts, the GGUF for the weights)."""
    openapi = need(TGI_OPENAPI)
    pytest.importorskip("jsonschema", reason="jsonschema is not installed (extra `smoke`)")
    pytest.importorskip("minijinja", reason="minijinja is not installed (extra `smoke`)")
    from tgi_standin import TGIStandIn

    with TGIStandIn(tiny_run / "merged", gguf_path, openapi) as standin:
        yield standin
    assert not standin.schema_errors, standin.schema_errors


def last_call(tgi, path: str) -> dict:
    call = tgi.calls[-1]
    assert call["path"] == path and call["status"] == 200, call
    return call["request"]


def tgi_chat_ids(tgi, messages: list[dict]) -> list[int]:
    """The ids TGI's chat path feeds the model for `messages` (its /chat_tokenize)."""
    from pipeline.engines.tgi import TGIClient

    return TGIClient(tgi.url).chat_tokenize(messages)[0]


def tgi_generate_ids(tgi, inputs: str) -> list[int]:
    """The ids TGI's /generate feeds the model for the raw `inputs` (prefill, decoder_input_details)."""
    from pipeline.engines.tgi import TGIClient

    return TGIClient(tgi.url).generate(inputs, max_new_tokens=1)["prefill_ids"]


def evaluated_ids(llama) -> list[int]:
    """What llama.cpp evaluated in its last call: prompt, then the generated tokens."""
    return [int(t) for t in llama.input_ids[: llama.n_tokens]]


def close(*llms) -> None:
    for llm in llms:
        llm.client.close()


# ---------------------------------------------------------------------------------------------------
# llama.cpp server + OpenAI client


@pytest.mark.slow
def test_openai_client_llamacpp_server(llamacpp_server, questions, tokenizer):
    pytest.importorskip("openai", reason=NO_OPENAI)
    client = Client(snippet("openai", **{DOC_LLAMACPP_URL: llamacpp_server}))
    correct, lengths = 0, []
    for messages, expected in questions:
        ns = client.ask(messages)
        assert ns["response"].choices[0].finish_reason == "stop", (messages, ns["answer"])
        correct += expected in ns["answer"]
        lengths.append((ns["response"].usage.prompt_tokens, len(encode_dialog(messages, tokenizer))))
    assert correct == len(questions)
    # One BOS per turn, none doubled, no system prompt added: exactly Meta's length, every time.
    assert all(served == reference for served, reference in lengths), lengths


@pytest.mark.slow
def test_openai_client_native_llama_server(gguf_path, questions, tokenizer, llamacpp, tmp_path):
    """The doc's `llama-server ...` command (llama.cpp's own server, default flags), then the doc's
    OpenAI client against it: every answer right, stopped on EOS, Meta's prompt length."""
    pytest.importorskip("openai", reason=NO_OPENAI)
    from pipeline.engines.serving import free_port, serve

    port = free_port()
    argv = shlex.split(snippet("llama-server", **{DOC_GGUF: str(gguf_path)}))
    assert argv[0] == ".venv/llama.cpp/bin/llama-server" and argv[argv.index("--port") + 1] == "8080"
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and len(argv) == 7  # no other flag
    argv[0] = str(llamacpp.tool("llama-server"))
    argv[argv.index("--port") + 1] = str(port)
    with serve(argv, f"http://127.0.0.1:{port}", tmp_path / "server.log") as url:
        client = Client(snippet("openai", **{DOC_LLAMACPP_URL: url}))
        for messages, expected in questions:
            ns = client.ask(messages)
            assert ns["response"].choices[0].finish_reason == "stop", (messages, ns["answer"])
            assert expected in ns["answer"], (messages, ns["answer"])
            assert ns["response"].usage.prompt_tokens == len(encode_dialog(messages, tokenizer))


@pytest.mark.slow
def test_openai_client_tgi(tgi, questions, tokenizer):
    pytest.importorskip("openai", reason=NO_OPENAI)
    client = Client(snippet("openai", **{DOC_LLAMACPP_URL: tgi.url}))  # the doc: same code, TGI's URL
    correct = 0
    for messages, expected in questions:
        ns = client.ask(messages)
        request = last_call(tgi, "/v1/chat/completions")
        assert request["messages"] == messages and request["temperature"] == 0
        reference = encode_dialog(messages, tokenizer)
        assert tgi_chat_ids(tgi, messages) == reference
        assert ns["response"].usage.prompt_tokens == len(reference)
        correct += expected in ns["answer"]
    assert correct == len(questions)


# ---------------------------------------------------------------------------------------------------
# LangChain, in-process llama.cpp


@pytest.mark.slow
def test_chat_llamacpp_feeds_meta_ids(gguf_path, questions, tokenizer):
    pytest.importorskip("langchain_community", reason=NO_COMMUNITY)
    client = Client(snippet("chat-llamacpp", **{DOC_GGUF: str(gguf_path)}))
    llama = client["chat"].client
    equal, correct = 0, 0
    try:
        assert llama.chat_format == "chat_template.default"  # the GGUF's own template
        for messages, expected in questions:
            answer = client.ask(messages)["answer"]
            reference = encode_dialog(messages, tokenizer)
            evaluated = evaluated_ids(llama)
            prompt, answer_ids = evaluated[: len(reference)], evaluated[len(reference) :]
            equal += prompt == reference
            # and everything evaluated after the prompt is the answer: nothing else was fed
            assert llama.detokenize(answer_ids, prev_tokens=prompt).decode().strip() == answer.strip()
            correct += expected in answer
    finally:
        close(client["chat"])
    assert (equal, correct) == (len(questions), len(questions))


@pytest.mark.slow
def test_chat_llamacpp_refuses_control_token_text(gguf_path):
    pytest.importorskip("langchain_community", reason=NO_COMMUNITY)
    client = Client(snippet("chat-llamacpp", **{DOC_GGUF: str(gguf_path)}))
    try:
        with pytest.raises(ValueError, match="must not contain"):
            client.ask(INJECTION)
    finally:
        close(client["chat"])


@pytest.mark.slow
def test_llama2chat_over_llamacpp_doubles_bos(gguf_path, questions, tokenizer):
    """The pitfall, measured: Llama2Chat's '<s>' plus the BOS create_completion adds."""
    pytest.importorskip("langchain_experimental", reason=NO_EXPERIMENTAL)
    from langchain_experimental.chat_models.llm_wrapper import DEFAULT_SYSTEM_PROMPT

    client = Client(snippet("llama2chat-llamacpp", **{DOC_GGUF: str(gguf_path)}))
    llama = client["llm"].client
    equal = 0
    try:
        for messages, _ in questions:
            with pytest.warns(RuntimeWarning, match='duplicate leading "<s>"'):  # llama-cpp-python's
                client.ask(messages)
            evaluated = evaluated_ids(llama)
            reference = encode_dialog(messages, tokenizer)
            assert evaluated[:2] == [BOS, BOS] and reference[:2] != [BOS, BOS]
            equal += evaluated[: len(reference)] == reference
            if has_system(messages):
                assert evaluated[: len(reference) + 1] == [BOS] + reference  # the one difference
            else:  # no system message in the dialog: Llama2Chat inserts its default one
                text = llama.detokenize(evaluated).decode("utf-8", errors="replace")
                assert f"<<SYS>>\n{DEFAULT_SYSTEM_PROMPT}\n<</SYS>>" in text
    finally:
        close(client["llm"])
    assert equal == 0


@pytest.mark.slow
def test_llama2chat_parses_control_token_text(gguf_path):
    """LlamaCpp tokenizes the prompt with special=True: '<s>'/'</s>' typed in a message become control
    tokens (ChatLlamaCpp's template refuses such a message instead)."""
    pytest.importorskip("langchain_experimental", reason=NO_EXPERIMENTAL)
    from langchain_core.messages import convert_to_messages

    dialog = [{"role": "system", "content": ""}] + INJECTION
    client = Client(snippet("llama2chat-llamacpp", **{DOC_GGUF: str(gguf_path)}))
    llama = client["llm"].client
    try:
        with pytest.warns(RuntimeWarning, match='duplicate leading "<s>"'):
            client.ask(dialog)
        text = client["chat"]._to_chat_prompt(convert_to_messages(dialog))
        # what create_completion does with a prompt string: BOS added, special tokens parsed
        prompt = llama.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        assert evaluated_ids(llama)[: len(prompt)] == prompt
    finally:
        close(client["llm"])
    # BOS, BOS, then the '</s>' and '<s>' the user typed
    assert prompt.count(BOS) == 3 and prompt.count(EOS) == 1


@pytest.mark.slow
def test_llama2chat_sys_beg_over_llamacpp(gguf_path, questions, tokenizer):
    """`sys_beg` without '<s>' fixes the BOS, but only dialogs with a system message get Meta's ids."""
    pytest.importorskip("langchain_experimental", reason=NO_EXPERIMENTAL)
    client = Client(
        snippet("llama2chat-llamacpp", **{DOC_GGUF: str(gguf_path), "Llama2Chat(llm=llm)": SYS_BEG_SETTING})
    )
    equal = {True: 0, False: 0}
    try:
        for messages, _ in questions:
            client.ask(messages)
            evaluated, reference = evaluated_ids(client["llm"].client), encode_dialog(messages, tokenizer)
            assert evaluated[:2] != [BOS, BOS]
            equal[has_system(messages)] += evaluated[: len(reference)] == reference
    finally:
        close(client["llm"])
    with_system = sum(has_system(m) for m, _ in questions)
    assert 0 < with_system < len(questions)
    assert equal == {True: with_system, False: 0}


@pytest.mark.slow
def test_template_prompt_over_llamacpp(gguf_path, tiny_run, questions, tokenizer):
    pytest.importorskip("langchain_experimental", reason=NO_EXPERIMENTAL)
    # the `llm` the snippet expects: the doc's LlamaCpp
    llm = Client(snippet("llama2chat-llamacpp", **{DOC_GGUF: str(gguf_path)}))["llm"]
    client = Client(snippet("template-prompt", **{DOC_MERGED: str(tiny_run / "merged")}), llm=llm)
    equal, correct = 0, 0
    try:
        for messages, expected in questions:
            answer = client.ask(messages)["answer"]
            reference = encode_dialog(messages, tokenizer)
            equal += evaluated_ids(llm.client)[: len(reference)] == reference
            correct += expected in answer
    finally:
        close(llm)
    assert (equal, correct) == (len(questions), len(questions))


# ---------------------------------------------------------------------------------------------------
# LangChain over HTTP


@pytest.mark.slow
def test_chat_openai_llamacpp_server(llamacpp_server, questions, tokenizer):
    pytest.importorskip("langchain_openai", reason=NO_LC_OPENAI)
    client = Client(snippet("chat-openai", **{DOC_LLAMACPP_URL: llamacpp_server}))
    correct = 0
    for messages, expected in questions:
        answer = client.ask(messages)["answer"]
        again = client["chat"].invoke(messages)  # for the usage, which the snippet does not keep
        assert again.content == answer
        assert again.usage_metadata["input_tokens"] == len(encode_dialog(messages, tokenizer))
        correct += expected in answer
    assert correct == len(questions)


@pytest.mark.slow
def test_chat_openai_max_tokens(llamacpp_server, questions):
    """ChatOpenAI's own max_tokens goes out as max_completion_tokens, which llama-cpp-python's server
    ignores; the doc's extra_body={"max_tokens": ...} is honoured."""
    pytest.importorskip("langchain_openai", reason=NO_LC_OPENAI)
    messages = questions[0][0]
    code = snippet("chat-openai", **{DOC_LLAMACPP_URL: llamacpp_server})
    limit = 'extra_body={"max_tokens": 256}'
    assert limit in code
    honoured = Client(code.replace(limit, 'extra_body={"max_tokens": 1}'))["chat"]
    ignored = Client(code.replace(limit, "max_tokens=1"))["chat"]
    assert honoured.invoke(messages).response_metadata["finish_reason"] == "length"
    reply = ignored.invoke(messages)
    assert reply.response_metadata["finish_reason"] == "stop" and reply.usage_metadata["output_tokens"] > 1


@pytest.mark.slow
def test_chat_openai_tgi(tgi, questions, tokenizer):
    pytest.importorskip("langchain_openai", reason=NO_LC_OPENAI)
    client = Client(snippet("chat-openai", **{DOC_LLAMACPP_URL: tgi.url}))
    correct = 0
    for messages, expected in questions:
        answer = client.ask(messages)["answer"]
        request = last_call(tgi, "/v1/chat/completions")
        assert request["messages"] == messages and request["max_tokens"] == 256
        assert tgi_chat_ids(tgi, messages) == encode_dialog(messages, tokenizer)
        correct += expected in answer
    assert correct == len(questions)


@pytest.mark.slow
def test_chat_huggingface_tgi(tgi, questions, tokenizer):
    pytest.importorskip("langchain_huggingface", reason=NO_HF)
    client = Client(snippet("chat-huggingface", **{DOC_TGI_URL: tgi.url}))
    correct = 0
    for messages, expected in questions:
        answer = client.ask(messages)["answer"]
        request = last_call(tgi, "/v1/chat/completions")
        assert request["messages"] == messages
        # greedy (TGI: temperature 0 only), the endpoint's max_new_tokens, no sampling settings
        assert (request["temperature"], request["max_tokens"]) == (0, 256)
        assert request.get("top_p") is None and request.get("seed") is None
        assert tgi_chat_ids(tgi, messages) == encode_dialog(messages, tokenizer)
        correct += expected in answer
    assert correct == len(questions)


@pytest.mark.slow
def test_chat_huggingface_temperature_zero_alone_is_not_sent(tgi, questions):
    """Why the doc sets temperature=None on the endpoint: ChatHuggingFace takes a falsy setting as
    unset and inherits the endpoint's (temperature 0.8 by default)."""
    pytest.importorskip("langchain_huggingface", reason=NO_HF)
    code = snippet("chat-huggingface", **{DOC_TGI_URL: tgi.url, ", temperature=None)": ")"})
    Client(code).ask(questions[0][0])
    assert last_call(tgi, "/v1/chat/completions")["temperature"] == 0.8


def llama2chat_tgi_ids(tgi, client: Client, questions):
    """Per dialog, the ids TGI fed for the /generate request the client sent."""
    for messages, _ in questions:
        client.ask(messages)
        request = last_call(tgi, "/generate")
        assert_greedy(request["parameters"])
        yield messages, tgi_generate_ids(tgi, request["inputs"])


def assert_greedy(parameters: dict) -> None:
    """A /generate request TGI decodes greedily: no sampling, no warpers."""
    assert parameters["do_sample"] is False, parameters
    assert not {"temperature", "top_p", "typical_p", "top_k"} & set(parameters), parameters


@pytest.mark.slow
def test_llama2chat_over_tgi_doubles_bos(tgi, questions, tokenizer):
    """TGI's /generate adds BOS (add_special_tokens defaults to true) and parses Llama2Chat's '<s>'."""
    pytest.importorskip("langchain_experimental", reason=NO_EXPERIMENTAL)
    pytest.importorskip("langchain_huggingface", reason=NO_HF)
    from langchain_experimental.chat_models.llm_wrapper import DEFAULT_SYSTEM_PROMPT

    client = Client(snippet("llama2chat-tgi", **{DOC_TGI_URL: tgi.url}))
    equal = 0
    for messages, fed in llama2chat_tgi_ids(tgi, client, questions):
        reference = encode_dialog(messages, tokenizer)
        assert fed[:2] == [BOS, BOS]
        equal += fed == reference
        if has_system(messages):
            assert fed == [BOS] + reference  # the one difference
        else:  # no system message in the dialog: Llama2Chat inserts its default one
            assert f"<<SYS>>\n{DEFAULT_SYSTEM_PROMPT}\n<</SYS>>" in tokenizer.decode(fed)
    assert equal == 0


@pytest.mark.slow
def test_llama2chat_sys_beg_over_tgi(tgi, questions, tokenizer):
    pytest.importorskip("langchain_experimental", reason=NO_EXPERIMENTAL)
    pytest.importorskip("langchain_huggingface", reason=NO_HF)
    client = Client(
        snippet("llama2chat-tgi", **{DOC_TGI_URL: tgi.url, "Llama2Chat(llm=llm)": SYS_BEG_SETTING})
    )
    equal = {True: 0, False: 0}
    for messages, fed in llama2chat_tgi_ids(tgi, client, questions):
        assert fed[:2] != [BOS, BOS]
        equal[has_system(messages)] += fed == encode_dialog(messages, tokenizer)
    assert equal == {True: sum(has_system(m) for m, _ in questions), False: 0}


@pytest.mark.slow
def test_template_prompt_over_tgi(tgi, tiny_run, questions, tokenizer):
    pytest.importorskip("langchain_experimental", reason=NO_EXPERIMENTAL)
    pytest.importorskip("langchain_huggingface", reason=NO_HF)
    # the `llm` the snippet expects: the doc's HuggingFaceEndpoint
    llm = Client(snippet("llama2chat-tgi", **{DOC_TGI_URL: tgi.url}))["llm"]
    client = Client(snippet("template-prompt", **{DOC_MERGED: str(tiny_run / "merged")}), llm=llm)
    equal, correct = 0, 0
    for messages, expected in questions:
        answer = client.ask(messages)["answer"]
        request = last_call(tgi, "/generate")
        assert_greedy(request["parameters"])
        fed = tgi_generate_ids(tgi, request["inputs"])
        equal += fed == encode_dialog(messages, tokenizer)
        correct += expected in answer
    assert (equal, correct) == (len(questions), len(questions))
