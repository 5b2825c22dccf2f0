"""tpo: Task Preference Optimization and RLAIF for multimodal LLMs."""
import os as _os

__version__ = "0.1.0"

# In the source tree, ``tpo.kernels`` and ``tpo.registry`` live in the top-level
# folders ``kernels/`` and ``registry/`` (setup.py maps them). When ``tpo`` is
# imported from the source tree -- an editable install, or any install while
# the working directory is the repository root, where ``./tpo`` shadows the
# installed package -- let the sub-package search see those folders too.
_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "registry")) and all(
    _os.path.isfile(_os.path.join(_root, name, "__init__.py")) for name in ("kernels", "registry")
):
    __path__.append(_root)  # noqa: F821 -- the package's own __path__
