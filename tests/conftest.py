import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "qkv",
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("qkv")


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: tiny models gain nothing from a second one, and on a shared machine the
    fork-join waits dominate. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
