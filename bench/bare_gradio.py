"""The least chat app Gradio allows, for bench/load.py's framework floor (`--bare-gradio`).

    python bench/bare_gradio.py --endpoint http://127.0.0.1:8080 --port 7861 [--first-and-last]

A `gr.ChatInterface` with the same `/chat` inputs as the real app, whose async generator streams
TGI's `/generate_stream` with `httpx.AsyncClient` in the event loop (no threads), cuts the reply at
the first "\\nUser:" and yields the text at every token (or, with --first-and-last, only at the
first token and at the end: the least streaming there can be). No prompt format, no context fitting, no
token counting, no stop filter beyond that cut, no pacing, no figures: what is left is Gradio's own
cost per request and per update. The load benchmark runs it with the same double and clients, so
the real app's figures can be read against the floor the framework sets on the same machine.
"""

from __future__ import annotations

import argparse
import json

import gradio as gr
import httpx


def build(endpoint: str, every_token: bool = True) -> gr.Blocks:
    http = httpx.AsyncClient(base_url=endpoint, timeout=60, limits=httpx.Limits(max_connections=None))

    async def respond(
        message, history, system_prompt, temperature, max_new_tokens, top_p, repetition_penalty, seed
    ):
        request = {
            "inputs": f"User: {message}\nFalcon:",
            "parameters": {"max_new_tokens": int(max_new_tokens), "details": True},
            "stream": True,
        }
        text = ""
        async with http.stream("POST", "/generate_stream", json=request) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                token = json.loads(line[5:])["token"]
                if token.get("special"):
                    continue
                first = not text
                text += token["text"]
                if "\nUser:" in text:
                    break
                if every_token or first:
                    yield text.strip()
        yield text.split("\nUser:")[0].strip()

    return gr.ChatInterface(
        respond,
        additional_inputs=[gr.Textbox(), gr.Number(), gr.Number(), gr.Number(), gr.Number(), gr.Textbox()],
        api_name="chat",
        concurrency_limit=None,
    ).queue(max_size=1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--first-and-last",
        action="store_true",
        help="yield only the first token and the whole reply: two updates per reply",
    )
    args, _ = parser.parse_known_args()
    demo = build(args.endpoint, every_token=not args.first_and_last)
    from fastapi.responses import PlainTextResponse
    from fastapi.routing import APIRoute

    health = APIRoute("/healthz", lambda: PlainTextResponse("ok"), methods=["GET"])
    demo.launch(
        server_name="127.0.0.1", server_port=args.port, max_threads=200, app_kwargs={"routes": [health]}
    )


if __name__ == "__main__":
    main()
