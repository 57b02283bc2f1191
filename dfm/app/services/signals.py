"""Stop at the next step boundary on SIGTERM or Ctrl-C (SIGINT), so a checkpoint can be written."""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType


class StopRequest:
    """Installs SIGTERM/SIGINT handlers that record the signal instead of killing the process.

    A second Ctrl-C restores the default behaviour (an immediate ``KeyboardInterrupt``).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self.signum is not None

    @property
    def name(self) -> str:
        """The signal's name (``SIGTERM``...)."""
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
