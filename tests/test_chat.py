"""Parity of the Llama-2 chat format with Meta's reference, on the REAL Llama-2 tokenizer.

The reference is Meta's `Llama.chat_completion` encoding (llama/generation.py), re-implemented here
directly on `sentencepiece` (see `meta_reference_ids`) so that it shares no code with
`pipeline.chat.format`. Every way the project turns a chat into token ids must give exactly those ids:
`pipeline.chat.format.encode_dialog` with the project's tokenizer, and the chat paths of
`pipeline.engines.encoding`:
transformers, the TGI reproduction (minijinja + tokenizers; TGI itself cannot run here),
llama-cpp-python, and llama.cpp's own `llama-server`, running on 127.0.0.1 with default flags.
"""

from __future__ import annotations

import json
import random
import re

import pytest
import sentencepiece as spm

from pipeline.chat.format import DialogError, encode_dialog
from pipeline.chat.tokenizer import load_tokenizer
from pipeline.engines.encoding import (
    LlamaCppBuiltinEngine,
    LlamaCppEngine,
    LlamaServerEngine,
    TemplateRefused,
    TGIEngine,
    TransformersEngine,
)
from pipeline.engines.serving import serve_llama_server
from pipeline.stages.data import parse_guanaco_text

# --------------------------------------------------------------------------------------------
# The independent reference: Meta's chat_completion on raw SentencePiece
# --------------------------------------------------------------------------------------------

META_B_INST, META_E_INST = "[INST]", "[/INST]"
META_B_SYS, META_E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def meta_reference_ids(sp: spm.SentencePieceProcessor, messages: list[dict]) -> list[int]:
    """Token ids of Meta's `Llama.chat_completion` for `messages` (no validation: pass valid dialogs)."""
    dialog = [dict(m) for m in messages]
    if dialog[0]["role"] == "system":
        # Meta folds the system prompt into the first user message; the system text is not stripped.
        dialog = [
            {
                "role": dialog[1]["role"],
                "content": META_B_SYS + dialog[0]["content"] + META_E_SYS + dialog[1]["content"],
            }
        ] + dialog[2:]
    ids: list[int] = []
    for user, answer in zip(dialog[::2], dialog[1::2]):
        text = f"{META_B_INST} {user['content'].strip()} {META_E_INST} {answer['content'].strip()} "
        ids += [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]
    if len(dialog) % 2 == 1:  # the open user turn of a prompt: BOS, no EOS
        ids += [sp.bos_id()] + sp.encode(f"{META_B_INST} {dialog[-1]['content'].strip()} {META_E_INST}")
    return ids


def pieces(sp: spm.SentencePieceProcessor, ids: list[int]) -> list[str]:
    return [sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else f"<id {i}>" for i in ids]


def first_difference(sp: spm.SentencePieceProcessor, expected: list[int], actual: list[int]) -> str:
    """A readable account of where two id lists part: position and the token pieces around it."""
    shorter = min(len(expected), len(actual))
    at = next((i for i, (a, b) in enumerate(zip(expected, actual)) if a != b), shorter)
    lo, hi = max(0, at - 4), at + 6
    return (
        f"first difference at token {at} (reference has {len(expected)} tokens, got {len(actual)}):\n"
        f"  reference [{lo}:{hi}] {pieces(sp, expected[lo:hi])}\n"
        f"  got       [{lo}:{hi}] {pieces(sp, actual[lo:hi])}"
    )


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


# --------------------------------------------------------------------------------------------
# Fixtures: one tokenizer / engine per module (the llama.cpp one loads a GGUF)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sp(llama2_tokenizer_model) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_model))


@pytest.fixture(scope="module")
def project_tokenizer(llama2_hf_dir):
    return load_tokenizer(llama2_hf_dir)


@pytest.fixture(scope="module")
def transformers_engine(llama2_hf_dir) -> TransformersEngine:
    return TransformersEngine(llama2_hf_dir)


@pytest.fixture(scope="module")
def tgi_engine(llama2_hf_dir) -> TGIEngine:
    return TGIEngine(llama2_hf_dir)


@pytest.fixture(scope="module")
def llamacpp_engine(llama2_vocab_gguf):
    engine = LlamaCppEngine(llama2_vocab_gguf)
    yield engine
    engine.llama.close()  # free llama.cpp's vocab now, not in __del__ at interpreter exit


