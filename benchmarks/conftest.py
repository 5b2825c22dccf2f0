"""pytest setup of the benchmarks (not part of CI: ``testpaths`` is ``tests``).

* ``benchkit`` importable: ``--import-mode=importlib`` puts no folder on ``sys.path``.
* ``bench_*.py`` collected when the folder is given (``pytest benchmarks/``); the
  project's ``python_files`` only names ``test_*.py``.

    pytest benchmarks/ --benchmark-enable                 # every benchmark, timings on
    pytest benchmarks/ -k "cpu and 1024"                  # a selection, run once (timings off by default)
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)


def pytest_collect_file(file_path: Path, parent):
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path):  # named on the command line: pytest's python plugin collects it
        return None
    ihook = parent.session.gethookproxy(file_path)
    return ihook.pytest_pycollect_makemodule(module_path=file_path, parent=parent)
