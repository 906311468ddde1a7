"""How the gateway is asked to stop, and the guarantee that it does.

SIGTERM and SIGINT (and the RPC ``stop``) ask for an orderly shutdown; a second request,
or a shutdown that takes longer than ``shutdown.timeout_s``, ends the process at once with
:data:`EXIT_FORCED`, so the service manager can start it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)

EXIT_FORCED = 3
#: Should the main thread be stuck where Python signal handlers cannot run, a thread ends
#: the process this long after the shutdown timeout.
BACKSTOP_S = 5.0


class StopControl:
    """``requested`` is set once a stop was asked for; :meth:`request` asks."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.requested = asyncio.Event()

    def install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request)

    def request(self) -> None:
        if self.requested.is_set():
            log.error("second stop request: forcing the exit")
            os._exit(EXIT_FORCED)
        log.info("stop requested; shutting down")
        self._arm_forced_exit()
        self.requested.set()

    def is_set(self) -> bool:
        return self.requested.is_set()

    def done(self) -> None:
        """The shutdown finished: the forced exit is not needed any more."""
        if threading.current_thread() is threading.main_thread():
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _arm_forced_exit(self) -> None:
        timeout = self.timeout_s

        def forced(_sig: int, _frame: FrameType | None) -> None:
            log.critical("graceful shutdown took longer than %.0f s: forcing the exit", timeout)
            logging.shutdown()
            os._exit(EXIT_FORCED)

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGALRM, forced)
            signal.setitimer(signal.ITIMER_REAL, timeout)
        backstop = threading.Timer(timeout + BACKSTOP_S, os._exit, (EXIT_FORCED,))
        backstop.daemon = True
        backstop.start()
