"""Errors meant for a person: the message says what was wrong and what to do."""


class InputError(ValueError):
    """Bad user input (image, prompt or a parameter out of range)."""


class Cancelled(RuntimeError):
    """The caller cancelled the run (process(..., cancel=event) with the event set): raised at the
    next DDIM step, and before the first."""


class NonFiniteOutputError(RuntimeError):
    """The model computed NaN or infinity instead of an image (damaged weights, most often)."""


def require_finite(images, where):
    """Raise NonFiniteOutputError unless every value of the tensor `images` is finite. Upstream
    would cast NaN to uint8 and hand back a black image without a word."""
    if not bool(images.isfinite().all()):
        raise NonFiniteOutputError(
            f"the model computed NaN or infinite values ({where}) instead of an image: its "
            f"weights are probably damaged (NaN or inf in the checkpoint); load a good checkpoint")


def first_line(error):
    """The first line of an exception's message (the exception's type name when it has none)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def device_out_of_memory():
    """The class of an accelerator's out-of-memory error: torch.OutOfMemoryError since torch 2.5
    (CUDA and HIP), torch.cuda's before (the same class in later versions)."""
    import torch
    return getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