@pytest.fixture(scope="module")
def llama_server_engine(llama2_random_gguf, llamacpp, tmp_path_factory):
    """llama.cpp's own server (its C++ Jinja engine) on the real Llama-2 vocabulary. Default flags but
    one: by default a request whose last message is an assistant's is a prefill (the answer is continued,
    `[/INST]answer`, not closed); `--no-prefill-assistant` has the template render closed exchanges, so
    that whole training-shaped dialogs are checked too. Prompts render the same either way."""
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    with serve_llama_server(llama2_random_gguf, log_path, llamacpp, ("--no-prefill-assistant",)) as base_url:
        yield LlamaServerEngine(base_url)


ENGINE_FIXTURES = {
    "transformers": "transformers_engine",
    "tgi": "tgi_engine",
    "llama-cpp-python": "llamacpp_engine",
    "llama-server": "llama_server_engine",
}
IMPLEMENTATIONS = ["encode_dialog", *ENGINE_FIXTURES]


@pytest.fixture(params=list(ENGINE_FIXTURES))
def engine(request):
    """Each serving engine's chat path in turn."""
    return request.getfixturevalue(ENGINE_FIXTURES[request.param])


@pytest.fixture(params=IMPLEMENTATIONS)
def chat_ids(request):
    """Each way the project turns a chat into ids, as `messages -> ids`."""
    if request.param == "encode_dialog":
        tokenizer = request.getfixturevalue("project_tokenizer")
        return lambda messages: encode_dialog(messages, tokenizer)
    return request.getfixturevalue(ENGINE_FIXTURES[request.param]).chat_ids


# --------------------------------------------------------------------------------------------
# Hand-written dialogs
# --------------------------------------------------------------------------------------------

THREE_EXCHANGES = [
    user("What is the capital of France?"),
    assistant("The capital of France is Paris."),
    user("And of Italy?"),
    assistant("Rome."),
    user("Which of the two is further north?"),
    assistant("Paris is further north than Rome."),
]

DIALOGS = {
    # prompts (end with a user turn) and training examples (end with an assistant turn)
    "prompt-single-user": [user("Hello!")],
    "train-single-exchange": [user("Hello!"), assistant("Hi! How can I help you today?")],
    "prompt-system": [system("You are a helpful assistant."), user("Tell me a joke.")],
    "train-system": [
        system("You are a helpful assistant."),
        user("Tell me a joke."),
        assistant("Why did the llama..."),
    ],
    "train-system-empty": [system(""), user("Hi"), assistant("Hello")],
    "prompt-system-empty": [system(""), user("Hi")],
    # Meta does not strip the system text: its whitespace stays inside <<SYS>> ... <</SYS>>
    "prompt-system-surrounding-whitespace": [
        system("\n\n  Be brief.\tAlways.  \n"),
        user("  Why is the sky blue?\n"),
    ],
    "train-system-multiline": [
        system("Rules:\n1. Be kind.\n2. Be brief.\n"),
        user("Hi"),
        assistant("Hello."),
        user("Bye"),
        assistant("Goodbye."),
    ],
    "train-three-exchanges": THREE_EXCHANGES,
    "prompt-three-exchanges-then-user": THREE_EXCHANGES + [user("And Madrid?")],
    "prompt-system-two-exchanges-then-user": [
        system("Answer in French."),
        *THREE_EXCHANGES[:4],
        user("Merci !"),
    ],
    "train-five-exchanges": [
        m for i in range(5) for m in (user(f"Count to {i}."), assistant(" ".join(map(str, range(i + 1)))))
    ],
    "unicode-accents": [
        user("Café crème, naïve façade, Ångström in Zürich, señor, Œuvre"),
        assistant("Très bien, ça va."),
    ],
    "unicode-cjk": [
        user("你好，世界！今日はいい天気ですね。안녕하세요"),
        assistant("こんにちは！今天天气很好。"),
    ],
    "unicode-rtl": [user("مرحبا بالعالم — שלום עולם"), assistant("أهلاً! ‏שלום‎ (mixed LTR text)")],
    "unicode-emoji-zwj": [
        user("Family 👩‍👩‍👧‍👦, flag 🏳️‍🌈, skin tone 👍🏽, llama 🦙, keycap 1️⃣"),
        assistant("🧑‍💻 done ✅"),
    ],
    "unicode-whitespace-stripped": [user("\u00a0\u3000hi there\u2028\u0085"), assistant("\u2003ok\u00a0")],
    "surrounding-whitespace-newlines": [
        user("\n\n   What?   \n"),
        assistant("  \n Answer.\n\n "),
        user("\n next \n"),
    ],
    "tabs": [user("col1\tcol2\tcol3\n\tindented\t"), assistant("\ta\tb\t")],
    "runs-of-spaces": [user("a  b   c    d     e"), assistant("x      y  z")],
    "crlf-newlines": [user("line1\r\nline2\rline3\n"), assistant("ok\r\n")],
    "digits": [
        user("Compute 12345 * 678, pi≈3.14159, date 2024-01-01, 0x1F, 1e-9"),
        assistant("12345 * 678 = 8369910"),
    ],
    "markdown": [
        user("# Title\n\n- item **bold** _it_\n1. one\n\n> quote\n\n| a | b |\n|---|---|\n| 1 | 2 |"),
        assistant("## Answer\n\n* [link](http://example.com) `code`"),
    ],
    "code-indented": [
        user("Fix this:\n```python\ndef f(x):\n    if x:\n        return x  *  2\n    return None\n```"),
        assistant("```python\ndef f(x):\n    return x * 2 if x else None\n```"),
    ],
    "json-and-angle-brackets": [
        user('{"key": [1, 2, {"nested": null}], "s": "a\\nb"} <div class="x">a &lt; b</div>'),
        assistant("<S> < s> <s > [inst] {{ not_jinja }} {% raw %}"),
    ],
    "empty-answer": [user("Say nothing."), assistant("")],
    "whitespace-only-answer": [user("Say nothing."), assistant("  \n ")],
}


