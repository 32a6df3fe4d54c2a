from setuptools import find_packages, setup

setup(
    name="knnlm_fairseq",
    version="0.1.0",
    description="kNN-LM (Khandelwal et al., ICLR 2020) as a fairseq --user-dir plugin",
    packages=find_packages(include=["knnlm_fairseq", "knnlm_fairseq.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "ve-fairseq==0.12.3",
        "numpy>=1.24",
        "hydra-core>=1.0.7",
        "omegaconf",
        "sacremoses",
        "matplotlib",
        "tqdm",
    ],
    # faiss comes from the Makefile (FAISS=faiss-cpu, or faiss-gpu on CUDA machines): pip cannot pick one for you
    extras_require={"test": ["pytest"], "lint": ["ruff"], "cpu": ["faiss-cpu>=1.8"]},
    entry_points={
        "console_scripts": [
            "knnlm-build-index = knnlm_fairseq.cli.build_index:main",
            "knnlm-sweep = knnlm_fairseq.cli.sweep:main",
            "knnlm-prepare-text = knnlm_fairseq.cli.prepare_text:main",
            "knnlm-merge-dstore = knnlm_fairseq.cli.merge_dstore:main",
        ]
    },
)
