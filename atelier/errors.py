"""Errors that teach: every message says what was expected, what came, and how to fix it."""

from __future__ import annotations


class AtelierError(Exception):
    """Base class of every error Atelier raises on purpose (bad input, missing model, impossible setting)."""

    def __init__(self, expected: str, received: str, fix: str):
        self.expected, self.received, self.fix = expected, received, fix
        super().__init__(f"{expected}; got {received}. {fix}")


class InputError(AtelierError):
    """A node input (image, mask, size, batch) that cannot be used as given."""


class ModelFileError(AtelierError):
    """A model that is missing, incomplete or of another kind than the node needs."""


class SettingError(AtelierError):
    """A combination of settings that this machine or library cannot run."""


def describe_error(e: BaseException) -> str:
    """``TypeName: first line of the message`` (at most 300 characters), for an error a library raised while we
    read a user's file: enough to search for, short enough for a node's error box."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {(text[0] if text else type(e).__name__)[:300]}"
