"""Stopping a run cleanly on a signal: Ctrl-C (SIGINT), or SIGTERM, which a cluster's scheduler sends before it
preempts a job (and torchrun passes on to its workers). The handlers only note the request; the training loop
looks at it after each step, writes the checkpoint of that step and ends the run."""
import signal

# How the one-line report names each signal.
SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class StopRequests:
    """Within this block, SIGINT and SIGTERM set `received` (the first signal's number) instead of ending the
    process. A second Ctrl-C stops at once, as Ctrl-C does by default (a KeyboardInterrupt)."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _note(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or signum

    def __enter__(self) -> "StopRequests":
        self._previous = {s: signal.signal(s, self._note) for s in SIGNAL_NAMES}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
