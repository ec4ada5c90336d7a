"""asarm: any-subset autoregressive models and exact Any-Subset Speculative Decoding.

    import asarm
    model = asarm.load_model("asarm-en-small")
    print(asarm.infill(model, "The cat sat on the [MASK:3] and purred."))
    print(asarm.infill(model, "The [MASK] sat on the mat."))  # length unknown: chosen from its posterior

Every public name loads on first use (PEP 562), so ``import asarm`` and the ``asarm`` command's
start-up (``--help``, ``models``) do not pay for torch; ``from asarm import ASARM, sample``
works as usual and imports what it needs.
"""

from .errors import ASARMError, Cancelled, CheckpointError, InputError

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY = {
    "ASARM": "model",
    "ASARMConfig": "config",
    "SampleResult": "sampling",
    "DecodeConfig": "sampling",  # the sampling package's frozen decoding settings
    "sample": "sampling",
    "load_model": "checkpoint",
    "save_model": "checkpoint",
    "load_tokenizer": "tokenization",
    "infill": "text",
    "length_posterior": "lengths",
    "length_prior_from_text": "lengths",
    "score": "scoring",
    "ScoreResult": "scoring",
}

__all__ = ["ASARMError", "Cancelled", "CheckpointError", "InputError", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'asarm' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
