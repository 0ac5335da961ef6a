"""The test set-up itself (the root conftest.py): what a machine with a GPU makes of it."""

from pathlib import Path

PRETEND_GPU_TESTS = '''
import pytest
import torch

torch.cuda.is_available = lambda: True  # a machine with a GPU, from collection on


def test_cpu_test():
    assert torch.cuda.is_available() is False


@pytest.mark.gpu
def test_gpu_test():
    assert torch.cuda.is_available() is True
'''


def test_on_a_gpu_machine_gpu_tests_run_and_the_others_see_no_gpu(pytester):
    """So that the CPU tests check the same thing on a GPU machine as in CI (a command left to pick
    its device would otherwise pick CUDA and bf16), while the gpu-marked tests are not skipped."""
    conftest = Path(__file__).resolve().parents[1] / "conftest.py"
    pytester.makeconftest(conftest.read_text())
    pytester.makepyfile(test_pretend_gpu=PRETEND_GPU_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:benchmark")
    result.assert_outcomes(passed=2)