@pytest.mark.parametrize("messages", list(DIALOGS.values()), ids=list(DIALOGS))
def test_hand_written_dialog_matches_meta_reference(messages, chat_ids, sp):
    expected = meta_reference_ids(sp, messages)
    actual = chat_ids(messages)
    assert actual == expected, first_difference(sp, expected, actual)


def test_reference_sanity(sp):
    """The reference itself: BOS per exchange, EOS closing each finished exchange, open turn last."""
    ids = meta_reference_ids(sp, [user("Hi"), assistant("Hello"), user("Bye")])
    assert pieces(sp, ids) == [
        "<s>",
        "▁[",
        "INST",
        "]",
        "▁Hi",
        "▁[",
        "/",
        "INST",
        "]",
        "▁Hello",
        "▁",
        "</s>",
        "<s>",
        "▁[",
        "INST",
        "]",
        "▁By",
        "e",
        "▁[",
        "/",
        "INST",
        "]",
    ]


@pytest.mark.parametrize("messages", list(DIALOGS.values()), ids=list(DIALOGS))
def test_encode_dialog_one_bos_per_turn_never_doubled(messages, project_tokenizer):
    ids = encode_dialog(messages, project_tokenizer)
    user_turns = sum(m["role"] == "user" for m in messages)
    assistant_turns = sum(m["role"] == "assistant" for m in messages)
    assert ids[0] == project_tokenizer.bos_token_id
    assert ids.count(project_tokenizer.bos_token_id) == user_turns
    assert ids.count(project_tokenizer.eos_token_id) == assistant_turns
    assert all(not (a == b == project_tokenizer.bos_token_id) for a, b in zip(ids, ids[1:]))


# --------------------------------------------------------------------------------------------
# Real OpenAssistant conversations (guanaco format)
# --------------------------------------------------------------------------------------------

SAMPLE_SIZE = 25


def guanaco_dialog(record: dict) -> list[dict]:
    return parse_guanaco_text(record["input"] + " " + record["output"])


@pytest.fixture(scope="module")
def guanaco_sample(guanaco_records) -> dict[tuple[str, int], tuple[int, list[dict]]]:
    """25 multi-turn and 25 single-turn records, fixed seed: (kind, k) -> (record index, dialog)."""
    dialogs = [guanaco_dialog(r) for r in guanaco_records]
    multi = [i for i, d in enumerate(dialogs) if len(d) >= 4]
    single = [i for i, d in enumerate(dialogs) if len(d) == 2]
    rng = random.Random(20240101)
    chosen = {
        "multi": sorted(rng.sample(multi, SAMPLE_SIZE)),
        "single": sorted(rng.sample(single, SAMPLE_SIZE)),
    }
    return {
        (kind, k): (index, dialogs[index])
        for kind, indices in chosen.items()
        for k, index in enumerate(indices)
    }


