"""Errors a user can act on. Each message says what was wrong, where, and what to do."""


class FinegrainError(Exception):
    """Base class of finegrain's user-facing errors."""


class InputError(FinegrainError, ValueError):
    """Bad user input: inputs, calibration data, weights, paths."""


class CaptureError(FinegrainError):
    """``torch.export`` could not capture the model."""


class RecipeError(FinegrainError, ValueError):
    """A malformed recipe or unknown preset; the message names the field."""


class ArtifactError(FinegrainError):
    """A missing, corrupted or incompatible artifact."""


class ExportError(FinegrainError):
    """A graph, layer or format that an export target (ONNX, compressed-tensors, GGUF) cannot hold;
    the message names the layer / tensor and the format."""
