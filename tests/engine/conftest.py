"""The engine tests import their tiny data and collate helpers from
``engine_testkit`` next to this file (pytest runs with --import-mode=importlib,
which puts no test folder on sys.path)."""
import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny models run fastest on one intra-op thread (a loaded 2-core
    machine makes two threads spin against each other); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