GUANACO_CASES = [
    pytest.param(kind, k, form, id=f"guanaco-{kind}{k:02d}-{form}")
    for kind in ("multi", "single")
    for k in range(SAMPLE_SIZE)
    for form in ("full", "prompt")
]


@pytest.mark.parametrize(("kind", "k", "form"), GUANACO_CASES)
def test_guanaco_dialog_matches_meta_reference(kind, k, form, guanaco_sample, chat_ids, sp):
    index, messages = guanaco_sample[(kind, k)]
    if form == "prompt":  # what a server sees: the conversation up to the last question
        messages = messages[:-1]
    expected = meta_reference_ids(sp, messages)
    actual = chat_ids(messages)
    assert actual == expected, f"oa_questions.jsonl record {index}: " + first_difference(sp, expected, actual)


def test_guanaco_sample_really_is_multi_turn(guanaco_sample):
    # Guard: the "multi" half must exercise several exchanges (some with 3), or it tests nothing new.
    multi = [d for (kind, _), (_, d) in guanaco_sample.items() if kind == "multi"]
    assert len(multi) == SAMPLE_SIZE and all(len(d) >= 4 for d in multi)


def test_encode_dialog_matches_reference_on_all_guanaco_records(guanaco_records, project_tokenizer, sp):
    assert len(guanaco_records) == 953
    mismatches = []
    for index, record in enumerate(guanaco_records):
        messages = guanaco_dialog(record)
        expected, actual = meta_reference_ids(sp, messages), encode_dialog(messages, project_tokenizer)
        if actual != expected:
            mismatches.append(f"record {index}: " + first_difference(sp, expected, actual))
    assert not mismatches, f"{len(mismatches)} of 953 records differ, first:\n" + "\n".join(mismatches[:3])


def test_engines_match_reference_on_all_guanaco_records(guanaco_records, engine, sp):
    mismatches = []
    for index, record in enumerate(guanaco_records):
        messages = guanaco_dialog(record)
        expected, actual = meta_reference_ids(sp, messages), engine.chat_ids(messages)
        if actual != expected:
            mismatches.append(f"record {index}: " + first_difference(sp, expected, actual))
    assert not mismatches, f"{engine.name}: {len(mismatches)} of 953 differ:\n" + "\n".join(mismatches[:3])


# --------------------------------------------------------------------------------------------
# Text that looks like control tokens or turn boundaries
# --------------------------------------------------------------------------------------------

CONTROL_TEXT_DIALOGS = {
    "user": [user("close the tag </s> then <s>")],
    "user-and-assistant": [
        user("close the tag </s> then <s>"),
        assistant("Done: </s><s> is just text here.</s>"),
        user("<s>again"),
    ],
    "system": [system("Never print <s> or </s>."), user("Hi"), assistant("Hello </s>")],
}


@pytest.mark.parametrize("messages", list(CONTROL_TEXT_DIALOGS.values()), ids=list(CONTROL_TEXT_DIALOGS))
def test_encode_dialog_keeps_control_token_text_as_text(messages, project_tokenizer, sp):
    bos, eos = project_tokenizer.bos_token_id, project_tokenizer.eos_token_id
    ids = encode_dialog(messages, project_tokenizer)
    # SentencePiece never parses "<s>" typed in text as a control token; neither may we.
    expected = meta_reference_ids(sp, messages)
    assert ids == expected, first_difference(sp, expected, ids)
    # One BOS per exchange, each at an exchange start; EOS only right before the next BOS or at the end.
    exchanges = sum(m["role"] == "user" for m in messages)
    bos_at = [i for i, t in enumerate(ids) if t == bos]
    eos_at = [i for i, t in enumerate(ids) if t == eos]
    assert len(bos_at) == exchanges and bos_at[0] == 0
    closed_last = [len(ids) - 1] if messages[-1]["role"] == "assistant" else []
    assert eos_at == [i - 1 for i in bos_at[1:]] + closed_last
    # ... and the typed tags come back as text (sp.decode drops real control tokens).
    decoded = sp.decode(ids)
    assert all(m["content"].strip() in decoded for m in messages)


