"""The install layout: tpo.kernels and tpo.registry come from kernels/ and
registry/, after a plain install too, from any directory, including the
repository root (where ./tpo shadows the installed package)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = "import tpo, tpo.registry, tpo.kernels; from tpo.registry import build_model; print(tpo.registry.__file__)"


@pytest.fixture(scope="module")
def plain_install(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    return target


def _probe(cwd, pythonpath):
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.strip())


def test_plain_install_layout(plain_install):
    for name in ("registry/__init__.py", "registry/build.py", "kernels/__init__.py", "models/mllm.py", "cli.py"):
        assert (plain_install / "tpo" / name).is_file(), name


def test_plain_install_imports_from_another_directory(plain_install, tmp_path):
    assert _probe(tmp_path, plain_install).is_relative_to(plain_install)


def test_imports_from_repository_root(plain_install):
    # ./tpo comes first on sys.path here: its sub-packages must still resolve.
    assert _probe(ROOT, plain_install) == ROOT / "registry" / "__init__.py"
