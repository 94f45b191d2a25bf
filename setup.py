"""Build flexikern: the Python package, the Triton kernels (installed as flexikern.kernels)
and the C++/CUDA extension flexikern._C.

Use `pip install --no-build-isolation -e .` (the isolated build environment has no torch).
"""

from setuptools import setup

PACKAGES = [
    "flexikern",
    "flexikern.models",
    "flexikern.flexi",
    "flexikern.diffusion",
    "flexikern.ops",
    "flexikern.runtime",
    "flexikern.train",
    "flexikern.kernels",
]

setup(
    name="flexikern",
    version="0.1.0",
    description="FlexiDiT: sample Diffusion Transformers with less compute, with fast GPU kernels",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"flexikern.kernels": "kernels"},
    package_data={"flexikern": ["assets/*", "_build_info.json"]},
    install_requires=["torch>=2.4", "numpy", "safetensors", "tqdm", "pillow"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "diffusers", "matplotlib"],
    },
    entry_points={"console_scripts": ["flexikern=flexikern.cli:main"]},
)
