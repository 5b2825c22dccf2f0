"""The model tests import the tiny SAM2 config from ``sam2_testkit`` next to
this file (pytest runs with --import-mode=importlib, which puts no test folder
on sys.path)."""
import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
