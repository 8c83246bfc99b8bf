"""Tensor parallelism: one process per GPU, each holding its slice of every layer (shards.py).

The app's process is rank 0: it keeps the page, the tokenizer and the stop filter, and its
`FastDecoder` runs each reply as on one GPU. It starts ranks 1..N-1 (multiprocessing, spawn),
which load their slices and then follow it: for each reply rank 0 sends the job (token ids,
parameters, seed) down a pipe to every rank, all run the same prefill, and before each step rank
0 sends one byte. Only rank 0 reads tokens back: every rank samples the same token from the same
logits and seed, so no token travels between them. The ranks meet only inside the step, through
torch.distributed (NCCL between GPUs, inside each rank's own CUDA graph; gloo on the CPU, for
CI): one sum where a layer's attention or MLP ends (`SumAcrossRanks`: one a layer for Falcon,
whose attention and MLP run side by side, two for Llama) and the join of the vocabulary's
logits (`GatherVocab`).

A rank that dies is noticed by rank 0 (its process ends): rank 0 logs it once, fails the reply
in flight instead of waiting for a sum that can never finish, refuses later ones and reports
unhealthy (/healthz 503) until the app is restarted.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from chat.conversation.errors import ConfigError
from chat.engine.decode_loop import FastDecoder

log = logging.getLogger(__name__)

# Rank 0 -> the others, one message each: a job is JOB + pickled (ids, params, seed).
JOB, STEP, END, QUIT = b"j", b"s", b"e", b"q"
# The others -> rank 0: LOADED + JSON (load seconds, GPU memory) once their slice is in memory,
# FAILED + the reason if it is not.
LOADED, FAILED = b"l", b"f"
START_TIMEOUT_S = 900.0  # joining the group and loading a slice (a 180B shard takes minutes)
RANK_CHECK_S = 0.05  # while waiting for a token, how often rank 0 looks at the other ranks
RANK_POLL_S = 0.0002  # where NCCL cannot be aborted: how often rank 0 looks at the step (sleeping)


@dataclass(frozen=True)
class RankSpec:
    """What every rank needs to build its slice (picklable: it travels to the new processes)."""

    world: int
    port: int
    max_len: int
    eos_token_id: int
    weights: object  # opens the model's weights on a rank: `open(device, dtype)` -> a source
    products: str = "dense"  # or "int4": each rank quantizes its slices as it reads them (weights.py)


def start_ranks(spec: RankSpec) -> FastDecoder:
    """Start ranks 1..N-1, join them as rank 0, load rank 0's slice; rank 0's decoder.

    Raises ConfigError with the reason if a rank cannot start.
    """
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    processes, pipes = [], []
    for rank in range(1, spec.world):
        ours, theirs = context.Pipe()
        process = context.Process(
            target=_follow, args=(rank, spec, theirs), name=f"tensor-parallel-rank-{rank}", daemon=True
        )
        process.start()
        theirs.close()
        processes.append(process)
        pipes.append(ours)
    peers = Peers(processes, pipes)
    # Rank 0 joins and loads on a helper thread, so a rank that fails to start is reported at
    # once rather than after the group's join times out.
    loaded: dict = {}
    done = threading.Event()

    def load() -> None:
        try:
            loaded["decoder"], peers.loaded[0] = _rank_decoder(0, spec, peers)
        except BaseException as error:
            loaded["error"] = error
        finally:
            done.set()

    threading.Thread(target=load, name="tensor-parallel-load", daemon=True).start()
    try:
        peers.wait_loaded(START_TIMEOUT_S)
        while not done.wait(0.2):
            peers.check_started()
        if "error" in loaded:
            raise loaded["error"]
    except BaseException:
        peers.close()
        raise
    decoder = loaded["decoder"]
    log.info("tensor parallel: %d ranks ready (%s)", spec.world, decoder.name)
    return decoder


def model_folder(model_id: str, token: str | None) -> str:
    """A local folder of the model's config, tokenizer and safetensors (downloaded if a hub id)."""
    if os.path.isdir(model_id):
        return model_id
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            model_id, token=token, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]
        )
    except Exception as error:
        raise ConfigError(
            f"cannot fetch model {model_id!r} ({type(error).__name__}: {str(error)[:200]})"
        ) from None


def ranks_for(requested: int | str, config, bytes_per_weight: float = 2.0) -> int:
    """`--tensor-parallel`: a number as given; auto: every visible GPU if one cannot hold the
    model's weights (bf16: 2 bytes each) with room to spare (a fifth, for the cache and the
    graphs), else 1."""
    if requested != "auto":
        if requested > 1 and torch.cuda.is_available() and requested > torch.cuda.device_count():
            raise ConfigError(
                f"--tensor-parallel {requested}: only {torch.cuda.device_count()} GPUs are visible"
            )
        return int(requested)
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return 1
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        weights = (
            sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters()) * bytes_per_weight
        )
    fits = weights <= 0.8 * torch.cuda.get_device_properties(0).total_memory
    return 1 if fits else torch.cuda.device_count()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- the collectives of the step ---------------------------------------------------------------------


