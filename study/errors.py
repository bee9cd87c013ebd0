"""The errors a user can cause. The CLI turns each into one line on stderr and exit code 2."""
from __future__ import annotations

from vae.errors import CheckpointError, ConfigError, DataError


class StudyError(RuntimeError):
    """A study cannot be run, resumed, read or reported as asked."""


class StorageUnreachable(StudyError, OSError):
    """The study's storage did not answer for longer than the study waits for it
    (``--storage-patience``): the study stopped cleanly and can be resumed once it is back. The CLI
    exits with 75 (EX_TEMPFAIL: try again later)."""


class StudyInterrupted(RuntimeError):
    """The study stopped before all its trials finished (Ctrl-C); it can be resumed."""


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, CheckpointError, StudyError)
