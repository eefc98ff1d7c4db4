"""The project's own errors. `python -m pipeline` reports these as one line naming the file, key or
stage and what was expected; any other exception is a bug or an environment failure (CUDA out of
memory, NCCL, a library's own error) and is logged with its whole traceback.

Each also derives from the built-in error it refines, so callers that catch ValueError or
FileNotFoundError keep working.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base of every error the pipeline raises on purpose."""


class ConfigError(PipelineError, ValueError):
    """A config key holds a value the project or a library refuses; the message names the key."""


class DataError(PipelineError, ValueError):
    """An input file is not what was expected; the message names the file (and line or row)."""


class MissingInput(PipelineError, FileNotFoundError):
    """A stage's input is not on disk; the message says which stage makes it."""


class MergeError(PipelineError, ValueError):
    """The adapter cannot be merged into this base, or the merge failed its self-check."""


class GGUFCheckError(PipelineError, ValueError):
    """A GGUF would not serve the project's chat format with Meta's ids."""


class CheckFailed(PipelineError, RuntimeError):
    """A measured check fell below its floor (fidelity ladder, smoke)."""


class ToolFailed(PipelineError, RuntimeError):
    """An external program (converter, quantizer, server) failed; the message carries its output."""
