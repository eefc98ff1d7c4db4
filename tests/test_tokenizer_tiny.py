"""The project's tokenizer trained from scratch (what `experiment=tiny` does), held to SentencePiece.

A Llama-style SentencePiece BPE is trained on a few hundred generated chat lines, turned into the
project's transformers tokenizer, and must give raw SentencePiece's ids: for special tokens, for
unseen text through byte fallback, and for whole dialogs in Meta's chat encoding.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import sentencepiece as spm

from pipeline.chat.format import encode_dialog
from pipeline.chat.synthetic import make_rows
from pipeline.chat.tokenizer import build_tokenizer, load_sentencepiece_proto, train_sentencepiece
from pipeline.models.tiny import tokenizer_corpus

VOCAB_SIZE = 512


def meta_reference_ids(sp: spm.SentencePieceProcessor, messages: list[dict]) -> list[int]:
    """Meta's `Llama.chat_completion` encoding on raw SentencePiece (independent of pipeline.chat.format)."""
    dialog = [dict(m) for m in messages]
    if dialog[0]["role"] == "system":  # folded into the first user turn, system text not stripped
        folded = f"<<SYS>>\n{dialog[0]['content']}\n<</SYS>>\n\n{dialog[1]['content']}"
        dialog = [{"role": "user", "content": folded}] + dialog[2:]
    ids: list[int] = []
    for user, answer in zip(dialog[::2], dialog[1::2]):
        text = f"[INST] {user['content'].strip()} [/INST] {answer['content'].strip()} "
        ids += [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]
    if len(dialog) % 2 == 1:
        ids += [sp.bos_id()] + sp.encode(f"[INST] {dialog[-1]['content'].strip()} [/INST]")
    return ids


def first_difference(sp, expected: list[int], actual: list[int]) -> str:
    shorter = min(len(expected), len(actual))
    at = next((i for i, (a, b) in enumerate(zip(expected, actual)) if a != b), shorter)
    lo, hi = max(0, at - 4), at + 6

    def show(ids):
        return [sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else f"<id {i}>" for i in ids]

    return f"first difference at token {at}: reference {show(expected[lo:hi])} vs got {show(actual[lo:hi])}"


@pytest.fixture(scope="module")
def synthetic_rows():
    cfg = SimpleNamespace(num_facts=24, train_rows=300, eval_rows=24)
    train_rows, eval_rows = make_rows(cfg, system_prompt=None, seed=0)
    return train_rows, eval_rows


@pytest.fixture(scope="module")
def tiny_model_file(synthetic_rows, tmp_path_factory):
    train_rows, _ = synthetic_rows
    out = tmp_path_factory.mktemp("tiny-tokenizer") / "tokenizer.model"
    train_sentencepiece(tokenizer_corpus(train_rows), VOCAB_SIZE, out)
    return out


@pytest.fixture(scope="module")
def tiny_sp(tiny_model_file):
    return spm.SentencePieceProcessor(model_file=str(tiny_model_file))


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_file):
    return build_tokenizer(tiny_model_file)


def test_training_corpus_is_a_few_hundred_chat_lines(synthetic_rows):
    train_rows, _ = synthetic_rows
    corpus = tokenizer_corpus(train_rows)
    assert 300 <= len(corpus) <= 2000
    assert any(line.startswith("[INST] ") and line.endswith(" [/INST]") for line in corpus)


def test_trained_model_is_llama_style(tiny_model_file, tiny_sp):
    proto = load_sentencepiece_proto(tiny_model_file)  # accepts its own output
    assert proto.trainer_spec.model_type == proto.trainer_spec.BPE
    assert proto.trainer_spec.byte_fallback
    assert proto.normalizer_spec.add_dummy_prefix and not proto.normalizer_spec.remove_extra_whitespaces
    # all 256 byte pieces exist, so no text ever needs <unk>
    assert all(tiny_sp.piece_to_id(f"<0x{b:02X}>") != tiny_sp.unk_id() for b in range(256))
    assert 256 < tiny_sp.get_piece_size() <= VOCAB_SIZE


