"""Hydra model configs written from the architecture functions, so `fairseq-hydra-train` builds what they name.

Under Hydra, fairseq fills `model` from the `transformer_lm` dataclass (every field at its default) before an
architecture function runs, and an architecture function only sets what is missing: it changes nothing. fairseq's
own Hydra configs (`fairseq/config/model/transformer_lm/*.yaml`) therefore state every architecture field. Ours are
written here from the same functions `fairseq-train --arch NAME` runs, one file per architecture in
`config/model/`, and `tests/test_configs.py` fails when a file differs from what this module writes:

    python -m knnlm_fairseq.models.arch_configs config/model
"""
import argparse
import os
import sys
import typing
from typing import Dict

import yaml
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_NAME_REGISTRY
from fairseq.models.transformer_lm import TransformerLanguageModelConfig

from . import transformer_lm_archs  # noqa: F401  (registers the architectures)

ARCHS = ("knnlm_wiki103", "knnlm_wt2_small", "knnlm_tiny")


def arch_fields(arch: str) -> Dict:
    """Every model field the architecture function sets, as `fairseq-train --arch ARCH` leaves it."""
    assert ARCH_MODEL_NAME_REGISTRY[arch] == "transformer_lm", f"{arch} is not a transformer_lm architecture"
    args = argparse.Namespace()
    ARCH_CONFIG_REGISTRY[arch](args)
    fields = TransformerLanguageModelConfig.__dataclass_fields__
    return {name: _typed(fields[name].type, value) for name, value in sorted(vars(args).items()) if name in fields}


def _typed(kind, value):
    """fairseq's functions set some int fields to False (base_shuffle); Hydra validates against the dataclass."""
    kinds = typing.get_args(kind) or (kind,)  # Optional[int] -> (int, NoneType)
    return int(value) if isinstance(value, bool) and bool not in kinds and int in kinds else value


def render(arch: str) -> str:
    header = (f"# Written by `python -m knnlm_fairseq.models.arch_configs config/model` from the\n"
              f"# architecture function {arch} (what `fairseq-train --arch {arch}` builds). Do not edit:\n"
              f"# change the function and write this file again; tests/test_configs.py checks they agree.\n")
    body = yaml.safe_dump({"_name": arch, **arch_fields(arch)}, sort_keys=False, default_flow_style=False)
    return header + body


def main(argv=None) -> None:
    out = (argv or sys.argv[1:] or ["config/model"])[0]
    os.makedirs(out, exist_ok=True)
    for arch in ARCHS:
        path = os.path.join(out, f"{arch}.yaml")
        with open(path, "w") as f:
            f.write(render(arch))
        print(path)


if __name__ == "__main__":
    main()
