"""What a hostile client or a hostile model output must not reach: the page, memory, the disk.

- The chat shows user and model text as text: Gradio's chat sanitizer keeps forms, inputs, inline
  styles and remote images, so the Chatbot is built to show such tags as the text they are
  (`text_only_chatbot`: Gradio's own `allow_tags`, applied before its sanitizer; `harden_demo`
  checks every Chatbot has it), `CHAT_CSS` keeps a message's content inside its bubble, and
  `content_security_policy` stops what is left at the browser:
  forms post only to the app, images come only from the app or `data:`, no inline `style`
  attribute applies, no script from another site runs.
- Links: Gradio's sanitizer checks the scheme of HTML links only, so `<svg><a
  href="javascript:...">` survived it and ran on a click. `URL_GUARD_HEAD` removes, from every
  element of rendered markdown (messages, the description; SVG and MathML included), any URL
  attribute whose scheme, as the browser reads it (case, entities, spaces and tabs resolved), is
  not http, https or mailto. Behind it, the page's policy allows no inline script but Gradio's
  own (`SecurityHeadersMiddleware` gives the page's scripts a nonce per response) and ours (by
  hash), so a `javascript:` URL would not run either.
- `BodyLimitMiddleware` refuses request bodies over `--max-request-bytes` with HTTP 413 before
  Gradio reads them, and JSON bodies that hold more than `MAX_JSON_VALUES` values or nest
  deeper than `MAX_JSON_DEPTH` before anything parses them (2 MiB of `{},` is 700,000 objects);
  `forget_input_values` stops Gradio keeping each session's last input
  values (it keeps them only for deep links, which this app does not offer); that patch and
  `check_value_counts` live with the other Gradio workarounds in chat/web/gradio_patches/costs.py.
- What one client may hold (connections, time to send a request, requests a second) is
  chat/web/connections.py's, wired in here (`harden_launch_options`).
- `ClosedRoutesMiddleware` answers 404 on Gradio routes that write client data to disk and that
  the app never uses (file upload, deep links), and on its file route asked for a URL (Gradio
  resolved any host a client named there); Gradio's cache of files the app hands out lives in
  a private folder and is cleaned while the app runs and at exit (`private_gradio_cache`,
  `harden_demo`).
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import gradio as gr
import numpy as np
from starlette.middleware import Middleware

from chat.web.connections import ClientLimits, client_middleware, install_connection_guard
from chat.web.embedding import frame_ancestors
from chat.web.gradio_patches.costs import check_value_counts, forget_input_values
from chat.web.gradio_patches.tracebacks import log_gradio_tracebacks

# Tags the chat shows as text instead of rendering them. Gradio escapes these in the HTML that its
# markdown renderer makes (so a markdown image shows as its <img ...> text) before it sanitizes;
# KaTeX's math, added afterwards, is not affected. Forms and their fields, everything that loads
# or embeds another resource, and everything that styles or redirects the page. Not `button` nor
# `svg`: Gradio's renderer itself puts a copy button with an SVG icon on every code block (a button
# outside a form does nothing, and the sanitizer leaves no script or handler on it).
UNTRUSTED_TAGS = (
    *("form", "input", "textarea", "select", "option", "optgroup", "datalist", "label", "fieldset"),
    *("legend", "output", "meter", "progress", "dialog", "menu"),
    *("img", "picture", "source", "srcset", "video", "audio", "track", "map", "area", "canvas"),
    *("iframe", "frame", "frameset", "object", "embed", "applet", "portal", "fencedframe"),
    *("math", "image", "use", "feimage", "foreignobject"),
    *("style", "link", "meta", "base", "noscript", "template", "slot", "marquee", "font", "center"),
)

# Whatever a message's own markup does, it stays inside its bubble: a `position: fixed` element
# is placed and clipped within the content box (CSS containment), not over the page. The
# `style-src-attr 'none'` policy below already drops inline styles; this also holds where the
# app runs without its own headers (the <gradio-app> web component inside another site's page).
# The page-level flex layout that Gradio's index.html sets in style attributes is restated here,
# since the policy drops those attributes too.
CHAT_CSS = """<style>
[data-testid="user"] .message-content, [data-testid="bot"] .message-content,
[data-testid="user"] .prose, [data-testid="bot"] .prose { contain: paint; isolation: isolate; }
html { margin: 0; padding: 0; min-height: 100%; display: flex; flex-direction: column; }
body { width: 100%; margin: 0; padding: 0; display: flex; flex-direction: column; flex-grow: 1; }
gradio-app { display: flex; flex-direction: column; flex-grow: 1; }
</style>"""

URL_GUARD_HEAD = """<script>
/* Falcon Chat: rendered markdown (chat messages, the description) keeps only http, https and
   mailto URLs. Gradio's sanitizer checks the scheme of HTML links only (an SVG <a
   href="javascript:..."> passed it): every URL attribute of every element added there is read
   as the browser reads it (entities decoded, case, spaces and tabs ignored) and removed if it
   has another scheme, before anything can be clicked. Only elements that carry such an attribute
   are looked at, so a streaming reply costs next to nothing. chat/web/security.py */
