"""Errors meant for a person: the message says what was wrong and what to do."""


class InputError(ValueError):
    """Bad user input (image, prompt or a parameter out of range)."""

