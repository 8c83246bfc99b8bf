"""The app on the scripted model (conftest.ScriptedBackend) as a process of its own, built and
launched as app.py does it: for the test that restarts the server.

    python -m tests.browser.scripted_app PORT
"""

from __future__ import annotations

import sys


def main(port: int) -> None:
    from chat.config import Settings
    from chat.web.operations import Operations
    from chat.web.page import build_demo, launch_options
    from tests.browser.conftest import ScriptedBackend

    backend, settings = ScriptedBackend(), Settings(port=port)
    operations = Operations(backend)
    demo = build_demo(backend, settings, operations)
    demo.launch(**launch_options(settings, operations), quiet=True, prevent_thread_lock=True)
    print(f"running on {demo.local_url}", flush=True)
    demo.block_thread()


if __name__ == "__main__":
    main(int(sys.argv[1]))
