"""A rank dies before rank 0's start-up capture: how long until rank 0's start fails?

    NCCL_NVLS_ENABLE=0 python bench/tp_rank_death.py      # two GPUs

Starts two ranks of the tiny Falcon shape (random weights, no compile), kills rank 1 with SIGKILL
once both have loaded, then runs rank 0's capture, whose sums rank 1 never joins. Prints the
seconds until the capture raised and what it raised. Without the abort in `Peers` the capture
waited for NCCL's timeout (tensor_parallel.START_TIMEOUT_S, 15 minutes). On the CPU (gloo) there
is no capture, so the script only shows that it runs.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    os.environ["FAST_DECODE_COMPILE"] = "off"  # read at import, here and in rank 1's process
    from bench.gpu_decode import model_config
    from bench.random_weights import RandomWeights
    from chat.engine.parallel.ranks import RankSpec, free_port, start_ranks

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    spec = RankSpec(
        world=2,
        port=free_port(),
        max_len=256,
        eos_token_id=None,
        weights=RandomWeights(model_config("tiny").to_dict()),
    )
    decoder = start_ranks(spec)
    print("ranks loaded; killing rank 1", flush=True)
    decoder.peers.processes[0].kill()
    start = time.monotonic()
    try:
        decoder.warm_up()
        print(f"capture returned after {time.monotonic() - start:.1f} s", flush=True)
    except Exception as error:
        print(
            f"capture raised after {time.monotonic() - start:.1f} s: {type(error).__name__}: {error}",
            flush=True,
        )
    print("healthy:", decoder.peers.healthy(), flush=True)
    os._exit(0)  # NCCL is aborted: no orderly teardown


if __name__ == "__main__":
    main()
