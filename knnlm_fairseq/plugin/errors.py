"""One-line errors under the stock CLIs: our refusals, and unreadable checkpoints, print a message, not a traceback."""
import pickle
import sys

from ..core.errors import KnnlmError


def _inside_torch_load(tb) -> bool:
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        if name.endswith(("torch/serialization.py", "torch/_weights_only_unpickler.py")):
            return True
        tb = tb.tb_next
    return False


def one_line(kind, err, tb=None) -> str:
    """The message for errors we know how to explain; '' for everything else."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else kind.__name__
    if issubclass(kind, KnnlmError):
        return str(err)
    if issubclass(kind, pickle.UnpicklingError) and "Weights only load failed" in str(err):
        detail = str(err).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        if "Unsupported global" in detail:  # a real pickle that needs a class outside the allow-list
            return (f"the checkpoint in --path needs a class that safe loading refuses ({detail}); load it only if "
                    f"you trust its source, and re-save its weights and args as a fairseq checkpoint")
        return f"the file in --path is not a readable PyTorch checkpoint ({detail}); pass a fairseq checkpoint.pt"
    if issubclass(kind, (pickle.UnpicklingError, EOFError)) or (
        issubclass(kind, RuntimeError) and ("PytorchStreamReader" in str(err) or "invalid load key" in str(err))
    ):
        return f"the file in --path is not a readable PyTorch checkpoint ({text}); pass a fairseq checkpoint.pt"
    if _inside_torch_load(tb):  # garbage bytes fail in torch.load with any exception type
        return f"the file in --path is not a readable PyTorch checkpoint ({kind.__name__}: {text}); pass a fairseq checkpoint.pt"
    return ""


def _hook(kind, err, tb, _previous=sys.excepthook):
    message = one_line(kind, err, tb)
    if message:
        print(f"knnlm_fairseq: error: {message}", file=sys.stderr)
        return
    _previous(kind, err, tb)


def install_excepthook() -> None:
    """fairseq-eval-lm exits 1 through the hook; the message names the problem and the fix."""
    if sys.excepthook is not _hook:
        sys.excepthook = _hook
