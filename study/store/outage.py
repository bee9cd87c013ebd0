"""A bucket's outages: how long a study waits for its storage, and what it does when that runs out.

Every request to a bucket is retried by the AWS SDK itself (``S3_ATTEMPTS`` attempts, about 25 s
in all). Region-wide incidents and network partitions last minutes, so every call of a study's
object store (``study.store.objectstore``: the rows, the Optuna snapshot, Tune's state, the
trials' checkpoints through the filesystem handed to Tune) is called again, with backoff, while
the bucket is unreachable, for up to the study's *patience* (``--storage-patience``,
``PATIENCE_S`` by default). An outage shorter than that costs only the wait; the driver's
progress says since when the storage has been unreachable, and when it is back.

When the patience runs out, the study stops cleanly: the call raises
:class:`~study.errors.StorageUnreachable`, every later call in this process fails at once (no
second wait), and the driver's listener (:func:`listen`) asks Ray Tune to stop as Ctrl-C does.
Nothing a finished trial wrote is lost (its row is in the bucket or it is not finished), and
``vae-study resume`` continues the rest once the storage is back.

Transient is what the SDK says of a request that never got an answer (``NETWORK_CONNECTION``, a
dropped or refused connection), or got a throttling or server error (503 SlowDown, 500). A
missing file, a refused credential or a wrong bucket name is not an outage: it raises at once.
"""
from __future__ import annotations

import random
import re
import threading
import time
from typing import Any, Callable, TypeVar

from study.errors import StorageUnreachable

# Five minutes: a driver holding a cluster idle for longer costs more than stopping and resuming,
# which loses at most the running trials' work since their last checkpoints.
PATIENCE_S = 300.0
# The calls a worker makes (a trial's checkpoint upload) wait this much longer than the driver's,
# so that when an outage outlasts the patience it is the driver that stops the study, not a trial
# that fails because of storage.
WORKER_GRACE_S = 60.0
BACKOFF_S = (1.0, 15.0)  # the first wait between calls, and the longest

_TRANSIENT = re.compile(r"NETWORK_CONNECTION|SLOW_DOWN|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|THROTTLING|"
                        r"REQUEST_TIMEOUT|REQUEST_TIME_TOO_SKEWED|HTTP status 5\d\d|curlCode|Couldn't connect|"
                        r"Connection refused|Connection reset|timed out")

T = TypeVar("T")
_PATIENCE = [PATIENCE_S]


def patience() -> float:
    """How long this process waits out an outage (the study's ``--storage-patience``)."""
    return _PATIENCE[0]


def set_patience(seconds: float) -> None:
    """The study's ``--storage-patience``, for every call of this process from now on."""
    _PATIENCE[0] = float(seconds)


def transient(exc: BaseException) -> bool:
    """``exc`` says the bucket did not answer, or answered with a throttling or server error."""
    if isinstance(exc, (FileNotFoundError, PermissionError, StorageUnreachable)) or not isinstance(exc, OSError):
        return False
    return bool(_TRANSIENT.search(str(exc)))


class _State:
    """This process's outage: since when the storage has been unreachable, and whether it gave up."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.since: float | None = None  # wall time of the first call that failed, None while reachable
        self.since_mono: float | None = None
        self.failing = 0  # calls waiting for the storage now
        self.reason = ""
        self.gave_up: StorageUnreachable | None = None
        self.listeners: list[Any] = []
        self.waited_s = 0.0  # the outages' length, summed (what an outage cost this process)


_STATE = _State()


def patiently(call: Callable[[], T], *, uri: str, patience: float, what: str = "") -> T:
    """``call()``, called again with backoff while it fails for a transient reason, for up to
    ``patience`` seconds from the outage's start (the first failing call of this process)."""
    state = _STATE
    if state.gave_up is not None:
        raise StorageUnreachable(str(state.gave_up))
    wait = BACKOFF_S[0]
    mine = False
    try:
        while True:
            started = time.monotonic()
            try:
                result = call()
            except OSError as exc:
                if not transient(exc):
                    raise
                _down(uri, exc, started, mine)
                mine = True
                since = state.since_mono if state.since_mono is not None else started
                left = patience - (time.monotonic() - since)
                if state.gave_up is not None:
                    raise StorageUnreachable(str(state.gave_up)) from None
                if left <= 0:
                    raise _give_up(uri, exc, patience) from None
                time.sleep(min(wait * random.uniform(0.8, 1.2), left))
                wait = min(wait * 2, BACKOFF_S[1])
                continue
            if mine:
                _up(uri)
                mine = False
            return result
    finally:
        if mine:
            with state.lock:
                state.failing -= 1


