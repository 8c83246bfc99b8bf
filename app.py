"""Falcon Chat: `python app.py --help` lists the settings; the README explains them."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from chat.config import load_settings
    from chat.conversation.errors import ConfigError
    from chat.conversation.log_safety import configure_logging
    from chat.factory import build_backend

    try:
        settings = load_settings(argv)
        configure_logging(log_messages=settings.log_messages)
        backend = build_backend(settings)
    except ConfigError as error:
        sys.exit(f"app.py: error: {error.user_message}")

    from chat.web.operations import Operations
    from chat.web.page import build_demo, launch_options

    operations = Operations(backend, log_messages=settings.log_messages)
    demo = build_demo(backend, settings, operations)
    # Quiet: Gradio's own start-up lines end with a hint to set `share=True`, an option this app
    # does not offer (a public tunnel to a model server); it says where the page is instead.
    demo.launch(**launch_options(settings, operations), quiet=True, prevent_thread_lock=True)
    print(f"Falcon Chat is running on {demo.local_url}", flush=True)
    demo.block_thread()


if __name__ == "__main__":
    main()
