"""What the pipeline proves about a model, and how it measures it.

- `parity`: does an engine feed the model Meta's token ids? (the fixed dialog suite)
- `fidelity`: next-token distributions of one artifact against another (KL, top-1, perplexity).
- `answering`: a served model's answers to the eval questions, scored.
- `loadcheck`: many concurrent requests to one server: ids, EOS, no cross-talk, latency.
- `evaluate`: greedy answers of a transformers model, before and after training.
"""