def _down(uri: str, exc: BaseException, started: float, counted: bool) -> None:
    state = _STATE
    with state.lock:
        if not counted:
            state.failing += 1
        if state.since_mono is not None:
            return
        state.since_mono = started
        state.since = time.time() - (time.monotonic() - started)
        state.reason = _first_line(exc)
        listeners = list(state.listeners)
    for listener in listeners:
        listener.down(uri, state.since, state.reason)


def _up(uri: str) -> None:
    state = _STATE
    with state.lock:
        state.failing -= 1
        if state.failing > 0 or state.since_mono is None:
            return
        lasted = time.monotonic() - state.since_mono
        state.waited_s += lasted
        state.since = state.since_mono = None
        listeners = list(state.listeners)
    for listener in listeners:
        listener.up(uri, lasted)


def _give_up(uri: str, exc: BaseException, patience: float) -> StorageUnreachable:
    since = time.strftime("%H:%M:%S", time.localtime(_STATE.since)) if _STATE.since else "?"
    return give_up(StorageUnreachable(
        f"storage {uri} unreachable for {_duration(patience)} (since {since}: {_first_line(exc)}), "
        f"longer than the study waits for it (--storage-patience {patience:g})"))


def give_up(error: BaseException) -> StorageUnreachable:
    """The study cannot go on with its storage (an outage past its patience, or a write refused):
    every later call of this process fails at once, and the listeners stop the study. The first
    error given up with is the one said; returns it."""
    state = _STATE
    with state.lock:
        if state.gave_up is not None:
            return state.gave_up
        state.gave_up = error if isinstance(error, StorageUnreachable) else StorageUnreachable(str(error))
        listeners = list(state.listeners)
    for listener in listeners:
        listener.gave_up(state.gave_up)
    return state.gave_up


class Listener:
    """What a driver hears of its storage's outages (subclass and :func:`listen`)."""

    def down(self, uri: str, since: float, reason: str) -> None:
        """The first call failed at wall time ``since``."""

    def up(self, uri: str, lasted: float) -> None:
        """The storage answers again after ``lasted`` seconds."""

    def gave_up(self, error: StorageUnreachable) -> None:
        """The patience ran out: every later call fails at once."""


def listen(listener: Listener) -> Callable[[], None]:
    """Tell ``listener`` of this process's outages; returns the call that stops telling it."""
    with _STATE.lock:
        _STATE.listeners.append(listener)

    def stop() -> None:
        with _STATE.lock:
            if listener in _STATE.listeners:
                _STATE.listeners.remove(listener)

    return stop


def gave_up() -> StorageUnreachable | None:
    """The error this process gave up with, or None."""
    return _STATE.gave_up


def waited_s() -> float:
    """Seconds this process has spent with its storage unreachable, the ongoing outage included."""
    with _STATE.lock:
        ongoing = time.monotonic() - _STATE.since_mono if _STATE.since_mono is not None else 0.0
        return _STATE.waited_s + ongoing


def reset() -> None:
    """Forget this process's outages (a new study in the same process: the API, the tests)."""
    with _STATE.lock:
        _STATE.since = _STATE.since_mono = None
        _STATE.failing = 0
        _STATE.gave_up = None
        _STATE.waited_s = 0.0


def _duration(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 120 and seconds % 60 == 0 else f"{seconds:g} s"


def _first_line(exc: BaseException) -> str:
    """The SDK's word for what went wrong (``AWS Error SLOW_DOWN``), else the message's first line."""
    text = str(exc).strip()
    said = re.search(r"AWS Error [A-Z_]+(?: \(HTTP status \d+\))?", text)
    if said:
        return said.group(0)
    return text.splitlines()[0][:200] if text else type(exc).__name__
