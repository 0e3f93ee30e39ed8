import json

import pytest
import torch

import finegrain


@pytest.fixture(scope="session")
def tiny128():
    """A tiny Llama whose K (128, 192) is a multiple of 64 (compressed-tensors groups must divide K) and of
    32 (llama.cpp blocks): ``(compile(recipe), cached per recipe; inputs(n): 1 x n token ids; the model)``."""
    from finegrain.models.tiny import tiny_llama

    gen = torch.Generator().manual_seed(3)
    model = tiny_llama(seed=0, hidden=128)
    example = (torch.randint(0, 256, (1, 16), generator=gen),)
    calib = [(torch.randint(0, 256, (1, 32), generator=gen),) for _ in range(4)]
    after_calib = gen.get_state()
    cache = {}

    def get(recipe):
        key = recipe if isinstance(recipe, str) else json.dumps(recipe, sort_keys=True)
        if key not in cache:
            cache[key] = finegrain.compile(model, example, recipe=recipe, calibration=calib, progress=False)
        return cache[key]

    def inputs(n: int) -> torch.Tensor:
        g = torch.Generator()
        g.set_state(after_calib)
        return torch.randint(0, 256, (1, n), generator=g)

    return get, inputs, model
