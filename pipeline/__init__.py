"""QLoRA fine-tune-to-serve pipeline."""

import os
import sys

# Nothing leaves the machine unless the user asks: huggingface_hub's telemetry (which trl's trainers
# send on creation) is off unless the environment opts in with HF_HUB_DISABLE_TELEMETRY=0. Set here,
# before huggingface_hub is imported, because it reads the variable once, at import.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Progress bars only on a terminal (tqdm's convention, which pipeline.run.progress follows): the Hugging
# Face libraries draw theirs (loading weights, ...) into pipes and logs too unless told not to.
if not sys.stderr.isatty():
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
