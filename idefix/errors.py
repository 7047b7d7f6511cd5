"""The exceptions idefix raises for problems a user can fix.

Every front end turns an `IdefixError` into one clear line (CLI), an OpenAI error JSON (server)
or lets it propagate (Python API); anything else is a bug.
"""

from __future__ import annotations


class IdefixError(Exception):
    """Base class of every error caused by user input or user files."""


class ModelLoadError(IdefixError):
    """The model id, a checkpoint file or its configuration cannot be used."""


class ImageError(IdefixError):
    """An image cannot be fetched, decoded or is outside the allowed limits."""


class InvalidRequestError(IdefixError):
    """A request parameter or message is malformed."""


class ContextLengthError(InvalidRequestError):
    """The prompt (plus the tokens asked for) does not fit the model's context."""


class OverloadedError(IdefixError):
    """The engine's waiting queue is full; retry later (the server answers 503 + Retry-After)."""
