from setuptools import find_packages, setup

setup(
    name="knnlm_fairseq",
    version="0.2.0",
    description="kNN-LM (Khandelwal et al., ICLR 2020) as a fairseq --user-dir plugin",
    packages=find_packages(include=["knnlm_fairseq", "knnlm_fairseq.*"]),
    package_data={"knnlm_fairseq.inspect": ["viewer.js", "viewer.css"]},  # inlined into the HTML by render()
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",  # safe (weights_only) loading with an allow-list; tested on 2.13
        "ve-fairseq==0.12.3",  # fairseq 0.12.2 cannot import on Python >= 3.11
        "numpy>=2.0",  # checkpoints.py maps numpy 1.x pickles onto numpy 2's numpy._core
        "hydra-core>=1.3,<1.4",  # what ve-fairseq 0.12.3 installs and we test
        "omegaconf>=2.3,<2.4",
        "sacremoses",
        "matplotlib",
        "tqdm",
    ],
    # faiss comes from the Makefile (FAISS=faiss-cpu, or faiss-gpu on CUDA machines): pip cannot pick one for you
    extras_require={"test": ["pytest", "pytest-xdist>=3.5", "selenium>=4.11"], "lint": ["ruff"], "cpu": ["faiss-cpu>=1.8"]},
    entry_points={
        "console_scripts": [
            "knnlm-build-index = knnlm_fairseq.cli.build_index:main",
            "knnlm-sweep = knnlm_fairseq.cli.sweep:main",
            "knnlm-prepare-text = knnlm_fairseq.cli.prepare_text:main",
            "knnlm-merge-dstore = knnlm_fairseq.cli.merge_dstore:main",
            "knnlm-inspect = knnlm_fairseq.cli.inspect:main",
            "knnlm-flags = knnlm_fairseq.tasks.flags:main",
        ]
    },
)
