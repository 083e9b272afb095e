import pytest

from helpers import tiny_vit


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs the CLI, torchrun, a kill-and-resume, a demo, a benchmark script or a "
                                       "tour in a subprocess (make test runs them; pytest -m 'not slow' skips them)")


@pytest.fixture
def vit():
    return tiny_vit()
