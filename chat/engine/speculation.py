"""Speculative decoding: propose a few tokens cheaply, verify them in one step of the model.

At batch 1 a step reads every weight once whatever the number of rows it multiplies, so a step
over k + 1 rows (the newest token and k proposed ones) costs about one token's time and can yield
up to k + 1 tokens. Exactness comes from the acceptance rule (`accept`), run on the GPU inside the
verify step's graph:

- greedy: a proposal is kept while it equals the model's own argmax at that row; the first row
  that disagrees gives the model's token. The text is the non-speculative text.
- sampling: the standard rejection rule (Leviathan et al. 2023; Chen et al. 2023): proposal d at
  row i is kept with probability min(1, p_i(d) / q_i(d)), where p_i is the model's distribution
  (repetition penalty, temperature, top-k, top-p applied as `sampling.choose` applies them, the
  penalty counting the proposals before it) and q_i the proposer's; at the first rejection the
  token is drawn from max(p_i - q_i, 0) normalised, and when every proposal is kept a last one is
  drawn from the next row's p. Each token then has the non-speculative distribution. A proposer
  that is a function of the history (prompt lookup) has q one-hot at its proposal.

The static KV cache needs no copy to roll back: the verify step writes keys and values at all
k + 1 positions, and moving `pos` past only the accepted ones leaves the rest masked (attention
reads positions <= pos) until the next step overwrites them.

Proposers: `PromptLookup` (n-grams of the conversation itself: no model, strong where the reply
quotes the prompt: code edits, summaries) and `DraftModel` (a smaller model of the same family and
tokenizer, with its own static cache and graphs). `WidthChooser` adapts k to the acceptance seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chat.engine.sampling import penalize, sampling_probs

# Longest and shortest n-gram prompt lookup matches; the longest match found proposes.
NGRAM_MAX, NGRAM_MIN = 3, 1


@dataclass
class SpeculationStats:
    """One reply's speculation: verify steps, tokens proposed and proposals accepted, the verify
    steps that ended at a rejected proposal, and the one-token steps where nothing was proposed."""

    steps: int = 0
    proposed: int = 0
    accepted: int = 0
    rejections: int = 0
    plain_steps: int = 0

    @property
    def acceptance(self) -> float | None:
        """The chance a proposal is kept where the ones before it were (each proposal after a
        rejected one is never tried): accepted / (accepted + rejections)."""
        tried = self.accepted + self.rejections
        return self.accepted / tried if tried else None


# -- acceptance (on the GPU, inside the verify step's graph) ---------------------------------------


def accept(scores, seen, knobs, not_last, greedy: bool, history, pos, limit, q, accepted) -> None:
    """Accept a prefix of the proposals and write the token after it; move `pos` past them.

    scores [T, vocab] float32: row i is the model's logits after history[pos + 1 + i]; the
    proposals are history[pos + 2 .. pos + T], of which the first `limit` are real (a tensor, so
    one graph serves every count). q: the proposer's probabilities [T - 1, vocab], or None where a
    proposal is a function of the history. Writes the accepted count into `accepted` [1].
    """
    rows, vocab = scores.shape
    k = rows - 1
    offsets = torch.arange(rows, device=scores.device)
    proposals = history.index_select(0, pos + 2 + offsets[:k])  # [k]
    # The penalty at row i counts the proposals before it, as if they had been chosen.
    marked = torch.zeros(k, vocab, dtype=torch.int32, device=scores.device)
    marked.scatter_(1, proposals[:, None], 1)
    seen_rows = torch.cat((seen[None], seen[None] | (marked.cumsum(0) > 0)))  # [T, vocab]
    penalized = torch.where(seen_rows, penalize(scores, knobs[0]), scores)
    if greedy:
        chosen = penalized.argmax(-1)  # [T]
        kept = chosen[:k] == proposals
        fallback = chosen
    else:
        p = sampling_probs(penalized, knobs, not_last)  # [T, vocab]
        p_proposed = p[:k].gather(1, proposals[:, None])[:, 0]
        if q is None:  # one-hot at the proposal: kept with probability p(d)
            q_proposed = torch.ones_like(p_proposed)
            residual = p[:k].scatter(1, proposals[:, None], 0.0)
        else:
            q = q[:k]
            q_proposed = q.gather(1, proposals[:, None])[:, 0]
            residual = (p[:k] - q).clamp_min(0.0)
        kept = torch.rand(k, device=scores.device) * q_proposed <= p_proposed
        # A rejected row whose residual is all zero cannot happen in exact arithmetic (p(d) < q(d)
        # leaves mass elsewhere); in floating point it falls back to p.
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[:k])
        noise = torch.empty_like(p).exponential_(1)  # exponential race, as in sampling.choose
        drawn_residual = (residual / noise[:k]).argmax(-1)  # [k]
        drawn = (p / noise).argmax(-1)  # [T]: where no proposal was rejected
        fallback = torch.cat((drawn_residual, drawn[k:]))
        fallback = torch.where(offsets < limit, fallback, drawn)
    kept = kept & (offsets[:k] < limit)
    count = kept.to(torch.int32).cumprod(0).sum().reshape(1).long()  # leading proposals kept
    token = fallback.index_select(0, count)
    seen.copy_(seen_rows.index_select(0, count)[0])
    seen.index_fill_(0, token, True)
    history.index_copy_(0, pos + 2 + count, token)
    pos.add_(count + 1)
    accepted.copy_(count)


def verify_head(
    x, ln_f, lm_head, linear, gather, norm, seen, knobs, not_last, greedy, history, pos, limit, q, accepted
):
    """The verify step's last norm, its logits for every row, and `accept` (compiled as one piece)."""
    scores = gather(linear(norm(x, *ln_f), *lm_head)).float()
    accept(scores, seen, knobs, not_last, greedy, history, pos, limit, q, accepted)