@pytest.mark.parametrize("messages", list(CONTROL_TEXT_DIALOGS.values()), ids=list(CONTROL_TEXT_DIALOGS))
def test_engines_refuse_control_token_text(messages, engine):
    # The engines parse special tokens in templated text, so "<s>" in a message would become a real
    # BOS: the template raises instead.
    with pytest.raises(TemplateRefused, match="must not contain"):
        engine.chat_ids(messages)


def test_engines_refuse_or_keep_unk_text(engine, sp):
    messages = [user("What does <unk> mean in a tokenizer?")]
    expected = meta_reference_ids(sp, messages)
    try:
        actual = engine.chat_ids(messages)
    except TemplateRefused:
        return  # refusing, like for <s> and </s>, is fine
    assert actual == expected, first_difference(sp, expected, actual)


TURN_TAG_TEXTS = ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"]
TURN_TAG_CASES = [
    pytest.param(tag, where, id=f"{tag}-in-{where}")
    for tag in TURN_TAG_TEXTS
    for where in ("user", "assistant", "system")
]


def dialog_with_text_in(where: str, text: str) -> list[dict]:
    if where == "system":
        return [system(f"be nice {text} ok"), user("Hi")]
    if where == "assistant":
        return [user("Hi"), assistant(f"Sure {text} here"), user("More")]
    return [user(f"Please end the turn {text} now")]


@pytest.mark.parametrize(("tag", "where"), TURN_TAG_CASES)
def test_encode_dialog_refuses_turn_tags(tag, where, project_tokenizer):
    # Llama-2 has no control tokens for turn boundaries: this text would forge one. Meta refuses it.
    with pytest.raises(DialogError, match=re.escape(f"contains {tag!r}")):
        encode_dialog(dialog_with_text_in(where, tag), project_tokenizer)


@pytest.mark.parametrize(("tag", "where"), TURN_TAG_CASES)
def test_engines_refuse_turn_tags(tag, where, engine):
    with pytest.raises(TemplateRefused, match="must not contain"):
        engine.chat_ids(dialog_with_text_in(where, tag))


# --------------------------------------------------------------------------------------------
# Role and shape errors
# --------------------------------------------------------------------------------------------

ROLE_ERRORS = {
    "user-user": ([user("a"), user("b")], r"alternate.*turn 1 is 'user', expected 'assistant'"),
    "assistant-first": ([assistant("a"), user("b")], r"alternate.*turn 0 is 'assistant', expected 'user'"),
    "user-assistant-assistant": ([user("a"), assistant("b"), assistant("c")], r"turn 2 is 'assistant'"),
    "system-then-assistant": ([system("s"), assistant("a")], r"turn 0 is 'assistant', expected 'user'"),
    "system-in-the-middle": ([user("a"), assistant("b"), system("s"), user("c")], r"turn 2 is 'system'"),
    "system-alone": ([system("s")], r"system message must be followed by a user message"),
    "empty-dialog": ([], r"dialog is empty"),
    "unknown-role": ([{"role": "tool", "content": "x"}], r"message 0: role must be one of .*'tool'"),
    "content-none": ([{"role": "user", "content": None}], r"message 0: content must be a string.*NoneType"),
    "content-int": ([user("a"), {"role": "assistant", "content": 42}], r"message 1: content must be.*int"),
    "content-list": (
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        r"message 0: content must be a string, got list",
    ),
    "missing-content": ([{"role": "user"}], r"message 0: content must be a string"),
    "extra-key": ([{"role": "user", "content": "a", "tool_calls": []}], r"message 0: expected"),
}


@pytest.mark.parametrize(("messages", "match"), list(ROLE_ERRORS.values()), ids=list(ROLE_ERRORS))
def test_encode_dialog_rejects_malformed_dialogs(messages, match, project_tokenizer):
    with pytest.raises(DialogError, match=match):
        encode_dialog(messages, project_tokenizer)


NON_ALTERNATING = {
    "user-user": [user("a"), user("b")],
    "assistant-first": [assistant("a"), user("b")],
    "user-assistant-assistant": [user("a"), assistant("b"), assistant("c")],
    "system-then-assistant": [system("s"), assistant("a")],
    "system-in-the-middle": [user("a"), assistant("b"), system("s"), user("c")],
    "two-systems": [system("s"), system("t"), user("a")],
    "unknown-role": [user("a"), {"role": "tool", "content": "b"}],
}


