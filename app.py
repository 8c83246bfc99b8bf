"""Falcon Chat: `python app.py --help` lists the settings; the README explains them."""

from __future__ import annotations

import logging
import os
import signal
import sys

log = logging.getLogger("falcon_chat")


def main(argv: list[str] | None = None) -> None:
    # Gradio's telemetry (usage analytics and a version check at start-up, to api.gradio.app) is
    # off unless the operator turns it on with GRADIO_ANALYTICS_ENABLED=True.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    # SIGTERM (systemd, `docker stop`) stops the app as Ctrl-C does: the server closes and the
    # exit handlers run, which remove the private folder of exports. Python's default for
    # SIGTERM ends the process without them.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    from chat.config import EXIT_BAD_CONFIGURATION, load_settings
    from chat.conversation.errors import ConfigError
    from chat.conversation.log_safety import configure_logging
    from chat.factory import build_backend

    try:
        settings = load_settings(argv)
        configure_logging(log_messages=settings.log_messages)
        # Gradio's launch checks its own page with httpx: two INFO lines that say nothing to the reader.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        backend = build_backend(settings)
    except ConfigError as error:
        print(f"app.py: error: {error.user_message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_CONFIGURATION)

    from chat.web.operations import Operations, log_start
    from chat.web.page import build_demo, launch_options

    operations = Operations(backend, log_messages=settings.log_messages)
    log_start(backend, settings.endpoints)
    demo = build_demo(backend, settings, operations)
    # Quiet: Gradio's own start-up lines end with a hint to set `share=True`, an option this app
    # does not offer (a public tunnel to a model server); it says where the page is instead.
    demo.launch(**launch_options(settings, operations), quiet=True, prevent_thread_lock=True)
    print(f"Falcon Chat is running on {demo.local_url}", flush=True)
    demo.block_thread()  # until Ctrl-C or SIGTERM, which close the server


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # stopped while starting: the exit handlers still run
        sys.exit(130)
