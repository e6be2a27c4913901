"""The one error family. Every error a user can cause derives from :class:`VlmtuneError`; the CLI catches that
base and prints the message as one readable error (exit code 2), so a new error class can never escape as a
traceback. A message says what is wrong, where (key path, file, line), and how to fix it.

:class:`SampleError` is not among them: it marks one bad sample, which is skipped and counted, never shown alone.
"""

from __future__ import annotations


class VlmtuneError(Exception):
    """A problem the user can fix (a recipe value, a file, a model folder, the data)."""


class RecipeError(VlmtuneError, ValueError):
    """Every problem with a recipe, one per line."""


class DataError(VlmtuneError, ValueError):
    """A problem with a whole dataset (missing column, unknown format, unreachable source)."""


class ModelLoadError(VlmtuneError, RuntimeError):
    """A model, config or processor that cannot be loaded."""


class FamilyError(VlmtuneError, ValueError):
    """A model type vlmtune's family table does not describe."""


class AdapterError(VlmtuneError, ValueError):
    """A LoRA / QLoRA / adapter-folder setup that cannot work, with what to change."""


class GradientCheckError(VlmtuneError, RuntimeError):
    """A trainable parameter that gets no gradient (or a frozen one that gets one)."""


class PackingError(VlmtuneError, ValueError):
    """train.packing was asked for a model where it cannot be exact."""


class DistributedError(VlmtuneError, RuntimeError):
    """A distributed setting that cannot work, or a rank that failed."""


class CheckpointError(VlmtuneError, ValueError):
    """A checkpoint that cannot be used, or a resume setting that cannot be honoured."""


class OutputError(VlmtuneError, OSError):
    """The output folder cannot be used: taken by another run, read-only, not a folder, or out of space."""


class TrainingError(VlmtuneError, RuntimeError):
    """Training cannot go on (e.g. too many NaN/inf steps in a row)."""


class KernelError(VlmtuneError, RuntimeError):
    """train.kernels asks for kernels that cannot run here."""


class ExportError(VlmtuneError, ValueError):
    """An export that cannot be done as asked."""


class GenerateError(VlmtuneError, ValueError):
    """Bad generation inputs (a missing image, no model to use)."""


class SampleError(Exception):
    """One bad sample: the caller skips it and counts it under ``reason``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
