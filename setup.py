from setuptools import find_packages, setup

setup(
    name="spp",
    version="0.1.0",
    description="Solution Path Pruning: one differential-inclusion search, a whole family of pruned transformers (timm ViT/Swin, Hugging Face LLMs and CLIP)",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["spp", "spp.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.3",     # torch.amp.GradScaler(device); tested on 2.14
        "torchvision",
        "timm>=1.0.16",   # timm.layers.attention (1.0.16)
        "numpy",
        "pyyaml",
        "tensorboard",
        "safetensors",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # decoder LLMs (Llama, Mistral, Qwen2, Qwen3, OPT); tested on transformers 5.25 (its attention interface
        # and cache= argument); peft for LoRA, datasets for hub text, lm-eval for zero-shot tasks (HFLM)
        # gguf: models shipped as GGUF files (transformers reads them through it)
        "llm": ["transformers>=5.25", "tokenizers", "peft", "datasets", "lm-eval", "gguf"],
        # Torch-Pruning baselines (benchmark and its tests): timm's Attention must follow pruned head
        # widths (attn_dim, 1.0.23)
        # nbclient + ipykernel run examples/quickstart.ipynb, pdoc builds the API reference (make docs)
        "test": ["pytest", "torch-pruning", "timm>=1.0.23", "scikit-learn", "transformers>=5.25", "tokenizers",
                 "peft", "datasets", "lm-eval", "gguf", "nbclient", "nbformat", "ipykernel", "pdoc"],
        "bench": ["torch-pruning", "timm>=1.0.23", "scikit-learn"],   # scikit-learn: the robustness benchmark's digits
    },
    entry_points={"console_scripts": ["spp=spp.cli:main"]},
)
