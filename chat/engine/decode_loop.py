"""A lean decode loop: static KV cache, one CUDA graph per token, sampling on the GPU.

At batch 1 a token costs one read of every weight; `generate` spends several times that on
Python and kernel launches. Here the one-token step is a few plain torch functions (gpt-fast's
shape: `_prefill`, `_step`, `_stream`), compiled (two pieces per layer, two more for a sequential
layer's MLP, one for the head) around a flash-decoding attention kernel (attention.py), and
captured once in a CUDA graph that reads the token and its position from GPU tensors, so
replaying it is the whole step. docs/performance.md has the measurements.

The pieces live apart: this module is the loop; layout.py the weights (fused products, KV cache,
rotary) and the layer step as functions, for every family (families.py: Falcon, Llama);
weights.py lays a model out; sampling.py chooses the next token; products.py computes a product
from kept weights (dense, or an adapter such as int4 or a tensor-parallel slice). One-row
products compiled with coordinate-descent tuning become Triton reductions that read the weights
at the copy bandwidth, faster than cuBLAS's GEMV (docs/performance.md).

On the CPU (float32) the same functions run eagerly, without graphs: CI checks the logic there.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.nn.functional as F

from chat.conversation.backend import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP
from chat.conversation.params import GenerationParams
from chat.engine.attention import FlashDecode, attend_rows
from chat.engine.layout import (
    Layout,
    Unsupported,
    decode_in,
    logits,
    mlp_in,
    prefill_layer,
    project_in,
    project_out,
)
from chat.engine.products import Dense, Products, whole
from chat.engine.sampling import Knobs, choose
from chat.engine.speculation import SpeculationStats, WidthChooser, verify_head

log = logging.getLogger(__name__)

# "default" (Inductor, no autotuning), "max-autotune-no-cudagraphs", or "off" (eager kernels).
COMPILE_MODE = os.environ.get("FAST_DECODE_COMPILE", "default")
# One-token step on a GPU: "flash" (decode_attention's Triton kernels) or "torch" (the torch
# code the CPU runs, compiled by Inductor; its attention reads the whole cache; kept to compare).
ATTENTION = os.environ.get("FAST_DECODE_ATTENTION", "flash")
# Rows a speculative verify step may take (the newest token + proposals); one CUDA graph each. A
# proposal shorter than a width is verified in the next width up (the extra rows are not counted).
VERIFY_WIDTHS = tuple(int(w) for w in os.environ.get("FAST_DECODE_VERIFY_WIDTHS", "2,4,6,8").split(","))


class FastDecoder:
    """Static-cache decoder; CUDA-graph replay on a GPU, eager on the CPU."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_len: int,
        products: type[Products] = Dense,
        use_graphs: bool | None = None,
        compile_mode: str | None = None,
    ):
        """Lay `model`'s weights out for the step (`layout.Unsupported` if it cannot)."""
        from chat.engine.weights import ModelSource, lay_out

        layout = lay_out(ModelSource(model), max_len=max_len, products=products)
        self._setup(layout, tokenizer.eos_token_id, use_graphs=use_graphs, compile_mode=compile_mode)

    @classmethod
    def from_layout(
        cls,
        layout: Layout,
        eos_token_id,
        *,
        reduce=whole,
        gather=whole,
        peers=None,
        use_graphs: bool | None = None,
        compile_mode: str | None = None,
    ) -> FastDecoder:
        """A decoder over weights already laid out: one rank's slice under tensor parallelism,
        where `reduce` and `gather` complete its products (products.py) and, on rank 0, `peers`
        (tensor_parallel.Peers) has the other ranks follow each reply step by step."""
        decoder = cls.__new__(cls)
        decoder._setup(
            layout,
            eos_token_id,
            reduce=reduce,
            gather=gather,
            peers=peers,
            use_graphs=use_graphs,
            compile_mode=compile_mode,
        )
        return decoder

    def _setup(
        self, layout, eos_token_id, *, reduce=whole, gather=whole, peers=None, use_graphs, compile_mode
    ):
        self.layout = layout
        self.eos_token_id = eos_token_id
        self.reduce, self.gather, self.linear = reduce, gather, layout.products.linear
        self.peers = peers
        self.device, self.dtype, self.max_len = layout.device, layout.dtype, layout.max_len
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self.compile_mode = compile_mode or COMPILE_MODE
        self.name = "fast (CUDA graphs)" if self.use_graphs else "fast (eager)"
        if peers is not None:
            self.name = f"{self.name[:-1]}, tensor parallel x{peers.world})"
        self.kv_heads, self.group, self.head_dim = layout.kv_heads, layout.group, layout.head_dim
        self.norm, self.act = layout.norm, layout.act
        self.layers = layout.layers
        self.ready = not self.use_graphs
        # Capturing refuses unsafe CUDA calls from every thread ("global", as on one GPU), or only
        # from this one: under tensor parallelism NCCL's watchdog thread polls its events meanwhile.
        self._capture_errors = "global" if reduce is whole else "thread_local"
        self._graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        # The step's pieces; compiled in warm_up on a GPU.
        self._project_in, self._decode_in, self._attend_rows, self._project_out = (
            project_in,
            decode_in,
            attend_rows,
            project_out,
        )
        self._mlp_in, self._head = mlp_in, _head
        dev, dt = self.device, self.dtype
        # The out-product's input (the attention output, and act(h) beside it where attention and
        # MLP run in parallel), rewritten by every layer of the step.
        self.joined = torch.empty(1, layout.joined_size, dtype=dt, device=dev)
        self.flash = None
        if dev.type == "cuda" and ATTENTION == "flash":
            if self.head_dim & (self.head_dim - 1):
                raise Unsupported(f"head_dim {self.head_dim} is not a power of two (flash decoding)")
            self.flash = FlashDecode(self.kv_heads, self.group, self.head_dim, self.max_len, dev, dt)
        # Per-generation state the captured step reads and writes in place.
        self.history = torch.zeros(self.max_len + 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.seen = torch.zeros(layout.vocab, dtype=torch.bool, device=dev)
        self.positions = torch.arange(self.max_len, device=dev)
        self.knobs = Knobs(dev)
        self._not_last = torch.ones(layout.vocab, dtype=torch.bool, device=dev)
        self._not_last[-1] = False  # top-p always keeps the most likely token
        self.probs = torch.zeros(layout.vocab, dtype=torch.float32, device=dev)  # a sampled step's p
        self.proposer = None  # speculation (`speculate`): none until asked
        self._verify_graphs_for: bool | None = None  # the captured graphs' proposer.sampled
        self.speculation: SpeculationStats | None = None  # the last reply's, where it speculated

    # -- set-up ------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Compile and capture the one-token step; call on the thread that will generate.

        Raises if that fails: `decoders.warm_up` then serves with plain `generate` instead.
        """
        if not self.use_graphs or self.ready:
            return
        try:
            self._capture()
        except Exception:
            self._graphs.clear()
            if self.peers is not None:  # a rank that died mid-capture is the reason to report
                self.peers.raise_if_dead()
            raise
        self.ready = True

    def _capture(self) -> None:
        start = time.monotonic()
        if self.compile_mode != "off":
            log.info("fast decoder: compiling the layer step (torch.compile, mode %s)", self.compile_mode)
            compile_kwargs = {"fullgraph": True, "dynamic": False}
            if self.compile_mode != "default":
                compile_kwargs["mode"] = self.compile_mode
            self._project_in = torch.compile(project_in, **compile_kwargs)
            self._decode_in = torch.compile(decode_in, **compile_kwargs)
            self._attend_rows = torch.compile(attend_rows, **compile_kwargs)
            self._project_out = torch.compile(project_out, **compile_kwargs)
            self._mlp_in = torch.compile(mlp_in, **compile_kwargs)
            self._head = torch.compile(_head, **compile_kwargs)
        # Coordinate-descent tuning makes Inductor write one-row products as tuned Triton
        # reductions (gpt-fast's setting); it applies while the first calls below compile.
        import torch._inductor.config as inductor_config

        with torch.inference_mode(), inductor_config.patch(coordinate_descent_tuning=True):
            self._reset(torch.tensor([[0, 1, 2]]))
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up launches (and compiles) off the capture stream
                for greedy in (True, False):
                    for _ in range(3):
                        self._step(greedy)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            log.info("fast decoder: compiled in %.1f s; capturing CUDA graphs", time.monotonic() - start)
            pool = None
            for greedy in (True, False):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, capture_error_mode=self._capture_errors):
                    self._step(greedy)
                pool = graph.pool()
                self._graphs[greedy] = graph
            if self.proposer is not None:
                try:
                    self._capture_verify(side, pool)
                except Exception:  # replies still come, one token a step: say so, do not fail
                    log.warning(
                        "fast decoder: no speculation (its verify step failed to start)", exc_info=True
                    )
                    self._verify_graphs.clear()
                    self.proposer = None
            torch.cuda.synchronize()
        log.info("fast decoder: ready in %.1f s", time.monotonic() - start)

    # -- the decode loop ---------------------------------------------------------------------

    def generate(self, input_ids, params: GenerationParams, seed: int, emit, cancelled) -> str:
        """Stream one reply: prefill, then one graph replay per token (see `decoders.Decoder`),
        or per verify step where a proposer is set (`speculate`)."""
        prompt_len = input_ids.shape[-1]
        if prompt_len >= self.max_len:
            raise ValueError(f"prompt of {prompt_len} tokens does not fit the {self.max_len}-token cache")
        if self.use_graphs and not self.ready:
            self.warm_up()
        if self.peers is not None:  # the other ranks run the same prefill, then follow step by step
            self.peers.start(input_ids, params, seed)
        self.speculation = None  # set again by a speculative reply
        try:
            torch.manual_seed(seed)  # seeds the CPU and every CUDA generator, as the plain path does
            with torch.inference_mode():
                self.knobs.set(params, self.layout.vocab)
                self._reset(input_ids)
                self._prefill(prompt_len, params.greedy)
                if self.proposer is not None:
                    return self._stream_speculative(input_ids, params, emit, cancelled)
                return self._stream(prompt_len, params, emit, cancelled)
        finally:
            if self.peers is not None:
                self.peers.end()

    def follow(self, input_ids, params: GenerationParams, seed: int, next_step) -> None:
        """Another rank's side of rank 0's `generate`: the same prefill and sampling (so the same
        tokens), then one step each time `next_step()` says rank 0 took one (False: reply over)."""
        torch.manual_seed(seed)
        with torch.inference_mode():
            self.knobs.set(params, self.layout.vocab)
            self._reset(input_ids)
            self._prefill(input_ids.shape[-1], params.greedy)
            while next_step():
                self._replay(params.greedy)

    def healthy(self) -> bool:
        """False once another rank has died (the sums it takes part in can never finish)."""
        return self.peers is None or self.peers.healthy()

    def close(self) -> None:
        if self.peers is not None:
            self.peers.close()

    def _stream(self, prompt_len: int, params, emit, cancelled) -> str:
        # The step for token n+1 is queued before token n is read back, so Python's per-token
        # work (emit, the stop checks) overlaps the GPU's. After a stop, one queued step is
        # wasted; nothing it wrote is read.
        position, count = prompt_len, 0
        pending = self._read(position)
        while True:
            room = count + 1 < params.max_new_tokens and position + 1 < self.max_len
            if room:
                self._replay(params.greedy)
            token = pending()
            if room:
                pending = self._read(position + 1)
            count += 1
            if ended := self._emit(token, emit, cancelled):
                return ended
            if not room:
                return FINISH_LENGTH
            position += 1

    def _emit(self, token: int, emit, cancelled) -> str | None:
        """Hand `token` on; the finish reason if the reply ends with it (end of text, or Stop)."""
        emit(token)
        if token == self.eos_token_id:
            return FINISH_STOP
        if cancelled():
            return FINISH_CANCELLED
        return None

    def _replay(self, greedy: bool) -> None:
        """One one-token step: its CUDA graph, or eagerly."""
        if self.peers is not None:  # first: an eager step waits in its sums for the other ranks
            self.peers.step()
        if self.use_graphs:
            self._graphs[greedy].replay()
        else:
            self._step(greedy)

    def _read(self, position: int):
        """Start reading history[position] to the host; returns a function that waits for it."""
        if not self.use_graphs:
            return lambda: int(self.history[position])
        buffer = torch.empty(1, dtype=torch.long, pin_memory=True)
        buffer.copy_(self.history[position : position + 1], non_blocking=True)
        # Under tensor parallelism rank 0 sleeps until the token is there (Peers.wait_for); on one
        # GPU it spins, which answers a few microseconds sooner.
        done = torch.cuda.Event(blocking=self.peers is not None)
        done.record()

        def wait() -> int:
            if self.peers is None:
                done.synchronize()
            else:  # a dead rank would leave the step's sum waiting forever: watch the ranks
                self.peers.wait_for(done)
            return int(buffer[0])

        return wait

    def _reset(self, input_ids) -> None:
        ids = input_ids.reshape(-1).to(self.device)
        self.history[: ids.numel()].copy_(ids)
        self.pos.fill_(ids.numel())
        self.seen.zero_()
        self.seen[ids] = True

    # -- one pass through the model ----------------------------------------------------------

    def _prefill(self, prompt_len: int, greedy: bool) -> None:
        """Run the prompt through the model, fill the cache, choose the first new token."""
        layout = self.layout
        x = F.embedding(self.history[:prompt_len], layout.embed)
        cos, sin = layout.cos[:prompt_len], layout.sin[:prompt_len]
        for layer in self.layers:
            x = prefill_layer(x, layer, layout, cos, sin, self.reduce)
        self.pos.fill_(prompt_len - 1)  # the last prompt token's position, as after a step
        scores = logits(x[-1:], layout.ln_f, layout.lm_head, self.linear, self.gather, self.norm)
        choose(scores, self.seen, self.knobs.tensors(), self._not_last, greedy, self.history, self.pos)

    def _step(self, greedy: bool) -> None:
        """One token: read history[pos + 1] at pos + 1, write its successor after it."""
        layout = self.layout
        self.pos.add_(1)
        token = self.history.index_select(0, self.pos)
        x = F.embedding(token, layout.embed)
        if self.flash is not None:  # the kernels read the rotary tables at pos themselves
            x = self._layers(x, self._flash_attention, None, self.pos, self.joined)
        else:
            x = self._layers(x, self._torch_attention, self._rotary(self.pos), self.pos, self.joined)
        self._head(x, *self._choice(greedy), self.probs)

    def _choice(self, greedy: bool) -> tuple:
        """What the head reads besides x to choose the next token (sampling.choose)."""
        layout, state = self.layout, (self.seen, self.knobs.tensors(), self._not_last)
        return (
            layout.ln_f,
            layout.lm_head,
            self.linear,
            self.gather,
            self.norm,
            *state,
            greedy,
            self.history,
            self.pos,
        )

    def _rotary(self, rows) -> tuple:
        """The rotary tables' (cos, sin) rows at cache positions `rows` [T]."""
        return self.layout.cos.index_select(0, rows), self.layout.sin.index_select(0, rows)

    def _layers(self, x, attend, rotary, rows, joined):
        """Every layer over the rows at cache positions `rows` [T]: `attend` (and, where parallel,
        the MLP beside it), then a sequential layer's MLP (Llama: on the updated x)."""
        layout = self.layout
        for layer in self.layers:
            x = attend(x, layer, rotary, rows, joined)
            if not layout.parallel:
                hidden = self._mlp_in(x, *layer.ln_mlp, layer.w_mlp_in, self.linear, self.norm, self.act)
                x = self._project_out(x, hidden, layer.w_mlp_out, self.linear, self.reduce)
        return x

    def _flash_attention(self, x, layer, rotary, rows, joined):
        """A layer's attention (and, where parallel, its MLP) on a GPU: the compiled input
        product, three Triton kernels, the compiled out-product."""
        # Measured slower on the H100 (docs/performance.md): splitting the out-projection in two,
        # running the MLP's half on a second stream beside attention, attention values by cuBLAS.
        layout = self.layout
        qkv, h = self._project_in(
            x, *layer.norms(), layer.w_in, layout.beside(layer), layout.qkv_size, self.linear, self.norm
        )
        k_cache, v_cache = layer.k_cache, layer.v_cache
        q = self.flash.rotate_and_store(
            qkv, h, layout.cos, layout.sin, self.pos, k_cache, v_cache, self.joined
        )
        self.flash(q, k_cache, v_cache, self.pos, self.joined)
        return self._project_out(x, self.joined, layer.w_out, self.linear, self.reduce)

    def _torch_attention(self, x, layer, rotary, rows, joined):
        """The same in torch, for T rows at cache positions `rows` [T] (the CPU; a speculative
        verify step everywhere; Inductor's on a GPU with ATTENTION=torch); `rotary`: the
        (cos, sin) rows at those positions; `joined`: [T, joined_size]."""
        layout = self.layout
        cos, sin = rotary
        q = self._decode_in(
            x,
            *layer.norms(),
            layer.w_in,
            layout.beside(layer),
            self.linear,
            self.norm,
            self.act,
            layer.k_cache,
            layer.v_cache,
            cos,
            sin,
            rows,
            joined,
            self.kv_heads,
            self.group,
            self.head_dim,
        )
        self._attend_rows(
            q, layer.k_cache, layer.v_cache, rows, self.positions, joined[:, : layout.attention_size]
        )
        return self._project_out(x, joined, layer.w_out, self.linear, self.reduce)

    # -- speculation: a verify step over several rows, beside the one-token step -------------------

    def speculate(self, proposer, widths: tuple[int, ...] = VERIFY_WIDTHS) -> None:
        """Verify `proposer`'s tokens (speculation.py) in steps of up to max(widths) rows; None:
        one token a step again. Call before `warm_up`, which captures the verify graphs; after it,
        only a proposer of the same kind (`sampled`) may replace the first. Tensor parallelism is
        not supported (the other ranks follow one-token steps only)."""
        if self.peers is not None or self.reduce is not whole:
            raise ValueError("speculative decoding does not run under tensor parallelism")
        if self.ready and self.use_graphs and self._verify_graphs_for is not None:
            if proposer is not None and proposer.sampled != self._verify_graphs_for:
                raise ValueError("the verify graphs were captured for another kind of proposer")
            self.proposer = proposer
            return
        if self.ready and self.use_graphs:
            raise ValueError("set the proposer before the decoder is warmed up")
        if proposer is None:
            self.proposer = None
            return
        widths = tuple(sorted(w for w in set(widths) if 2 <= w < self.max_len))
        if not widths:
            raise ValueError("speculation needs a verify width of at least 2 rows")
        dev, layout = self.device, self.layout
        self.proposer = proposer
        self.widths = widths
        rows = max(widths)
        self.joined_rows = torch.empty(rows, layout.joined_size, dtype=self.dtype, device=dev)
        self.row_offsets = torch.arange(rows, device=dev)
        self.limit = torch.zeros(1, dtype=torch.long, device=dev)  # proposals that are real
        self.accepted = torch.zeros(1, dtype=torch.long, device=dev)
        # The proposer's distributions q, where it samples them (a draft model); else None.
        self.draft_probs = (
            torch.zeros(rows - 1, layout.vocab, dtype=torch.float32, device=dev) if proposer.sampled else None
        )
        self._verify_head = verify_head
        self._verify_graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}

    def _capture_verify(self, side, pool) -> None:
        """Compile and capture one verify graph per (width, greedy), in the one-token step's pool;
        the proposer's own (a draft's graphs) first."""
        import torch._dynamo.config as dynamo_config

        # A compiled piece per width and choice, and a draft's: more than Dynamo's default 8.
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 4 * len(self.widths) + 16)
        self.proposer.warm_up()
        if self.compile_mode != "off":
            self._verify_head = torch.compile(verify_head, fullgraph=True, dynamic=False)
        self.limit.fill_(1)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for width in self.widths:
                for greedy in (True, False):
                    for _ in range(2):
                        self.pos.fill_(0)
                        self._verify(width, greedy)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        for width in self.widths:
            for greedy in (True, False):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, capture_error_mode=self._capture_errors):
                    self._verify(width, greedy)
                self._verify_graphs[width, greedy] = graph
        self._verify_graphs_for = self.proposer.sampled

    def _stream_speculative(self, input_ids, params, emit, cancelled) -> str:
        """Like `_stream`, each step verifying the proposer's tokens: emits the kept proposals and
        the step's own token one by one, checking Stop after each (so Stop still ends within one
        token of output; the rest of that step is dropped)."""
        proposer = self.proposer
        # Every reply starts from the same prior: k, and so the random draws, follow the seed.
        chooser = WidthChooser([w - 1 for w in self.widths], draft_cost=proposer.draft_cost)
        stats = self.speculation = SpeculationStats()
        last = input_ids.shape[-1]  # history[last]: the newest token, not yet in the cache
        tokens = [int(self.history[last])]
        proposer.start(self, input_ids.reshape(-1).tolist() + tokens, params)
        count = 0
        while True:
            for token in tokens:
                count += 1
                if ended := self._emit(token, emit, cancelled):
                    return ended
                if count >= params.max_new_tokens:
                    return FINISH_LENGTH
            if last + 1 >= self.max_len:  # no cache position left for the newest token
                return FINISH_LENGTH
            # A step over `width` rows writes keys and values at last .. last + width - 1, and
            # yields at most width tokens: within the cache and the reply.
            fits = [w for w in self.widths if w <= self.max_len - last]
            room = min(params.max_new_tokens - count - 1, max(fits, default=1) - 1)
            k = chooser.choose(room)
            proposed = proposer.propose(self, last, k) if k else 0
            if proposed:
                width = next(w for w in fits if w > proposed) if self.use_graphs else proposed + 1
                self.limit.fill_(proposed)
                self._replay_verify(width, params.greedy)
                kept = int(self.accepted)  # waits for the step
                stats.steps += 1
                stats.proposed += proposed
                stats.accepted += kept
                stats.rejections += kept < proposed
                chooser.update(proposed, kept)
            else:
                self._replay(params.greedy)
                kept = 0
                stats.plain_steps += 1
            tokens = self.history[last + 1 : last + 2 + kept].tolist()
            proposer.settle(self, last, tokens, proposed)
            last += kept + 1

    def _replay_verify(self, width: int, greedy: bool) -> None:
        if self.use_graphs:
            self._verify_graphs[width, greedy].replay()
        else:
            self._verify(width, greedy)

    def _verify(self, width: int, greedy: bool) -> None:
        """Rows history[pos + 1 .. pos + width] at their positions through the model (keys and
        values written at each), then `speculation.accept`: pos moves past the kept proposals and
        the token after them is written. Reads every position from GPU tensors (one graph per width)."""
        layout = self.layout
        rows = self.pos + 1 + self.row_offsets[:width]
        x = F.embedding(self.history.index_select(0, rows), layout.embed)
        x = self._layers(x, self._torch_attention, self._rotary(rows), rows, self.joined_rows[:width])
        self._verify_head(x, *self._choice(greedy), self.limit, self.draft_probs, self.accepted)


def _head(x, ln_f, lm_head, linear, gather, norm, seen, knobs, not_last, greedy: bool, history, pos, probs):
    """The last norm, the logits and the choice of the next token (compiled as one piece)."""
    scores = logits(x, ln_f, lm_head, linear, gather, norm)
    choose(scores, seen, knobs, not_last, greedy, history, pos, probs)