(function () {
  var SAFE = { "http:": true, "https:": true, "mailto:": true };
  var NAMES = ["href", "src", "srcset", "action", "formaction", "poster", "data", "background",
    "cite", "codebase", "longdesc", "lowsrc", "ping", "manifest", "usemap", "itemtype", "to",
    "from", "values", "by"];
  var CARRIERS = "[*|href]," + NAMES.slice(1).map(function (name) { return "[" + name + "]"; }).join(",");
  var RENDERED = ".md, .prose, .message-content, [data-testid=bot], [data-testid=user]";
  function safe(value) {
    try { return SAFE[new URL(value, document.baseURI).protocol] === true; } catch (e) { return false; }
  }
  function clean(element) {
    if (!element.closest(RENDERED)) return;
    Array.prototype.slice.call(element.attributes).forEach(function (attribute) {
      if (NAMES.indexOf(attribute.localName.toLowerCase()) >= 0 && !safe(attribute.value)) {
        element.removeAttributeNode(attribute);
      }
    });
  }
  function cleanTree(node) {
    if (node.nodeType !== 1) return;
    if (node.matches(CARRIERS)) clean(node);
    Array.prototype.forEach.call(node.querySelectorAll(CARRIERS), clean);
  }
  new MutationObserver(function (records) {
    records.forEach(function (record) {
      if (record.type === "attributes") clean(record.target);
      else Array.prototype.forEach.call(record.addedNodes, cleanTree);
    });
  }).observe(document.documentElement, { subtree: true, childList: true, attributes: true, attributeFilter: NAMES });
  cleanTree(document.documentElement);
})();
</script>"""

# Routes of Gradio's that store what a client sends on disk, which this app never uses.
CLOSED_ROUTES = ("/gradio_api/upload", "/gradio_api/deep_link", "/upload", "/deep_link")


_BREAKS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_BACKTICK_RUNS = re.compile(r"`+")


def markdown_code(text: str) -> str:
    """`text` (a server's model id, anything from outside) as a Markdown code span, to show as the
    text it is: inside a code span no tag, link, emphasis, autolink, entity or escape is read, and
    the chat's math renderer (KaTeX) skips code, where backslash escapes would have made `\\[x\\]`
    display math in the Chatbot. The fence is one backtick longer than any run inside; line breaks
    become spaces."""
    text = _BREAKS.sub(" ", text)
    if not text.strip():
        return ""
    fence = "`" * (max((len(run) for run in _BACKTICK_RUNS.findall(text)), default=0) + 1)
    pad = " " if text.startswith(("`", " ")) or text.endswith(("`", " ")) else ""  # CommonMark strips one
    return f"{fence}{pad}{text}{pad}{fence}"


def content_security_policy(
    frame_origins: Iterable[str] = (), *, nonce: str | None = None, script_hashes: Iterable[str] = ()
) -> str:
    """The page's policy. Scripts: the app's own files, the page's inline scripts by `nonce` (one
    per response), the head's scripts (`launch(head=...)`, which Gradio's page adds itself) by
    hash, and `eval` (Gradio's HTML component compiles templates, its events' `js` is a function
    made from text); no other inline script, so no `javascript:` URL and no event handler
    attribute runs. Inline <style> elements (the theme) and `blob:`/`data:` for fonts and
    downloads; nothing from another site."""
    scripts = ["'self'", *([f"'nonce-{nonce}'"] if nonce else []), *script_hashes, "'unsafe-eval'"]
    directives = [
        "default-src 'self'",
        "script-src " + " ".join(scripts),
        "style-src 'self' 'unsafe-inline'",
        "style-src-attr 'none'",
        "img-src 'self' data: blob:",
        "media-src 'self' data: blob:",
        "font-src 'self' data:",
        "connect-src 'self'",
        "form-action 'self'",
        "object-src 'none'",
        "base-uri 'self'",
    ]
    frame_origins = tuple(frame_origins)
    if frame_origins:
        directives.append(frame_ancestors(frame_origins))
    return "; ".join(directives)


def script_hashes(head: str) -> tuple[str, ...]:
    """CSP hash sources for the inline scripts in `head`."""
    return tuple(
        "'sha256-" + base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode() + "'"
        for body in re.findall(r"<script>(.*?)</script>", head, flags=re.DOTALL)
    )


_SCRIPT_TAG = re.compile(rb"<script(?=[\s>])")


class SecurityHeadersMiddleware:
    """ASGI middleware: the Content-Security-Policy on HTML responses, whose `<script>` tags get a
    nonce of the response's own; `nosniff` on all. (Gradio's page is a template with inline
    scripts; text from a config in it is JSON with `<` escaped, so every `<script` in it is
    Gradio's.)"""

    def __init__(self, app, frame_origins: Iterable[str] = (), script_hashes: Iterable[str] = ()):
        self.app = app
        self.frame_origins = tuple(frame_origins)
        self.script_hashes = tuple(script_hashes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start: dict | None = None
        body = bytearray()

        async def send_with_headers(message):
            nonlocal start
            if message["type"] == "http.response.start":
                headers = [
                    (k, v) for k, v in message.get("headers") or [] if k.lower() != b"x-content-type-options"
                ]
                headers.append((b"x-content-type-options", b"nosniff"))
                message = {**message, "headers": headers}
                if _header(headers, b"content-type").startswith(b"text/html") and not _header(
                    headers, b"content-encoding"
                ):
                    start = message  # held until the whole page is here
                    return
                return await send(message)
            if start is None or message["type"] != "http.response.body":
                return await send(message)
            body.extend(message.get("body", b""))
            if not message.get("more_body", False):
                await self._send_page(send, start, bytes(body))

        return await self.app(scope, receive, send_with_headers)

    async def _send_page(self, send, start: dict, page: bytes) -> None:
        nonce = secrets.token_urlsafe(18)
        page = _SCRIPT_TAG.sub(b'<script nonce="' + nonce.encode() + b'"', page)
        policy = content_security_policy(self.frame_origins, nonce=nonce, script_hashes=self.script_hashes)
        headers = [
            (k, v)
            for k, v in start["headers"]
            if k.lower() not in (b"content-security-policy", b"content-length")
        ]
        headers += [
            (b"content-security-policy", policy.encode("latin-1")),
            (b"content-length", b"%d" % len(page)),
        ]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": page})


def _header(headers, name: bytes) -> bytes:
    return next((v for k, v in headers if k.lower() == name), b"")


class _BodyTooLarge(Exception):
    pass


# What a JSON body may hold, checked before it is parsed: a 2 MiB body of `{},` builds ~700,000
# objects (~150 MB in Gradio's hands). A 1,000-turn conversation is ~20,000 values, 7 deep.
MAX_JSON_VALUES = 100_000
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_OPENS, _CLOSES = np.zeros(256, np.int8), np.zeros(256, np.int8)
_OPENS[[ord("["), ord("{")]] = 1
_CLOSES[[ord("]"), ord("}")]] = 1


def json_shape_problem(body: bytes) -> str | None:
    """Why a JSON body holds too much to be parsed (too many values, nested too deep), or None;
    counted on its bytes with its strings left out, without building anything."""
    skeleton = np.frombuffer(_JSON_STRING.sub(b'""', body), np.uint8)
    opens, closes = _OPENS[skeleton], _CLOSES[skeleton]
    values = int(opens.sum()) + int(np.count_nonzero(skeleton == ord(",")))
    if values > MAX_JSON_VALUES:
        return f"The request holds {values:,} JSON values; this server accepts at most {MAX_JSON_VALUES:,}."
    depth = int(np.cumsum(opens - closes, dtype=np.int32).max(initial=0))
    if depth > MAX_JSON_DEPTH:
        return f"The request nests JSON {depth:,} levels deep; this server accepts at most {MAX_JSON_DEPTH}."
    return None


class BodyLimitMiddleware:
    """ASGI middleware: request bodies over `max_bytes` get HTTP 413 before the app stores them,
    and so do JSON bodies that hold too much (`json_shape_problem`) before anything parses them.

    A declared Content-Length over the limit is refused before a byte of the body is read; a body
    without one (chunked) is counted as it arrives and cut off where it passes the limit. A JSON
    body (Gradio's API takes nothing else) is read whole first, then handed on as it came."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            return await self._refuse(send, declared)
        if scope.get("method") in ("POST", "PUT", "PATCH") and _is_json(scope):
            return await self._checked_json(scope, receive, send)
        received = 0
        exceeded = False
        started = False

        async def counting_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            if exceeded:
                return  # whatever the app answers to a cut-off body, the client gets the 413
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            pass
        if exceeded and not started:
            await self._refuse(send, None)

    async def _checked_json(self, scope, receive, send):
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before its body was whole
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._refuse(send, None)
            if not message.get("more_body", False):
                break
        problem = json_shape_problem(bytes(body))
        if problem is not None:
            return await _json_response(send, 413, {"error": problem}, close=True)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: a disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send, declared: int | None) -> None:
        size = f"{declared:,} bytes" if declared is not None else f"over {self.max_bytes:,} bytes"
        error = f"The request is {size}; this server accepts at most {self.max_bytes:,} bytes."
        await _json_response(send, 413, {"error": error}, close=True)


def _is_json(scope) -> bool:
    """A body FastAPI would parse as JSON: declared as JSON, or declared as nothing."""
    content_type = _header(scope.get("headers") or [], b"content-type").split(b";")[0].strip().lower()
    return content_type in (b"", b"application/json") or content_type.endswith(b"+json")


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers") or []:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class ClosedRoutesMiddleware:
    """ASGI middleware: 404 for `CLOSED_ROUTES` (and anything under them), whatever the method,
    and for Gradio's file route asked for a URL (`/gradio_api/file=http://host/...`): Gradio
    resolves the host the client names to decide whether to fetch it, and this app hands out no
    such URL."""

    def __init__(self, app, routes: Iterable[str] = CLOSED_ROUTES):
        self.app = app
        self.routes = tuple(route.rstrip("/") for route in routes)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path = scope.get("path", "").rstrip("/")
            root = scope.get("root_path", "").rstrip("/")
            if root and path.startswith(root):
                path = path[len(root) :]
            closed = any(path == route or path.startswith(route + "/") for route in self.routes)
            if closed or _FILE_URL.match(path):
                return await _json_response(send, 404, {"error": "Not Found"})
        return await self.app(scope, receive, send)


# Gradio's file route (`/file=...`, also under /gradio_api) with a URL in place of a path.
_FILE_URL = re.compile(r"(?:/gradio_api)?/file=\s*[a-z][a-z0-9+.-]*:", re.IGNORECASE)


class ApiCallErrorsMiddleware:
    """ASGI middleware: Gradio's keyword route (`/gradio_api/call/v2/NAME`) raises on a parameter
    the endpoint does not have (TypeError) or an endpoint that does not exist (KeyError), which
    the server answers with a bare HTTP 500. Answer 422 or 404 with what was wrong instead."""

    PREFIX = "/gradio_api/call/v2/"

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get("path", "").startswith(self.PREFIX):
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            return await self.app(scope, receive, tracking_send)
        except (TypeError, KeyError, ValueError) as error:
            if started:
                raise
            name = scope["path"][len(self.PREFIX) :].strip("/")
            if isinstance(error, KeyError):
                status, text = 404, f"There is no API endpoint named /{name}."
            else:  # Gradio's own words name the parameter; no traceback
                status, text = 422, str(error).split(". Please click")[0][:300] + "."
            await _json_response(send, status, {"error": text})


async def _json_response(send, status: int, payload: dict, *, close: bool = False) -> None:
    """The one way these middlewares answer: a JSON body, its length counted by us."""
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if close:  # the rest of a refused body is not read: the connection cannot be reused
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def security_middleware(
    *,
    max_request_bytes: int,
    frame_origins: Iterable[str] = (),
    head: str = "",
    limits: ClientLimits | None = None,
) -> list[Middleware]:
    """The middleware above, outermost first (Starlette runs the list in this order): the limits
    per client (chat.web.connections) first, so a flood costs the least; `head` is what the
    page's head gets (its scripts are allowed by hash)."""
    return [
        *(client_middleware(limits) if limits is not None else []),
        Middleware(BodyLimitMiddleware, max_bytes=max_request_bytes),
        Middleware(ClosedRoutesMiddleware),
        Middleware(ApiCallErrorsMiddleware),
        Middleware(
            SecurityHeadersMiddleware, frame_origins=tuple(frame_origins), script_hashes=script_hashes(head)
        ),
    ]


def harden_launch_options(
    options: dict,
    *,
    max_request_bytes: int,
    frame_origins: Iterable[str] = (),
    limits: ClientLimits | None = None,
) -> dict:
    """`demo.launch` options with the middleware, the chat's CSS and link guard, the limits per
    client (their connection half in uvicorn: chat.web.connections) and the page kept in Python
    (a Node server rendering the page in front, Gradio's SSR mode, would not send the headers)."""
    if limits is not None:
        install_connection_guard()
    head = (options.get("head") or "") + CHAT_CSS + URL_GUARD_HEAD
    app_kwargs = dict(options.get("app_kwargs") or {})
    app_kwargs["middleware"] = [
        *security_middleware(
            max_request_bytes=max_request_bytes, frame_origins=frame_origins, head=head, limits=limits
        ),
        *app_kwargs.get("middleware", []),
    ]
    return {**options, "app_kwargs": app_kwargs, "head": head, "ssr_mode": False}


def text_only_chatbot() -> dict:
    """The `gr.Chatbot` arguments that have it show the tags of UNTRUSTED_TAGS as the text they are
    (Gradio's own `allow_tags`, applied before its sanitizer)."""
    return {"sanitize_html": True, "allow_tags": list(UNTRUSTED_TAGS)}


def harden_demo(demo: gr.Blocks, *, cache_cleanup_s: int = 600) -> gr.Blocks:
    """Check that every chat shows its messages' markup as text (a Chatbot built without
    `text_only_chatbot()` stops the start), have Gradio delete the files it hands out (exports)
    once they are `cache_cleanup_s` old, and all of them at exit, and log the tracebacks it
    would print."""
    for block in demo.blocks.values():
        if isinstance(block, gr.Chatbot) and not shows_tags_as_text(block):
            raise RuntimeError(
                f"The Chatbot {block.elem_id or block.label!r} is built without "
                "chat.web.security.text_only_chatbot(): its messages' forms and images would render."
            )
    demo.delete_cache = (cache_cleanup_s, cache_cleanup_s)
    forget_input_values()
    check_value_counts(demo)
    log_gradio_tracebacks()
    return demo


def shows_tags_as_text(chatbot: gr.Chatbot) -> bool:
    wanted = text_only_chatbot()
    allowed = chatbot.allow_tags if isinstance(chatbot.allow_tags, list) else []
    return chatbot.sanitize_html is True and set(allowed) >= set(wanted["allow_tags"])


EXPORTS_DISK_BUDGET = 64 * 1024 * 1024  # bytes of export files kept; a conversation's take KBs
EXPORT_KEPT_S = 600  # an export stays downloadable this long, whatever others export (Gradio's cache age)
EXPORTS_FULL = (
    "Too many conversations have been exported in the last few minutes to keep another. "
    "Please try again in a few minutes."
)


def export_folder() -> Path:
    """A new private folder for one export's files. Gradio serves files from its cache folder as
    they are, so exports written there are never copied. Every export is kept `EXPORT_KEPT_S`
    (a link someone was just given keeps working, whatever others export); older ones go,
    oldest first, once all take more than `EXPORTS_DISK_BUDGET`; while younger ones alone take
    that much (an export loop), a new export is refused with one sentence (`gr.Error`). All go at
    exit with the private cache."""
    root = Path(private_gradio_cache()) / "exports"
    root.mkdir(mode=0o700, exist_ok=True)
    folders = sorted((f for f in root.iterdir() if f.is_dir()), key=_modified)  # oldest first
    sizes = {folder: sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) for folder in folders}
    kept, now = sum(sizes.values()), time.time()
    for old in folders:
        if kept <= EXPORTS_DISK_BUDGET or now - _modified(old) < EXPORT_KEPT_S:
            break
        shutil.rmtree(old, ignore_errors=True)
        kept -= sizes[old]
    if kept > EXPORTS_DISK_BUDGET:
        raise gr.Error(EXPORTS_FULL, print_exception=False)
    return Path(tempfile.mkdtemp(dir=root))


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def private_gradio_cache() -> str:
    """A folder only this user can read, for the files Gradio hands out (exports), removed at exit.
    Gradio's default, /tmp/gradio, is shared and its files are world-readable. Call before the
    page is built; an operator's GRADIO_TEMP_DIR is kept."""
    if "GRADIO_TEMP_DIR" not in os.environ:
        folder = tempfile.mkdtemp(prefix="falcon-chat-files-")  # mode 0700
        os.environ["GRADIO_TEMP_DIR"] = folder
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return os.environ["GRADIO_TEMP_DIR"]
