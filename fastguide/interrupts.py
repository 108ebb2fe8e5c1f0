"""Ctrl-C that never leaves half-done work behind: long jobs (training, table builds) defer SIGINT to the end of
the unit of work they are in, save a consistent checkpoint there, then stop."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class Interrupted(KeyboardInterrupt):
    """A deferred Ctrl-C: the job stopped at a consistent point and saved ``checkpoint`` after ``done`` units."""

    def __init__(self, done: int, checkpoint=None):
        super().__init__(f"interrupted after {done} completed units; checkpoint {checkpoint}")
        self.done, self.checkpoint = done, checkpoint


class InterruptFlag:
    def __init__(self):
        self._set = False

    def set(self) -> None:
        self._set = True

    def __bool__(self) -> bool:
        return self._set


@contextmanager
def deferred_sigint():
    """Within the block the first SIGINT only sets the yielded flag (check it between units of work); a second
    one raises KeyboardInterrupt at once. Outside the main thread (no signal handlers there) nothing is
    deferred and the flag stays unset."""
    flag = InterruptFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag:
            raise KeyboardInterrupt
        flag.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