class SumAcrossRanks:
    """The sum of every rank's partial product (products.py's `reduce`)."""

    def __init__(self, group_name: str):
        self.group_name = group_name

    def __call__(self, x):
        # The functional collective ops themselves (what torch.distributed's wrappers call, by
        # the same names from torch 2.4 on): Dynamo traces them, Inductor places them in the graph.
        ops = torch.ops._c10d_functional
        return ops.wait_tensor(ops.all_reduce(x, "sum", self.group_name))


class GatherVocab:
    """Every rank's logits `[T, vocab_per_rank]` side by side, the last rank's padding cut off."""

    def __init__(self, group_name: str, world: int, vocab: int):
        self.group_name, self.world, self.vocab = group_name, world, vocab

    def __call__(self, x):
        ops = torch.ops._c10d_functional
        stacked = ops.wait_tensor(
            ops.all_gather_into_tensor(x, self.world, self.group_name)
        )  # [world * T, V/N]
        rows = x.shape[0]
        return stacked.view(self.world, rows, -1).transpose(0, 1).reshape(rows, -1)[:, : self.vocab]


# -- rank 0's side -------------------------------------------------------------------------------------


class RankDied(RuntimeError):
    """Another rank's process has ended: no sum it takes part in can finish."""


class Peers:
    """Rank 0's handle on the other ranks: their processes and the pipes that send them work."""

    def __init__(self, processes, pipes):
        self.processes, self.pipes = processes, pipes
        self.world = len(processes) + 1
        self.loaded: dict[int, dict] = {}  # by rank: what it reported once its slice was in memory
        self._dead: str | None = None
        self._closing = False
        self._next_check = 0.0
        if processes:
            threading.Thread(target=self._watch, name="tensor-parallel-watch", daemon=True).start()

    def start(self, input_ids, params, seed: int) -> None:
        self._check()
        job = JOB + pickle.dumps((input_ids.reshape(-1).tolist(), params, seed))
        self._send(job)

    def step(self) -> None:
        self._send(STEP)

    def end(self) -> None:
        try:
            self._send(END)
        except RankDied:
            pass  # already reported; the reply has ended anyway

    def wait_for(self, event) -> None:
        """Wait until the CUDA `event` (made with `blocking=True`) has happened, without spinning
        a core; RankDied if a rank has died meanwhile.

        Where NCCL can be aborted, the thread sleeps in the driver until the step ends: a rank's
        death ends it too, since the watcher thread (`_watch`) aborts NCCL, which fails the sums
        the step waits in. Elsewhere it looks every RANK_POLL_S, and at the ranks every RANK_CHECK_S.
        """
        if self._sums_abortable():
            event.synchronize()
        else:
            while not event.query():
                now = time.monotonic()
                if now >= self._next_check:
                    self._check()
                    self._next_check = now + RANK_CHECK_S
                time.sleep(RANK_POLL_S)
        self._check()

    def healthy(self) -> bool:
        return self._dead is None and all(p.is_alive() for p in self.processes)

    def raise_if_dead(self) -> None:
        """RankDied, with the dead rank and its exit code, if one has ended."""
        self._check()

    def check_started(self) -> None:
        for rank, process in enumerate(self.processes, start=1):
            if not process.is_alive():
                raise ConfigError(
                    f"tensor parallel: rank {rank} ended while starting (exit code {process.exitcode})"
                )

    def wait_loaded(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for rank, pipe in enumerate(self.pipes, start=1):
            while not pipe.poll(0.2):
                self.check_started()
                if time.monotonic() > deadline:
                    raise ConfigError(f"tensor parallel: rank {rank} did not load in {timeout_s:.0f} s")
            message = pipe.recv_bytes()
            if message[:1] != LOADED:
                raise ConfigError(
                    f"tensor parallel: rank {rank} could not start: {message[1:].decode()[:300]}"
                )
            self.loaded[rank] = json.loads(message[1:] or b"{}")

    def close(self) -> None:
        self._closing = True
        for pipe in self.pipes:
            try:
                pipe.send_bytes(QUIT)
            except OSError:
                pass
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        # After a rank's death NCCL's teardown could wait on its sums; the process is ending then.
        if dist.is_initialized() and (self._dead is None or dist.get_backend() == "gloo"):
            dist.destroy_process_group()

    def _send(self, message: bytes) -> None:
        try:
            for pipe in self.pipes:
                pipe.send_bytes(message)
        except OSError:
            self._check()
            raise

    def _check(self) -> None:
        for rank, process in enumerate(self.processes, start=1):
            if not process.is_alive() and self._dead is None:
                self._report(rank, process)
        if self._dead is not None:
            raise RankDied(self._dead)

    def _report(self, rank, process) -> None:
        self._dead = (
            f"tensor parallel: rank {rank} (pid {process.pid}) ended with exit code {process.exitcode}; "
            "the model cannot serve until the app is restarted"
        )
        log.error(self._dead)
        self._abort_sums()

    @staticmethod
    def _sums_abortable() -> bool:
        return (
            dist.is_initialized()
            and dist.get_backend() == "nccl"
            and hasattr(dist.distributed_c10d, "_abort_process_group")
        )

    def _abort_sums(self) -> None:
        """Fail this rank's pending and future sums now. A sum the dead rank never joins would
        otherwise keep the GPU waiting until NCCL's timeout (START_TIMEOUT_S): during start-up
        capture that held rank 0 for 15 minutes before the start could fail."""
        try:
            if not dist.is_initialized() or dist.get_backend() != "nccl":
                return  # gloo fails such sums at once
            abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
            if abort is None:
                log.warning(
                    "tensor parallel: this torch cannot abort NCCL; pending sums wait for its timeout"
                )
                return
            abort()
            log.error("tensor parallel: NCCL aborted on rank 0; its pending sums fail")
        except Exception as error:  # the death is already reported; this only shortens the wait
            log.warning("tensor parallel: aborting NCCL failed: %s: %s", type(error).__name__, error)

    def _watch(self) -> None:
        """Log a rank's death when it happens, not at the next reply."""
        ended = multiprocessing.connection.wait([p.sentinel for p in self.processes])
        if self._closing or self._dead is not None:
            return
        for rank, process in enumerate(self.processes, start=1):
            if process.sentinel in ended:
                process.join(timeout=1)
                self._report(rank, process)
                return


# -- every rank ----------------------------------------------------------------------------------------


def rank_layout(spec: RankSpec, rank: int, device, dtype):
    """Rank `rank`'s slice of the model `spec` names, laid out for the fast decoder (weights.py)."""
    from chat.engine.products import Dense
    from chat.engine.weights import lay_out

    products, quantize = Dense, None
    if spec.products == "int4":
        from chat.engine.int4.products import int4_products

        products, quantize = int4_products(device), "hqq"
    source = spec.weights.open(device, dtype)
    return lay_out(
        source, max_len=spec.max_len, products=products, rank=rank, world=spec.world, quantize=quantize
    )


def _rank_decoder(rank: int, spec: RankSpec, peers: Peers | None) -> tuple[FastDecoder, dict]:
    """Join the process group as `rank` and lay out this rank's slice of the weights; the
    decoder, and the load's seconds and peak GPU memory."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{spec.port}",
        rank=rank,
        world_size=spec.world,
        timeout=timedelta(seconds=START_TIMEOUT_S),
    )
    start = time.monotonic()
    layout = rank_layout(spec, rank, device, dtype)
    stats = {"load_s": round(time.monotonic() - start, 2), **gpu_memory(device)}
    log.info("tensor parallel: rank %d loaded its slice: %s", rank, stats)
    group = dist.group.WORLD.group_name
    decoder = FastDecoder.from_layout(
        layout,
        spec.eos_token_id,
        reduce=SumAcrossRanks(group),
        gather=GatherVocab(group, spec.world, layout.vocab),
        peers=peers,
    )
    return decoder, stats


def gpu_memory(device) -> dict:
    """GB of GPU memory held now and at most so far by this process on `device` (none on the CPU)."""
    if torch.device(device).type != "cuda":
        return {}
    return {
        "held_GB": round(torch.cuda.memory_allocated(device) / 1e9, 2),
        "peak_GB": round(torch.cuda.max_memory_allocated(device) / 1e9, 2),
    }


def _follow(rank: int, spec: RankSpec, pipe) -> None:
    """A rank other than 0: load, capture, then follow rank 0's replies until told to quit."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {rank} %(name)s %(message)s")
    try:
        decoder, stats = _rank_decoder(rank, spec, None)
        pipe.send_bytes(LOADED + json.dumps(stats).encode())
        decoder.warm_up()  # in step with rank 0's: capturing runs the same sums
        log.info("tensor parallel: rank %d ready: %s", rank, gpu_memory(decoder.device))
        while (message := pipe.recv_bytes()) != QUIT:
            ids, params, seed = pickle.loads(message[len(JOB) :])
            decoder.follow(torch.tensor([ids]), params, seed, lambda: pipe.recv_bytes() == STEP)
    except EOFError:  # rank 0 is gone: nothing left to follow
        os._exit(0)
    except BaseException as error:
        log.exception("tensor parallel: rank %d failed", rank)
        try:
            pipe.send_bytes(FAILED + f"{type(error).__name__}: {error}".encode())
        except OSError:
            pass
        os._exit(1)  # without waiting on collectives that may never finish
    dist.destroy_process_group()
