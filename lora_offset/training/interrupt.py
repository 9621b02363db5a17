"""Ctrl-C during training: finish the current step, save a resumable state and the adapter, then stop.

train() installs the handler, polls the flag after each optimizer step and raises TrainingInterrupted
once it has saved; a second Ctrl-C aborts at once, without saving.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger("lora_offset")


class TrainingInterrupted(Exception):
    """Ctrl-C: a resumable state and the current adapter were saved."""


class StopFlag:
    def __init__(self):
        self.requested = False
        self._previous = None

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def install_sigint_handler() -> StopFlag:
    """Ctrl-C finishes the current step, then saves a resumable state and the adapter (a second Ctrl-C aborts)."""
    flag = StopFlag()
    try:
        previous = signal.getsignal(signal.SIGINT)
    except ValueError:  # not the main thread
        return flag

    def handler(signum, frame):
        if flag.requested:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        flag.requested = True
        log.warning("Ctrl-C: finishing this step, then saving (press again to abort without saving)")

    try:
        signal.signal(signal.SIGINT, handler)
        flag._previous = previous
    except ValueError:
        pass
    return flag
