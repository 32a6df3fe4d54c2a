"""Where a key is read from a decoder: named points captured with forward hooks (pure torch).

The decoder is anything with a `layers` list of fairseq-style blocks (`self_attn_layer_norm`,
`self_attn`, `fc1`, `fc2`, `final_layer_norm`); block tensors are time-first (T, B, C).
"""
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

# name -> (layer offset from the top, submodule, "input" or "output")
KEY_TYPES: Dict[str, Tuple[int, Optional[str], str]] = {
    # the paper's best key: what the last FFN sees, i.e. after its layer norm in a pre-norm block
    "last_ffn_input": (-1, "fc1", "input"),
    "last_ffn_output": (-1, "fc2", "output"),
    "last_attn_input": (-1, "self_attn", "input"),
    "last_block_output": (-1, None, "output"),
    "second_last_ffn_input": (-2, "fc1", "input"),
    "second_last_ffn_output": (-2, "fc2", "output"),
    "second_last_attn_input": (-2, "self_attn", "input"),
    "second_last_block_output": (-2, None, "output"),
}


def key_module(decoder: nn.Module, key_type: str) -> Tuple[nn.Module, str]:
    if key_type not in KEY_TYPES:
        raise ValueError(f"unknown key type '{key_type}'; choose from {', '.join(KEY_TYPES)}")
    offset, sub, where = KEY_TYPES[key_type]
    layers = getattr(decoder, "layers", None)
    if layers is None or len(layers) < -offset:
        raise ValueError(f"key type '{key_type}' needs a decoder with >= {-offset} transformer layers")
    block = layers[offset]
    return (getattr(block, sub) if sub else block), where


class KeyCapture:
    """Holds the latest key tensor, batch-first (B, T, C), captured during a decoder forward."""

    def __init__(self, decoder: nn.Module, key_type: str):
        module, where = key_module(decoder, key_type)
        self.key_type = key_type
        self.keys: Optional[torch.Tensor] = None
        hook: Callable
        if where == "input":
            hook = lambda mod, args, kwargs: self._store(args[0] if args else kwargs["query"])  # noqa: E731
            self.handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        else:
            hook = lambda mod, args, out: self._store(out[0] if isinstance(out, tuple) else out)  # noqa: E731
            self.handle = module.register_forward_hook(hook)

    def _store(self, x: torch.Tensor) -> None:
        self.keys = x.detach().transpose(0, 1)  # (T, B, C) -> (B, T, C)

    def remove(self) -> None:
        self.handle.remove()


def key_dim(decoder: nn.Module, key_type: str) -> int:
    """Width of the key vectors: every supported point lies in a block's residual width."""
    offset = KEY_TYPES[key_type][0] if key_type in KEY_TYPES else -1
    key_module(decoder, key_type)  # validates the name and depth
    return int(decoder.layers[offset].embed_dim)