# -- proposers ------------------------------------------------------------------------------------


class PromptLookup:
    """Proposes what followed the latest earlier occurrence of the newest n tokens (n = 3, 2, 1).

    An index per n maps each n-gram to where its latest occurrence with a continuation ends, kept
    up to date token by token: a proposal costs a few dictionary lookups, whatever the length.
    """

    name = "prompt lookup"
    sampled = False  # proposals are a function of the history (q one-hot)
    draft_cost = 0.0

    def __init__(self, max_ngram: int = NGRAM_MAX, min_ngram: int = NGRAM_MIN):
        self.sizes = tuple(range(max_ngram, min_ngram - 1, -1))
        self.tokens: list[int] = []
        self._ends: dict[int, dict[tuple, int]] = {}

    def warm_up(self) -> None:
        pass

    def start(self, decoder, tokens: list[int], params) -> None:
        """A new reply: `tokens` is the prompt and the first new token."""
        self.tokens = []
        self._ends = {n: {} for n in self.sizes}
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens) - 1  # the n-grams ending just before the newest token
            for n in self.sizes:
                if end >= n:
                    self._ends[n][tuple(self.tokens[end - n : end])] = end

    def lookup(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the newest n-gram's latest earlier occurrence."""
        for n in self.sizes:
            if len(self.tokens) < n:
                continue
            end = self._ends[n].get(tuple(self.tokens[-n:]))
            if end is not None:
                return self.tokens[end : end + limit]
        return []

    def propose(self, decoder, last: int, limit: int) -> int:
        proposal = self.lookup(limit)
        if proposal:
            ids = torch.tensor(proposal, dtype=torch.long)
            decoder.history[last + 1 : last + 1 + len(proposal)].copy_(ids)
        return len(proposal)

    def settle(self, decoder, last: int, tokens: list[int], proposed: int) -> None:
        self.extend(tokens)


class DraftModel:
    """A smaller model sharing the tokenizer proposes by decoding k tokens with its own decoder
    (a `FastDecoder` with its own static cache and graphs), sampling from its own distribution q
    with the same settings; its cache is rolled back to the accepted tokens after each step."""

    name = "draft model"
    sampled = True  # q is the draft's distribution (greedy: one-hot at its argmax)

    def __init__(self, draft, draft_cost: float = 0.1):
        self.draft = draft
        self.draft_cost = draft_cost  # one draft step's time over one target step's (WidthChooser)
        self._greedy = True

    def warm_up(self) -> None:
        self.draft.warm_up()

    def start(self, decoder, tokens: list[int], params) -> None:
        draft = self.draft
        self._greedy = params.greedy
        prompt = torch.tensor([tokens[:-1]])
        draft.knobs.set(params, draft.layout.vocab)
        draft._reset(prompt)
        draft._prefill(prompt.shape[-1], params.greedy)
        last = len(tokens) - 1
        draft.history[last : last + 1].copy_(decoder.history[last : last + 1])  # the target's choice
        draft.seen.copy_(decoder.seen)

    def propose(self, decoder, last: int, limit: int) -> int:
        """Decode `limit` draft tokens after history[last] into the decoder's history (and, when
        sampling, each one's q into `decoder.draft_probs`), without waiting for the GPU."""
        draft = self.draft  # its pos is last - 1: history[last] is the newest token, not yet fed
        for i in range(limit):
            draft._replay(self._greedy)
            if not self._greedy:
                decoder.draft_probs[i].copy_(draft.probs)
        decoder.history[last + 1 : last + 1 + limit].copy_(draft.history[last + 1 : last + 1 + limit])
        return limit

    def settle(self, decoder, last: int, tokens: list[int], proposed: int) -> None:
        """The step kept len(tokens) - 1 proposals and chose tokens[-1]: keep the draft's cache up
        to the kept tokens, feeding it the last proposal too where all were kept."""
        draft = self.draft
        newest = last + len(tokens)  # where the step's own token is
        if proposed and len(tokens) - 1 == proposed:  # all kept: the draft never fed the last one
            draft._replay(self._greedy)  # its own choice after it is overwritten below
        else:
            draft.pos.fill_(newest - 1)  # the keys and values past it are masked, then overwritten
        draft.history[newest : newest + 1].copy_(decoder.history[newest : newest + 1])
        draft.seen.copy_(decoder.seen)


# -- how many to propose --------------------------------------------------------------------------


class WidthChooser:
    """Picks k, the proposals per step, from `choices`: the k with the most expected tokens per
    unit of step time, for the acceptance seen so far (a decayed count).

    With a per-proposal acceptance a, a step over k proposals yields (1 - a^(k+1)) / (1 - a)
    tokens on average and costs 1 + verify_cost * k + draft_cost * k target steps: verifying a row
    is nearly free at batch 1 (memory-bound), a draft step costs its model's share.
    """

    def __init__(self, choices, *, draft_cost: float = 0.0, verify_cost: float = 0.02, decay: float = 0.9):
        self.choices = tuple(sorted(set(choices)))
        self.draft_cost, self.verify_cost, self.decay = draft_cost, verify_cost, decay
        self.kept, self.missed = 1.0, 1.0  # a prior of one half

    def update(self, proposed: int, accepted: int) -> None:
        if proposed:
            self.kept = self.decay * self.kept + accepted
            self.missed = self.decay * self.missed + (accepted < proposed)

    @property
    def acceptance(self) -> float:
        return self.kept / (self.kept + self.missed)

    def expected_tokens(self, k: int) -> float:
        a = min(self.acceptance, 0.999)
        return (1 - a ** (k + 1)) / (1 - a)

    def choose(self, limit: int) -> int:
        """The k to propose next, at most `limit` (0: a plain one-token step)."""
        best, best_rate = 0, 1.0  # a plain step: one token per step
        for k in self.choices:
            if k > limit:
                break
            rate = self.expected_tokens(k) / (1 + (self.verify_cost + self.draft_cost) * k)
            if rate > best_rate:
                best, best_rate = k, rate
        return best


def draft_cost(draft_layout, layout) -> float:
    """A draft step's time over a step of the model's: at batch 1 both read their weights, so
    the ratio of the bytes their products keep (a step's fixed costs make it an underestimate)."""
    return min(1.0, _product_bytes(draft_layout) / max(_product_bytes(layout), 1))


def _product_bytes(layout) -> int:
    kept = [*layout.lm_head]
    for layer in layout.layers:
        kept += [*layer.w_in, *layer.w_out, *(layer.w_mlp_in or ()), *(layer.w_mlp_out or ())]
    return sum(t.numel() * t.element_size() for t in kept if isinstance(t, torch.Tensor))
