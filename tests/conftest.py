"""Shared test fixtures: offline mode, tiny randomly initialised models of every supported family, and the markers'
behaviour (`gpu` tests skip without CUDA; in CI a missing embedded model fails instead of skipping)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny import HAYSTACK, TINY_ARCHS, make_tiny_model, make_tiny_tokenizer  # noqa: E402,F401

pytest_plugins = ["pytester"]  # tests/test_infra.py runs these hooks in an inner session


def in_ci() -> bool:
    """CI sets `CI=true` (GitHub Actions, GitLab, ...): there a skipped real-model test would hide a broken wheel."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def left_out() -> set[str]:
    """Optional dependencies a CI run leaves out on purpose (`TRL_RETMASK_LEFT_OUT=vllm`, comma-separated): .ci/run's
    top-of-range run has no vLLM, whose releases cap transformers below the newest (docs/testing.md)."""
    return {name.strip() for name in os.environ.get("TRL_RETMASK_LEFT_OUT", "").split(",") if name.strip()}


def skip_unless_ci(reason: str, dependency: str | None = None):
    """Skip locally, fail in CI: for tests whose only reason to skip is a missing embedded model or `dependency` (in CI
    they skip only where the run declares `dependency` left out, with the reason)."""
    if dependency is not None and dependency in left_out():
        pytest.skip(f"{reason}; left out of this run on purpose (TRL_RETMASK_LEFT_OUT={dependency})")
    if in_ci():
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests skip cleanly where CUDA is not available, whatever else they are marked with."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
    """The real embedded model (SmolLM2-135M-Instruct), converted once.

    Without the wheel its tests skip locally; in CI (`CI=true`) they fail, so a broken wheel cannot turn CI green."""
    from trl_retmask.models import DEFAULT_MODEL, load_model_and_tokenizer

    try:
        return load_model_and_tokenizer(DEFAULT_MODEL)
    except ImportError as e:  # pragma: no cover - the README's set-up installs it
        skip_unless_ci(f"the embedded model cannot be loaded: {e}")


@pytest.fixture
def hay_dir(tmp_path):
    """A haystack directory with one small text file of tiny-vocabulary words."""
    d = tmp_path / "hay"
    d.mkdir()
    (d / "a.txt").write_text(HAYSTACK)
    return d
