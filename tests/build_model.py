"""Build a model the way a training CLI does and print its parameters as JSON; train nothing.

    python tests/build_model.py hydra CONFIG_DIR CONFIG_NAME [hydra overrides...]
        fairseq-hydra-train's own entry point (hydra_init, @hydra.main, add_defaults, call_main), with the
        training loop replaced by the first lines of fairseq_cli.train.main: import the --user-dir, add the
        dataclass defaults, set up the task, build the model.
    python tests/build_model.py argparse DATA ARCH USER_DIR
        fairseq-train's parser (`--arch ARCH`), then the same task and model set-up.
    python tests/build_model.py both DATA ARCH USER_DIR CONFIG_DIR CONFIG_NAME [hydra overrides...]
        argparse, then hydra (with task.data=DATA, common.user_dir=USER_DIR): one interpreter start for two builds.

Parameters are built on torch's meta device: names and shapes without memory (the WikiText-103 model has
246,933,184 parameters). Prints {"params": {state-dict name: shape}, "count": N, "model_cfg": {...}} on one line per build.
"""
import json
import sys

import torch


def _build(cfg) -> None:
    from fairseq import tasks, utils
    from fairseq.dataclass.initialize import add_defaults
    from omegaconf import OmegaConf

    utils.import_user_module(cfg.common)  # as fairseq_cli.train.main starts
    add_defaults(cfg)
    task = tasks.setup_task(cfg.task)
    with torch.device("meta"):
        model = task.build_model(cfg.model)
    params = {name: list(t.shape) for name, t in model.state_dict().items()}  # as a checkpoint holds them
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True) if OmegaConf.is_config(cfg.model) else dict(cfg.model)
    print(json.dumps({"params": params, "count": sum(p.numel() for p in model.parameters()),
                      "model_cfg": {k: v for k, v in model_cfg.items() if not k.startswith("_") or k == "_name"}},
                     default=str))


def hydra(config_dir: str, name: str, *overrides: str) -> None:
    from fairseq_cli import hydra_train

    hydra_train.pre_main = lambda cfg, **kw: _build(cfg)  # distributed_utils.call_main(cfg, pre_main)
    sys.argv = ["fairseq-hydra-train", "--config-dir", config_dir, "--config-name", name, *overrides]
    hydra_train.cli_main()


def argparse_(data: str, arch: str, user_dir: str) -> None:
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [data, "--task", "language_modeling", "--arch", arch,
                                                "--user-dir", user_dir, "--cpu"])
    _build(convert_namespace_to_omegaconf(args))


def both(data: str, arch: str, user_dir: str, config_dir: str, name: str, *overrides: str) -> None:
    argparse_(data, arch, user_dir)
    hydra(config_dir, name, f"task.data={data}", f"common.user_dir={user_dir}", *overrides)


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    {"hydra": hydra, "argparse": argparse_, "both": both}[mode](*rest)
