"""User-facing errors.

Every problem a user can cause (bad input, missing weights, a ratio out of range) is raised as a
``TuckerSegError`` with a one-line message. The command line prints that line and exits non-zero
without a traceback; the Python API and the Slicer module show the same message.
"""
from __future__ import annotations


class TuckerSegError(Exception):
    """An error whose message is meant for the user, on one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class InputError(TuckerSegError):
    """The input image, folder or argument cannot be used."""


class ModelError(TuckerSegError):
    """A model folder, checkpoint or compressed-model file is missing, corrupt or mismatched."""


class WeightsMissingError(ModelError):
    """TotalSegmentator weights are not installed and cannot be downloaded."""


class EngineError(TuckerSegError):
    """An inference engine is not installed or does not support the device or precision."""


class Cancelled(TuckerSegError):
    """The user cancelled the run."""

    exit_code = 130

