"""Errors avlens reports to its users.

Every error a user can cause with bad input is an :class:`InputError` that names the file or the sample and
says what is wrong, in one line. Batch functions catch them per item, record them, and go on with the rest.
"""

from __future__ import annotations


class AvlensError(Exception):
    """Base class of the errors avlens raises on purpose."""


class InputError(AvlensError):
    """Bad input: a missing or unreadable file, an unknown label, a prompt too long for the model...

    Args:
        problem: what is wrong, as a short phrase ("no audio track", "file not found").
        path: the file concerned, if any.
        sample: the id of the sample concerned, if any.
    """

    def __init__(self, problem: str, *, path: str | None = None, sample: str | None = None) -> None:
        self.problem = problem
        self.path = None if path is None else str(path)
        self.sample = sample
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.sample is not None:
            where.append(f"sample {self.sample}")
        if self.path is not None:
            where.append(self.path)
        return f"{': '.join(where)}: {self.problem}" if where else self.problem

    def for_sample(self, sample: str) -> InputError:
        """The same error, tagged with the sample it came from."""
        if self.sample is None:
            self.sample = sample
            self.args = (str(self),)
        return self


class MediaError(InputError):
    """A media file that cannot be used: missing, corrupt, unsupported, or without the stream asked for."""


class ModelNotFoundError(AvlensError):
    """A model that is neither a local directory nor reachable on the hub."""


class UnknownGroupError(AvlensError, KeyError):
    """A token group name that the layout does not have."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UnsupportedModelError(AvlensError):
    """A model whose config asks for something avlens's engine does not reproduce (named in the message)."""
