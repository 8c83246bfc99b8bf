"""Being framed by other people's pages: who may frame the app, and storage where a frame has none.

By default the app sends no frame-blocking header, so any page can embed it in an iframe.
`--allow-embed-from ORIGINS` restricts that with `Content-Security-Policy: frame-ancestors 'self'
ORIGINS` on the page's HTML responses (the header only means something on documents), as part of
the page's one policy (`chat.web.security.content_security_policy`).

A cross-site frame is often denied all storage (Chromium with third-party cookies blocked, Safari,
Firefox's strict mode): merely reading `window.localStorage` throws SecurityError there. Gradio's
`BrowserState`, which every `gr.ChatInterface` contains, reads it unguarded at mount, and the frame
stays on "Loading...". `STORAGE_FALLBACK_HEAD` swaps in an in-memory storage only in that case, so
the chat works and its history lasts as long as the page.
"""

from __future__ import annotations

from collections.abc import Iterable

STORAGE_FALLBACK_HEAD = """<script>
/* Falcon Chat: where this page is framed cross-site and the browser denies it storage, reading
   localStorage throws and Gradio's saved history would stop the page loading. Only then, use an
   in-memory storage: the chat works, and its history lasts until the page is closed. */
(function () {
  function memoryStorage() {
    var items = new Map();
    return {
      get length() { return items.size; },
      key: function (i) { var keys = Array.from(items.keys()); return i < keys.length ? keys[i] : null; },
      getItem: function (k) { k = String(k); return items.has(k) ? items.get(k) : null; },
      setItem: function (k, v) { items.set(String(k), String(v)); },
      removeItem: function (k) { items.delete(String(k)); },
      clear: function () { items.clear(); }
    };
  }
  ["localStorage", "sessionStorage"].forEach(function (name) {
    try {
      window[name].getItem("falcon-chat-storage-check");
    } catch (error) {
      Object.defineProperty(window, name, { value: memoryStorage(), configurable: true });
      window.falconChatMemoryStorage = true;
    }
  });
})();
</script>"""


def frame_ancestors(origins: Iterable[str]) -> str:
    """The Content-Security-Policy value that lets the app itself and `origins` frame it."""
    return " ".join(["frame-ancestors", "'self'", *origins])


def embedding_launch_options(allow_embed_from: tuple[str, ...]) -> dict:
    """`demo.launch` keyword arguments: the storage fallback. (`frame-ancestors` for
    `allow_embed_from` is part of the page's one policy, `chat.web.security.content_security_policy`.)"""
    return {"head": STORAGE_FALLBACK_HEAD}
