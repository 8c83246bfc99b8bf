"""Backends: where tokens come from, each implementing `chat.conversation.backend.Backend`.

`remote/` talks to an inference server over HTTP (and never imports torch); `local/` runs a model in
this process (transformers' `generate`, or the fast decoder in `chat.engine`). Backends take plain
constructor arguments and read no configuration: `chat.factory` turns the app's `Settings` into one.
"""
