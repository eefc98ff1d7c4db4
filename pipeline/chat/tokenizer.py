"""How the project builds, trains and saves Llama-style tokenizers so that every engine agrees.

Every tokenizer starts from a SentencePiece `tokenizer.model` (Meta's, or one trained here) and is
turned into a `tokenizers` BPE that gives SentencePiece's ids exactly:
- merges ranked by piece score, which is how SentencePiece BPE merges. transformers' default
  conversion ranks them by vocab id and then splits runs of spaces differently (126 of the 953
  guanaco records in ../shared differ); ranked by score, none differ.
- legacy prefixing: a "▁" is prepended to every text segment, also right after `<s>`, as Meta's
  per-exchange `sp.encode` and llama.cpp do. transformers 5's non-legacy default does not prefix
  after a special token, and then `<s>[INST]` no longer tokenizes like Meta's `[BOS] + [INST]`.
The saved directory holds `tokenizer.json` (transformers, TGI), the original `tokenizer.model`
(llama.cpp's converter reads it) and a `tokenizer_config.json` carrying the chat template.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from pipeline.chat.format import LLAMA2_CHAT_TEMPLATE
from pipeline.run.errors import DataError

UNK, BOS, EOS = "<unk>", "<s>", "</s>"


def load_sentencepiece_proto(model_file: str | Path):
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(model_file).read_bytes())
    except DecodeError as err:
        raise DataError(f"{model_file}: not a SentencePiece model ({err})") from err
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        raise DataError(f"{model_file}: expected a BPE SentencePiece model (Llama-style)")
    pieces = [p.piece for p in proto.pieces]
    if pieces[:3] != [UNK, BOS, EOS]:
        raise DataError(f"{model_file}: expected unk/bos/eos = 0/1/2, got {pieces[:3]}")
    return proto


def build_tokenizer(model_file: str | Path):
    """A transformers tokenizer with SentencePiece's ids and the Llama-2 chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    proto = load_sentencepiece_proto(model_file)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    scores = {p.piece: p.score for p in proto.pieces}
    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=generate_merges(vocab, scores),  # ranked by score, as SentencePiece merges
            unk_token=UNK,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (UNK, BOS, EOS)])
    # Plain `tokenizer(text)` adds BOS like the base model expects; chat text is always
    # tokenized with add_special_tokens=False because the template emits BOS itself.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        # Pad is not EOS: padding is masked out of the loss, and EOS must stay a learned target.
        pad_token=UNK,
        chat_template=LLAMA2_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )


def save_tokenizer(tokenizer, model_file: str | Path, out_dir: str | Path) -> None:
    """Save so that transformers, TGI and llama.cpp's converter all read the same tokenizer."""
    out_dir = Path(out_dir)
    # The template goes into tokenizer_config.json, where TGI and llama.cpp's converter look.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    if Path(model_file).resolve() != (out_dir / "tokenizer.model").resolve():
        shutil.copyfile(model_file, out_dir / "tokenizer.model")
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    # Read by llama.cpp's converter: the GGUF must add BOS like Meta's encoding; never EOS.
    config.update(add_bos_token=True, add_eos_token=False, legacy=True)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def load_tokenizer(directory: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out_file: str | Path) -> None:
    """Train a Llama-style SentencePiece BPE (byte fallback, unk/bos/eos = 0/1/2) on `texts`."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        # Llama-2's own settings (read from its tokenizer.model's trainer/normalizer spec).
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,  # BPE training is deterministic; one thread keeps it so
        minloglevel=2,
    )
    Path(out_file).write_bytes(model.getvalue())
