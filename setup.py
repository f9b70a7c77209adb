"""megadistill: distill video diffusion models (Wan2.1/2.2, SeedVR2) into few-step generators."""
from setuptools import find_packages, setup

# `kernels/` (Triton sources) is reached as `megadistill.kernels` through that package's __path__
# (megadistill/kernels/__init__.py); it is not a package itself, so it cannot shadow Hugging Face's
# `kernels`, a dependency of transformers.
packages = find_packages(include=["megadistill", "megadistill.*"])

setup(
    name="megadistill",
    version="0.1.0",
    description="DeepSpeed + Megatron-style trainer that distills video diffusion models into few-step generators",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    # The shipped demo teacher (weights + settings JSON) must reach non-editable installs too.
    package_data={"megadistill.demo": ["assets/*"]},
    install_requires=[
        # Pin torch on the same pip line (README) to keep the local CPU build: an unpinned install
        # would pull a multi-GB CUDA wheel.
        "torch>=2.4",
        "numpy",
        "pyyaml",
        "safetensors",
        "tqdm",
        "einops",
        # ZeRO engines; on CPU it picks its CPU accelerator and gloo by itself.
        "deepspeed>=0.19.8,<0.20",
        # Training logs (TensorBoard scalars, sample images) and sample videos (MP4 through PyAV).
        "tensorboard",
        "pillow",
        "av",
    ],
    extras_require={
        "dev": ["pytest>=7", "diffusers>=0.35", "transformers>=4.50", "accelerate", "scipy"],
        "gpu": ["flash-attn", "xformers", "transformer-engine"],
    },
)
