"""The algorithm tests share the engine tests' tiny data and collate helpers
(``tests/engine/engine_testkit.py``)."""
import sys
from pathlib import Path

KIT = str(Path(__file__).resolve().parents[1] / "engine")
if KIT not in sys.path:
    sys.path.insert(0, KIT)
