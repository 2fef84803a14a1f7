"""Upstream's environment hacks; canny2image only needs disable_verbosity."""
import logging


def disable_verbosity():
    """Silence transformers' info/warning logging (upstream does this at import of `share`)."""
    try:
        from transformers import logging as transformers_logging
    except ImportError:
        logging.getLogger("transformers").setLevel(logging.ERROR)
        return
    transformers_logging.set_verbosity_error()
