"""Falcon Chat: `python app.py --help` lists the settings; the README explains them."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("falcon_chat")


def main(argv: list[str] | None = None) -> None:
    from chat.config import EXIT_BAD_CONFIGURATION, load_settings
    from chat.conversation.errors import ConfigError
    from chat.factory import build_backend

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Gradio's launch checks its own page with httpx: two INFO lines that say nothing to the reader.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        settings = load_settings(argv)
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
    demo.block_thread()


if __name__ == "__main__":
    main()
