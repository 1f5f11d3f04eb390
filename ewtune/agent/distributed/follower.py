"""A worker of rank 1..N-1 (``python -m ewtune.agent.distributed.follower``, started by
:mod:`ewtune.agent.distributed.launch`): joins the group, builds the trainer from rank 0's configuration and trains
every plan rank 0 announces, until rank 0 says finish. It prints nothing but, on failure, one line on stderr
(which rank 0 quotes) and exits 1; it writes no ledger and no output."""

from __future__ import annotations

import sys
from dataclasses import replace

import torch.distributed as dist

from ewtune.agent.distributed.launch import join_from_environment, rank_device, with_sharding
from ewtune.agent.training import LocalTrainer


def main() -> int:
    try:
        group = join_from_environment()
        config = group.receive()
        group = with_sharding(group, config.sharding)
        trainer = LocalTrainer(replace(config, device=rank_device(config.device, group.rank, group.world_size)), group)
        while (message := group.receive())[0] == "train":
            trainer.follow(*message[1:])
        return 0
    except (Exception, KeyboardInterrupt) as error:
        text = (str(error).strip().splitlines() or [""])[0]
        print(f"{type(error).__name__}: {text}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
