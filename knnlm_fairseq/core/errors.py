"""The project's one error type: a request, input or file we refuse, with a message that names the fix."""


class KnnlmError(ValueError):
    """A datastore, index, log or setting that cannot be used; the message names the problem and the fix.

    Console scripts print it as one line (`knnlm-x: error: ...`); under fairseq-eval-lm the plugin's
    excepthook does the same.
    """