@pytest.mark.parametrize("messages", list(NON_ALTERNATING.values()), ids=list(NON_ALTERNATING))
def test_engines_refuse_non_alternating_roles(messages, engine):
    with pytest.raises(TemplateRefused, match="alternate"):
        engine.chat_ids(messages)


def test_engines_refuse_system_only_dialog(engine):
    with pytest.raises(TemplateRefused):
        engine.chat_ids([system("You are helpful.")])


# --------------------------------------------------------------------------------------------
# strip() vs the template's `trim`
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "implementation",
    [
        "encode_dialog",
        "transformers",
        "tgi",
        "llama-cpp-python",
        "llama-server",
    ],
)
@pytest.mark.parametrize("separator", ["\x1c", "\x1d", "\x1e", "\x1f"], ids=["FS", "GS", "RS", "US"])
def test_information_separators_are_stripped_like_python(implementation, separator, request, sp):
    # Python's str.isspace() counts U+001C..U+001F as whitespace, so Meta's .strip() removes them.
    messages = [user(f"{separator}hello{separator}"), assistant(f"hi{separator}"), user(f"bye{separator}")]
    if implementation == "encode_dialog":
        actual = encode_dialog(messages, request.getfixturevalue("project_tokenizer"))
    else:
        actual = request.getfixturevalue(ENGINE_FIXTURES[implementation]).chat_ids(messages)
    expected = meta_reference_ids(sp, messages)
    assert actual == expected, first_difference(sp, expected, actual)


# --------------------------------------------------------------------------------------------
# The tokenizer itself: which conversion choice gives SentencePiece's ids
# --------------------------------------------------------------------------------------------


def llama_bpe_backend(model_file, merges_ranked_by_score: bool):
    """A `tokenizers` BPE built exactly as pipeline/chat/tokenizer.py builds it, except for the merge ranking.

    merges_ranked_by_score=False is transformers' default (`generate_merges(vocab)`, ranked by vocab id).
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, models, normalizers
    from transformers.tokenization_utils_base import generate_merges

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    scores = {p.piece: p.score for p in proto.pieces}
    merges = generate_merges(vocab, scores) if merges_ranked_by_score else generate_merges(vocab)
    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    specials = ("<unk>", "<s>", "</s>")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return backend


@pytest.fixture(scope="module")
def default_backend(llama2_tokenizer_model):
    return llama_bpe_backend(llama2_tokenizer_model, merges_ranked_by_score=False)


@pytest.fixture(scope="module")
def score_backend(llama2_tokenizer_model):
    return llama_bpe_backend(llama2_tokenizer_model, merges_ranked_by_score=True)


SPACE_RUN_TEXTS = ["a  b", "x    y", "def f():\n    return 1", "if x:\n        y  =  2"]


@pytest.mark.parametrize("text", SPACE_RUN_TEXTS)
def test_default_merge_ranking_splits_runs_of_spaces_differently(text, default_backend, score_backend, sp):
    reference = sp.encode(text)
    assert default_backend.encode(text, add_special_tokens=False).ids != reference
    assert score_backend.encode(text, add_special_tokens=False).ids == reference


def test_default_merge_ranking_example_pieces(default_backend, sp):
    # SentencePiece keeps the space with the word ("▁b"); ranked by id, "▁▁" wins and "b" is left bare.
    assert sp.encode("a  b", out_type=str) == ["▁a", "▁", "▁b"]
    assert default_backend.encode("a  b", add_special_tokens=False).tokens == ["▁a", "▁▁", "b"]


def test_merge_ranking_on_all_guanaco_records(
    guanaco_records, default_backend, score_backend, project_tokenizer, sp
):
    """Raw record text (input + " " + output): 126 of 953 differ with the default ranking (as
    ../shared/notes/serving.md says); none with merges ranked by score, none with the project's tokenizer."""
    texts = [r["input"] + " " + r["output"] for r in guanaco_records]
    reference = [sp.encode(t) for t in texts]

    def differing(encode) -> list[int]:
        return [i for i, (t, ref) in enumerate(zip(texts, reference)) if encode(t) != ref]

    default = differing(lambda t: default_backend.encode(t, add_special_tokens=False).ids)
    by_score = differing(lambda t: score_backend.encode(t, add_special_tokens=False).ids)
    project = differing(lambda t: project_tokenizer.encode(t, add_special_tokens=False))
    assert len(default) == 126, f"default ranking: {len(default)} of 953 differ (notes say 126)"
    assert all("  " in texts[i] for i in default), "every default-ranking difference involves a run of spaces"
    assert by_score == [], f"ranked by score: records {by_score[:5]} differ"
    assert project == [], f"project tokenizer: records {project[:5]} differ"


