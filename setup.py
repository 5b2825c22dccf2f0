"""Install tpo: the packages ``tpo``, ``tpo.kernels`` (from ``kernels/``) and
``tpo.registry`` (from ``registry/``)."""
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def find_packages_under(directory: str, package: str) -> list[str]:
    """Every package below ``directory``, named as it is installed."""
    found = []
    for init in sorted((ROOT / directory).rglob("__init__.py")):
        rel = init.parent.relative_to(ROOT / directory)
        found.append(".".join((package, *rel.parts)) if rel.parts else package)
    return found


packages = (
    find_packages_under("tpo", "tpo")
    + find_packages_under("kernels", "tpo.kernels")
    + find_packages_under("registry", "tpo.registry")
)
package_dir = {"tpo": "tpo", "tpo.kernels": "kernels", "tpo.registry": "registry"}

setup(
    name="tpo",
    version="0.1.0",
    description=(
        "Task Preference Optimization and RLAIF for multimodal LLMs: "
        "composable models, task heads, fused Triton kernels, training."
    ),
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    include_package_data=False,
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.56",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "timm>=1.0.15",
        "open-clip-torch>=2.32",
        "mmengine>=0.10.5",
        "accelerate>=1.0",
        "peft>=0.15",
        "numpy>=1.26",
        "scipy>=1.11",
        "pycocotools>=2.0",
        "pillow>=10.0",
        "matplotlib>=3.8",
        "tensorboard>=2.14",
        "tqdm>=4.66",
    ],
    extras_require={
        "dev": ["pytest>=8.0", "pytest-benchmark>=4.0", "pytest-timeout>=2.3", "av>=12.0"],
        "flash-attn": ["flash-attn>=2.6"],
        "video": ["av>=12.0"],
        "bench": ["liger-kernel>=0.5"],
    },
    entry_points={"console_scripts": ["tpo=tpo.cli:main"]},
)
