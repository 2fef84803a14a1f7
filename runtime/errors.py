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
