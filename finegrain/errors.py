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


def listed(problems: list[str], shown: int = 3) -> str:
    """``problems`` (each ``"where: why"``) one line per reason, the places sharing a reason named
    together (the first ``shown`` of them and how many more), in first-seen order."""
    by_why: dict[str, list[str]] = {}
    for p in problems:
        where, sep, why = p.partition(": ")
        if not sep:
            where, why = "", p
        by_why.setdefault(why, []).append(where)
    lines = []
    for why, places in by_why.items():
        places = [w for w in places if w]
        if not places:
            lines.append(why)
            continue
        more = f" and {len(places) - shown} more" if len(places) > shown else ""
        lines.append(f"{', '.join(places[:shown])}{more}: {why}")
    return "\n  ".join(lines)
