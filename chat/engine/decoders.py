"""Decoders: what turns a prompt's token ids into new token ids, one at a time.

A `Decoder` runs one generation on the local backend's worker thread, calling `emit(token_id)`
per new token and checking `cancelled()` between tokens. `PlainDecoder` is transformers' own
`generate`; `decode_loop.FastDecoder` is the static-cache, CUDA-graph loop. Which one serves, and
the fall-back to plain `generate` when the fast one cannot start, are build.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from chat.conversation.backend import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP
from chat.conversation.params import GenerationParams


class Decoder(Protocol):
    """Runs one generation, calling `emit(token_id)` per new token, checking `cancelled()`."""

    name: str

    def generate(
        self,
        input_ids,
        params: GenerationParams,
        seed: int,
        emit: Callable[[int], None],
        cancelled: Callable[[], bool],
    ) -> str:
        """Returns the finish reason (FINISH_STOP, FINISH_LENGTH or FINISH_CANCELLED)."""


class PlainDecoder:
    """transformers' own `generate`, fed to our stream one token at a time."""

    name = "plain generate"

    def __init__(self, model, tokenizer):
        self.model = model
        self.eos_token_id = tokenizer.eos_token_id

    def generate(self, input_ids, params, seed, emit, cancelled) -> str:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        state = {"count": 0, "last": None, "prompt_seen": False}

        class Emitter(BaseStreamer):
            def put(self, value):
                if not state["prompt_seen"]:  # generate first hands over the prompt itself
                    state["prompt_seen"] = True
                    return
                for token_id in value.reshape(-1).tolist():
                    state["count"] += 1
                    state["last"] = token_id
                    emit(token_id)

            def end(self):
                pass

        class Cancelled(StoppingCriteria):
            # transformers' streamers cannot stop generate; a stopping criterion can, per token.
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full(
                    (input_ids.shape[0],), cancelled(), dtype=torch.bool, device=input_ids.device
                )

        torch.manual_seed(seed)
        sampling = {}
        if not params.greedy:
            sampling = dict(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        input_ids = input_ids.to(self.model.device)
        with torch.inference_mode():
            self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=params.max_new_tokens,
                do_sample=not params.greedy,
                repetition_penalty=params.repetition_penalty,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.eos_token_id,
                streamer=Emitter(),
                stopping_criteria=StoppingCriteriaList([Cancelled()]),
                **sampling,
            )
        return finish_reason(state["last"], state["count"], params, self.eos_token_id, cancelled())


def finish_reason(last_token, count: int, params: GenerationParams, eos_token_id, cancelled) -> str:
    if cancelled:
        return FINISH_CANCELLED
    if last_token is not None and last_token == eos_token_id:
        return FINISH_STOP
    return FINISH_LENGTH if count >= params.max_new_tokens else FINISH_STOP
