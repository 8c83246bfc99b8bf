"""Gradio's tracebacks go through the app's logging, so they are made safe like every other record.

Where an event fails inside Gradio (a value the completion's preset dropdown does not hold
fails Gradio's own check before our function runs), Gradio 6.31 calls `traceback.print_exc()` in `queueing`,
`routes`, `route_utils` and `utils`: twenty lines on stderr, outside `logging`, quoting the values
the client sent (a token, a user's words) unscrubbed, and as many times as a client asks. Each of
those modules gets a `traceback` whose `print_exc` logs the exception instead (one ERROR record
of the "gradio" logger, its traceback folded into the line, scrubbed and limited by
chat/conversation/log_safety.py); everything else of the module is the real `traceback`'s.
Waits for: Gradio logging these through `logging` (it prints them since 3.x).
Tested by tests/test_app_process.py (such a value, in a real app process).
"""

from __future__ import annotations

import importlib
import logging
import traceback
import types

from chat.web.gradio_patches.costs import require

PRINTING_MODULES = ("gradio.queueing", "gradio.routes", "gradio.route_utils", "gradio.utils")
log = logging.getLogger("gradio")


def log_gradio_tracebacks() -> None:
    """Give each of Gradio's printing modules the logging `traceback` (idempotent)."""
    for name in PRINTING_MODULES:
        module = importlib.import_module(name)
        require(module, "traceback", "log its tracebacks instead of printing them")
        if module.traceback is not _LOGGING_TRACEBACK:
            module.traceback = _LOGGING_TRACEBACK


def _print_exc(limit=None, file=None, chain=True) -> None:
    log.error("an event failed inside Gradio", exc_info=True)


def _logging_traceback() -> types.ModuleType:
    shim = types.ModuleType("traceback", traceback.__doc__)
    shim.__dict__.update({k: v for k, v in vars(traceback).items() if not k.startswith("__")})
    shim.print_exc = _print_exc
    return shim


_LOGGING_TRACEBACK = _logging_traceback()
