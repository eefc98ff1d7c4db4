"""Chats and their token ids: the chat format, the tokenizer, and the rows they come from.

- `format`: the Llama-2 chat format, Meta's ids for a dialog (the reference every engine is held to).
- `tokenizer`: building, training and saving tokenizers so every engine agrees.
- `examples`: training and eval examples, cut to a length limit by one rule.
- `rows`: reading row files (jsonl, json, parquet) with each row's location, writing jsonl.
- `synthetic`: the generated fact-recall chat task the tiny runs learn.
"""
