"""Choose a QuantFormat for every quantizable weight and activation.

Today: from the recipe's rules (last matching rule wins; see ``compiler/recipe.py``). Search
under a bit / byte budget (issue #5) will plug in here with the same outputs.

Requires: nothing. Ensures: each quantizable op carries ``meta[ROLE]`` and, where the recipe
quantizes it, ``meta[WEIGHT_FORMAT]`` / ``meta[ACT_FORMAT]``. A rule that would quantize what
the formats do not cover yet (weights of matmul/conv ops, whose layouts are not ``[N, K]``;
activations of anything but a linear) is refused with the op's name rather than done wrong.
"""
from __future__ import annotations

from torch.fx import GraphModule

from finegrain.compiler.ir import ACT_FORMAT, ROLE, WEIGHT_FORMAT, get_tensor, quantizable_ops
from finegrain.errors import RecipeError


def allocate_bits(gm: GraphModule, ctx) -> GraphModule:
    for op in quantizable_ops(gm):
        op.node.meta[ROLE] = op.role
        wfmt, afmt = ctx.recipe.formats_for(op.role, op.name)
        if (wfmt is not None or afmt is not None) and op.kind not in ("linear", "embedding"):
            raise RecipeError(f"{op.name}: the recipe quantizes this {op.kind} op, which finegrain does not "
                              "support yet; narrow the rule's role/pattern to linear layers")
        if wfmt is not None and op.weight is not None:
            w = get_tensor(gm, op.weight.target)
            if w.dim() != 2:
                raise RecipeError(f"{op.name}: weight {op.weight_fqn} has shape {tuple(w.shape)}; weight formats "
                                  "cover 2-D [N, K] weights only")
            op.node.meta[WEIGHT_FORMAT] = wfmt
        if afmt is not None and op.kind != "embedding":  # an embedding's input is token ids
            op.node.meta[ACT_FORMAT] = afmt
    return gm
