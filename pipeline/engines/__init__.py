"""The serving engines and llama.cpp's tools, each in its own module.

- `llamacpp`: one llama.cpp commit for the converter, quantizer, bindings and server (`build`).
- `gguf`: converting, quantizing and checking GGUF files with llama.cpp's tools.
- `serving`: servers on 127.0.0.1 (llama-server, vLLM), started, talked to and always stopped.
- `vllm`: vLLM's CPU build in its own environment (`setup`).
- `tgi`: TGI's client and live checks, where a container engine can run it.
- `ollama`: the Modelfile written next to each GGUF.
- `encoding`: how each engine turns a chat into token ids, with the engine's own parts.
"""
