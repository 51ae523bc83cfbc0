"""flamingo_jax: pinned install (docs/design.md §3). `pip install -e .[dev,tpu]`."""

import setuptools

setuptools.setup(
    name="flamingo_jax",
    version="0.1.0",
    description="Train and evaluate Flamingo visual language models with JAX + Haiku.",
    packages=setuptools.find_packages(include=["flamingo_jax", "flamingo_jax.*"]),
    package_data={"flamingo_jax.data": ["assets/*.model"]},
    python_requires=">=3.11",
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "dm-haiku==0.0.17",
        "optax==0.2.8",
        "chex==0.1.92",
        "orbax-checkpoint==0.12.8",
        "ml-collections==1.1.0",
        "absl-py==2.5.1",
        "numpy==2.4.6",
        # Data pipeline (flamingo_jax/data): TFDS builders write the ArrayRecord datasets.
        "tensorflow-cpu==2.21.0",
        # tf.summary's implementation (trainer's TensorBoard event files); TF no longer
        # depends on it.
        "tensorboard==2.21.0",
        "tensorflow-datasets==4.9.10",
        "sentencepiece==0.2.3",
        # The loader's worker processes and per-position shuffling (data/pipeline.py).
        "grain==0.2.18",
        "pillow==12.0.0",
        "importlib-resources==7.1.0",   # TFDS (etils) needs it for builders defined in a package
        "etils==1.15.0",                # epath: workdirs on gs:// or local disk
        # Pretrained weights (flamingo_jax/weights): safetensors read without pickle, and the
        # LMs' own Hugging Face tokenizer.json files.
        "safetensors==0.8.0",
        "tokenizers==0.23.3",
    ],
    extras_require={
        # tests/run.sh runs files in parallel; matplotlib draws the few-shot demo's plot;
        # pycocoevalcap: the CIDEr tokenizer (as `coco`) and the scorers the tests compare with.
        "dev": ["pytest==9.2.0", "pytest-xdist==3.8.0", "matplotlib==3.10.8",
                "pycocoevalcap==1.2"],
        # CIDEr (captioning tasks): pycocoevalcap's PTB tokenizer, the Stanford CoreNLP 3.4.1
        # jar it ships, run with the system's Java (evaluation/metrics.py); the tests also
        # compare against its Python scorers.
        "coco": ["pycocoevalcap==1.2"],
        # libtpu lets a CPU-only machine compile for TPU topologies (tools/aot_compile.py).
        "tpu": ["libtpu==0.0.42.1"],
        # Only `import_weights --kind=openflamingo` reading a checkpoint.pt (torch.load with
        # weights_only=True); a safetensors export of it needs nothing.
        "torch": ["torch==2.13.0"],
    },
)
