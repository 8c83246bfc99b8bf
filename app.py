"""Falcon Chat: `python app.py --help` lists the settings; the README explains them."""

from __future__ import annotations

import logging
import sys


def main(argv: list[str] | None = None) -> None:
    from chat.config import load_settings
    from chat.errors import ConfigError
    from chat.factory import build_backend

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(argv)
        backend = build_backend(settings)
    except ConfigError as error:
        sys.exit(f"app.py: error: {error.user_message}")

    from chat.ui import build_demo, launch_options

    demo = build_demo(backend, settings)
    demo.launch(**launch_options(settings, demo))


if __name__ == "__main__":
    main()
