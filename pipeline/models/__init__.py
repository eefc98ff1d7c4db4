"""Models: loading them, building the tiny ones, writing their weights, describing them.

- `load`: the 4-bit NF4 base, the base with its adapter, full-precision checkpoints.
- `tiny`: the offline tiny Llama (and the random base at Llama-2-7B's shape).
- `shards`: safetensors shards written one at a time.
- `card`: the model card.
"""
