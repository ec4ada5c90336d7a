"""Exceptions that carry a user-facing message (the CLI prints them as one line, exit code 2)."""


class ASARMError(ValueError):
    """Base class for errors caused by the caller's input, not by a bug."""


class CheckpointError(ASARMError):
    """A checkpoint directory, config or weight file is missing, corrupt or mismatched."""


class SandboxError(ASARMError):
    """Generated programs cannot be run on this machine (the sandbox itself fails)."""


class InputError(ASARMError):
    """Token ids, masks, options or text that cannot be used."""


class Cancelled(InputError):
    """The result of a row that was cancelled (``Engine.cancel``): its holes were never filled."""


class LiteralMaskWarning(UserWarning):
    """``[mask]`` written in another case than ``[MASK]``: literal text, perhaps meant as a hole
    (``asarm.text.markup``)."""
