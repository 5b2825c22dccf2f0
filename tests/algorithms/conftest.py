"""The algorithm tests share the engine tests' tiny data and collate helpers
(``tests/engine/engine_testkit.py``)."""
import sys
from pathlib import Path

KIT = str(Path(__file__).resolve().parents[1] / "engine")
if KIT not in sys.path:
    sys.path.insert(0, KIT)

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
