"""The tiny Llama's 14 linears by name pattern, for tests that spread several formats over one
model (one build or export holding every format, each linear checked against its own)."""
from itertools import cycle

LINEARS = [f"layers\\.{i}\\.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                            "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                            "mlp.down_proj")]


def cycled(items: list) -> list[tuple[str, object]]:
    """(pattern, item) for each of the 14 linears, the items repeated in order: item ``i`` lands on
    linears ``i``, ``i + len(items)``, ...; the ``down_proj`` (96 input features, the others 64) are
    linears 6 and 13."""
    return list(zip(LINEARS, cycle(items)))


def weight_name(pattern: str) -> str:
    """The weight's name of the linear a :data:`LINEARS` pattern names."""
    return "model." + pattern.replace("\\", "") + ".weight"
