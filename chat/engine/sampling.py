"""Choosing the next token on the GPU: transformers' logits processors, with the knobs in tensors.

Every function here reads the request's parameters from tensors (`Knobs`), never from Python
values, so one captured CUDA graph serves every request; nothing waits on the host.
"""

from __future__ import annotations

import math

import torch

from chat.conversation.params import GenerationParams


class Knobs:
    """A request's sampling parameters as GPU tensors, so one captured graph serves them all."""

    def __init__(self, device):
        self.penalty = torch.ones(1, device=device)
        self.temperature = torch.ones(1, device=device)
        self.top_k_index = torch.zeros(1, dtype=torch.long, device=device)
        self.top_p = torch.ones(1, device=device)

    def set(self, params: GenerationParams, vocab: int) -> None:
        top_k = params.top_k if 0 < params.top_k < vocab else vocab  # 0 means off
        self.penalty.fill_(params.repetition_penalty)
        self.temperature.fill_(params.temperature if not params.greedy else 1.0)
        self.top_k_index.fill_(top_k - 1)
        self.top_p.fill_(params.top_p)

    def tensors(self) -> tuple:
        return self.penalty, self.temperature, self.top_k_index, self.top_p


def choose(logits, seen, knobs: tuple, not_last, greedy: bool, history, pos, probs_out=None) -> None:
    """Pick the token after history[pos], write it to history[pos + 1] and mark it seen.

    `knobs` is `Knobs.tensors()`; `not_last` is all True but its last entry (see sampling_probs).
    When sampling, `probs_out` (if given) receives the distribution drawn from: a draft model's
    q for speculation's acceptance rule (speculation.py).
    """
    penalty = knobs[0]
    logits = torch.where(seen, penalize(logits, penalty), logits)
    if greedy:
        token = logits.argmax(-1, keepdim=True)
    else:
        probs = sampling_probs(logits, knobs, not_last)
        if probs_out is not None:
            probs_out.copy_(probs)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws index i with probability p_i,
        # without multinomial's host synchronisation.
        token = (probs / torch.empty_like(probs).exponential_(1)).argmax(-1, keepdim=True)
    history.index_copy_(0, pos + 1, token)
    seen.index_fill_(0, token, True)


def penalize(logits, penalty):
    """transformers' RepetitionPenaltyLogitsProcessor, for the tokens it is applied to."""
    return torch.where(logits < 0, logits * penalty, logits / penalty)


def sampling_probs(logits, knobs, not_last):
    """Temperature, then top-k, then top-p, as transformers orders and defines them; probabilities.

    `logits` is [vocab], or [rows, vocab] (a verify step's rows) with the same knobs for each row.
    """
    _, temperature, top_k_index, top_p = knobs
    scores = logits / temperature
    ascending, order = scores.sort(descending=False)
    vocab = scores.shape[-1]
    # top-k: drop what is below the k-th largest (ties with it stay), k = index + 1.
    kth = ascending.gather(-1, (vocab - 1 - top_k_index).expand(*ascending.shape[:-1], 1))
    ascending = ascending.masked_fill(ascending < kth, -math.inf)
    # top-p: drop the low tail whose total probability is at most 1 - top_p; keep the top token.
    tail = ascending.softmax(-1).cumsum(-1) <= (1 - top_p)
    ascending = ascending.masked_fill(tail & not_last, -math.inf)
    return torch.zeros_like(scores).scatter_(-1, order, ascending.softmax(-1))
