"""A speculation proposer whose acceptance is set: it proposes a known continuation, each token
kept with probability `acceptance` and otherwise replaced by another token.

For benchmarks (ms per token against acceptance, bench/speculation_decode.py) and tests: with
greedy decoding and the reference being the model's own greedy continuation, a proposal is
accepted exactly when it was kept, so the acceptance is what was asked. `draft` (a FastDecoder)
makes each step also pay for a real draft model's steps, whose own proposals are then replaced.
"""

from __future__ import annotations

import random

import torch


class ScriptedProposer:
    """Proposes `reference[i:]` (the reply's next tokens), each kept with probability `acceptance`."""

    sampled = False  # a function of the history and its own seeded draws: q is one-hot

    def __init__(self, reference: list[int], acceptance: float, *, vocab: int, seed: int = 0, draft=None):
        self.reference, self.acceptance, self.vocab, self.seed = list(reference), acceptance, vocab, seed
        self.draft = draft
        self.draft_cost = 0.1 if draft is not None else 0.0
        self.name = f"scripted ({acceptance:.0%} kept)" + (" + draft steps" if draft is not None else "")
        self._random = random.Random(seed)
        self._start = 0
        self._length = 0

    def warm_up(self) -> None:
        if self.draft is not None:
            self.draft.warm_up()

    def start(self, decoder, tokens: list[int], params) -> None:
        self._random = random.Random(self.seed)
        self._start = len(tokens) - 1  # the first new token's index
        self._length = len(tokens)
        if self.draft is not None:
            from chat.engine.speculation import DraftModel

            self._drafting = DraftModel(self.draft)
            self._drafting.start(decoder, tokens, params)

    def propose(self, decoder, last: int, limit: int) -> int:
        if self.draft is not None:  # the draft's real cost; its tokens are replaced below
            limit = self._drafting.propose(decoder, last, limit)
        done = self._length - self._start  # reply tokens so far
        proposal = []
        for token in self.reference[done : done + limit]:
            keep = self._random.random() < self.acceptance
            proposal.append(token if keep else (token + 1) % self.vocab)
        if proposal:
            decoder.history[last + 1 : last + 1 + len(proposal)].copy_(torch.tensor(proposal))
        return len(proposal)

    def settle(self, decoder, last: int, tokens: list[int], proposed: int) -> None:
        self._length += len(tokens)
        if self.draft is not None:
            self._drafting.settle(decoder, last, tokens, proposed)
