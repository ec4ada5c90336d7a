"""asarm: any-subset autoregressive models and exact Any-Subset Speculative Decoding.

    import asarm
    model = asarm.load_model("asarm-en-small")
    print(asarm.infill(model, "The cat sat on the [MASK:3] and purred."))

Heavy dependencies (transformers, tokenizers) load only when a function that needs them runs.
"""

from .config import ASARMConfig
from .errors import ASARMError, CheckpointError, InputError
from .model import ASARM
from .sampling import DecodeConfig, SampleResult, sample

__version__ = "0.1.0"

_LAZY = {
    "load_model": "checkpoint",
    "save_model": "checkpoint",
    "load_tokenizer": "tokenization",
    "infill": "text",
    "score": "scoring",
    "ScoreResult": "scoring",
}

__all__ = ["ASARM", "ASARMConfig", "ASARMError", "CheckpointError", "InputError", "SampleResult", "DecodeConfig",
           "sample", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'asarm' has no attribute {name!r}")