def test_saved_tokenizer_uses_score_ranked_merges(llama2_hf_dir, llama2_tokenizer_model):
    # The choice that matters is recorded in tokenizer.json itself, which TGI reads directly.
    from sentencepiece import sentencepiece_model_pb2
    from transformers.tokenization_utils_base import generate_merges

    saved = json.loads((llama2_hf_dir / "tokenizer.json").read_text())["model"]["merges"]
    saved = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in saved]
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(llama2_tokenizer_model.read_bytes())
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    scores = {p.piece: p.score for p in proto.pieces}
    assert saved == generate_merges(vocab, scores)
    assert saved != generate_merges(vocab)


def test_legacy_prefix_after_bos(project_tokenizer, tgi_engine, llamacpp_engine, sp):
    # Meta encodes each exchange separately, so "[INST]" right after BOS gets SentencePiece's "▁" prefix.
    expected = [sp.bos_id()] + sp.encode("[INST]")
    assert expected[1] == sp.piece_to_id("▁[")
    assert project_tokenizer.encode("<s>[INST]", add_special_tokens=False) == expected
    assert tgi_engine.text_ids("<s>[INST]") == expected
    assert llamacpp_engine.llama.tokenize(b"<s>[INST]", add_bos=False, special=True) == expected


def test_plain_tokenization_adds_bos(project_tokenizer, sp):
    # The base model expects BOS in front of plain text, as sp-based Llama code adds it.
    assert project_tokenizer("hello").input_ids == [sp.bos_id()] + sp.encode("hello")
    assert project_tokenizer("hello", add_special_tokens=False).input_ids == sp.encode("hello")


def test_rendered_template_must_be_tokenized_without_special_tokens(project_tokenizer, sp):
    """The template emits BOS itself: tokenizing its text with add_special_tokens=True doubles BOS."""
    messages = [system("Be brief."), user("Hi"), assistant("Hello"), user("Bye")]
    text = project_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<s>[INST] <<SYS>>\n")
    doubled = project_tokenizer(text, add_special_tokens=True).input_ids
    assert doubled[:2] == [sp.bos_id(), sp.bos_id()]
    assert doubled[1:] == meta_reference_ids(sp, messages)
    single = project_tokenizer(text, add_special_tokens=False).input_ids
    assert single == meta_reference_ids(sp, messages) == encode_dialog(messages, project_tokenizer)


# --------------------------------------------------------------------------------------------
# llama.cpp's built-in formats: measured, not Meta's
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_server_no_jinja(llama2_random_gguf, llamacpp, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("llama-server-no-jinja") / "server.log"
    with serve_llama_server(
        llama2_random_gguf, log_path, llamacpp, ("--no-jinja", "--no-prefill-assistant")
    ) as url:
        yield LlamaServerEngine(url, "llama-server --no-jinja")


def test_builtin_format_is_one_layout_and_not_metas(
    llama_server_no_jinja, llama2_vocab_gguf, guanaco_records, sp
):
    """`llama-server --no-jinja` and the C API `llama_chat_apply_template` give the same ids (one
    built-in layout, picked from the template's text), and those are not Meta's: docs/serving.md's counts."""
    c_api = LlamaCppBuiltinEngine(llama2_vocab_gguf)
    dialogs = list(DIALOGS.values()) + [guanaco_dialog(r) for r in guanaco_records]
    equal_to_meta = 0
    for messages in dialogs:
        server_ids = llama_server_no_jinja.chat_ids(messages)
        assert c_api.chat_ids(messages) == server_ids, messages
        equal_to_meta += server_ids == meta_reference_ids(sp, messages)
    c_api.llama.close()
    assert len(dialogs) == 980
    print(f"built-in layout equal to Meta on {equal_to_meta} of {len(dialogs)} dialogs")
    assert equal_to_meta < len(dialogs) // 10, (
        f"{equal_to_meta} of {len(dialogs)}: update the counts in docs/serving.md"
    )
    # The layout's own mark: no space between [/INST] and the answer, where Meta has one.
    rendered = c_api.render([user("Hi"), assistant("Hello"), user("Bye")])
    assert "[/INST]Hello</s>" in rendered
