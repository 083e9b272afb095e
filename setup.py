from setuptools import find_packages, setup

setup(
    name="spp",
    version="0.1.0",
    description="Solution Path Pruning: one differential-inclusion search, a whole family of pruned vision transformers",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["spp", "spp.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "timm>=1.0",
        "numpy",
        "pyyaml",
        "tensorboard",
        "safetensors",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "torch-pruning"],   # torch-pruning: tests of the benchmark's baselines
        "bench": ["torch-pruning"],
    },
    entry_points={"console_scripts": ["spp=spp.cli:main"]},
)
