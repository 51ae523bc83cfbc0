"""flamingo_jax: pinned install (DESIGN.md §3). `pip install -e .[dev,tpu]`."""

import setuptools

setuptools.setup(
    name="flamingo_jax",
    version="0.1.0",
    description="Train and evaluate Flamingo visual language models with JAX + Haiku.",
    packages=setuptools.find_packages(include=["flamingo_jax", "flamingo_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "dm-haiku==0.0.17",
        "optax==0.2.8",
        "chex==0.1.92",
        "orbax-checkpoint==0.12.8",
        "ml-collections==1.1.0",
        "jmp==0.0.4",
        "absl-py==2.5.1",
        "numpy==2.4.6",
    ],
    extras_require={
        "dev": ["pytest==9.2.0"],
        # libtpu lets a CPU-only machine compile for TPU topologies (tools/aot_compile.py).
        "tpu": ["libtpu==0.0.42.1"],
        "convert": ["torch", "transformers"],
    },
)