def test_special_token_ids(tiny_sp, tiny_tokenizer):
    assert (tiny_sp.unk_id(), tiny_sp.bos_id(), tiny_sp.eos_id()) == (0, 1, 2)
    assert [tiny_sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    tok = tiny_tokenizer
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tiny_tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert len(tiny_tokenizer) == tiny_sp.get_piece_size()


def test_plain_tokenization_adds_bos_only(tiny_tokenizer, tiny_sp):
    text = "What is the capital of Kaloru?"
    assert tiny_tokenizer(text).input_ids == [1] + tiny_sp.encode(text)
    assert tiny_tokenizer(text, add_special_tokens=False).input_ids == tiny_sp.encode(text)


UNSEEN_TEXTS = {
    "llama-emoji": "🦙",
    "zwj-family": "👩‍👩‍👧‍👦 family",
    "flag": "🏳️‍🌈",
    "cjk": "日本語の首都",
    "greek-accents": "Ωμέγα café naïve",
    "rtl": "שלום مرحبا",
    "control-and-tab": "a\tb\x07c",
}


@pytest.mark.parametrize("text", list(UNSEEN_TEXTS.values()), ids=list(UNSEEN_TEXTS))
def test_byte_fallback_round_trips_unseen_unicode(text, tiny_tokenizer, tiny_sp):
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert ids == tiny_sp.encode(text), first_difference(tiny_sp, tiny_sp.encode(text), ids)
    assert tiny_tokenizer.unk_token_id not in ids  # bytes, never <unk>
    assert any(tiny_sp.is_byte(i) for i in ids)  # the corpus is ASCII: these chars need byte pieces
    assert tiny_tokenizer.decode(ids) == text
    assert tiny_sp.decode(ids) == text


def test_emoji_is_encoded_as_its_utf8_bytes(tiny_tokenizer):
    ids = tiny_tokenizer.encode("🦙", add_special_tokens=False)
    byte_pieces = [t for t in tiny_tokenizer.convert_ids_to_tokens(ids) if t.startswith("<0x")]
    assert bytes(int(t[3:5], 16) for t in byte_pieces) == "🦙".encode()


def test_encode_dialog_matches_reference_on_synthetic_dialogs(synthetic_rows, tiny_tokenizer, tiny_sp):
    train_rows, eval_rows = synthetic_rows
    dialogs = [row["messages"] for row in train_rows + eval_rows]
    dialogs += [d[:-1] for d in dialogs]  # the same conversations as prompts (open last user turn)
    assert any(d[0]["role"] == "system" for d in dialogs) and any(len(d) >= 4 for d in dialogs)
    mismatches = []
    for index, messages in enumerate(dialogs):
        expected, actual = meta_reference_ids(tiny_sp, messages), encode_dialog(messages, tiny_tokenizer)
        if actual != expected:
            mismatches.append(f"dialog {index}: " + first_difference(tiny_sp, expected, actual))
    assert not mismatches, f"{len(mismatches)} of {len(dialogs)} differ:\n" + "\n".join(mismatches[:3])


HAND_WRITTEN = {
    "system-empty": [
        {"role": "system", "content": ""},
        {"role": "user", "content": "What is the capital of Kaloru?"},
    ],
    "system-whitespace-unicode": [
        {"role": "system", "content": "\n  Réponds en français 🇫🇷  \n"},
        {"role": "user", "content": "  Quelle est la capitale ?\t"},
        {"role": "assistant", "content": "La capitale est Zelny. 🦙 "},
    ],
    "spaces-and-control-text": [
        {"role": "user", "content": "a  b   c\n    indented </s> <s>"},
        {"role": "assistant", "content": "x     y"},
        {"role": "user", "content": "日本?"},
    ],
}


@pytest.mark.parametrize("messages", list(HAND_WRITTEN.values()), ids=list(HAND_WRITTEN))
def test_encode_dialog_matches_reference_on_hand_written_dialogs(messages, tiny_tokenizer, tiny_sp):
    expected, actual = meta_reference_ids(tiny_sp, messages), encode_dialog(messages, tiny_tokenizer)
    assert actual == expected, first_difference(tiny_sp, expected, actual)


NOT_SENTENCEPIECE = {
    "text": b"hello world, this is not a model\n",
    "json": b'{"version": "1.0", "model": {"type": "BPE"}}',
    "binary": bytes(range(256)) * 4,
}


@pytest.mark.parametrize("content", list(NOT_SENTENCEPIECE.values()), ids=list(NOT_SENTENCEPIECE))
def test_load_sentencepiece_proto_rejects_non_sentencepiece_file(content, tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a SentencePiece model") as err:
        load_sentencepiece_proto(path)
    assert str(path) in str(err.value)
    # ... and so build_tokenizer refuses it too
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        build_tokenizer(path)


def test_load_sentencepiece_proto_rejects_unigram_model(synthetic_rows, tmp_path):
    # A valid SentencePiece file, but not Llama-style BPE: the converter would build the wrong merges.
    path = tmp_path / "unigram.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus(synthetic_rows[0])),
        model_prefix=str(tmp_path / "unigram"),
        model_type="unigram",
        vocab_size=200,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    with pytest.raises(ValueError, match="expected a BPE SentencePiece model") as err:
        load_sentencepiece_proto(path)
    assert str(path) in str(err.value)
