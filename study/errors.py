"""The errors a user can cause. The CLI turns each into one line on stderr and exit code 2."""
from __future__ import annotations

from vae.errors import CheckpointError, ConfigError, DataError


class StudyError(RuntimeError):
    """A study cannot be run, resumed, read or reported as asked."""


class StudyInterrupted(RuntimeError):
    """The study stopped before all its trials finished (Ctrl-C); it can be resumed."""


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, CheckpointError, StudyError)
