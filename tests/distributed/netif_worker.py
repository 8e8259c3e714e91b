"""One torchrun worker of the two-host gloo test: optionally pick GLOO_SOCKET_IFNAME the idla
way, then form a gloo group, all-reduce each rank's number and print what happened as JSON.

Run as ``netif_worker.py fix`` (with :func:`idla.runtime.netif.ensure_gloo_interface`) or
``netif_worker.py plain`` (gloo's own choice: the address the host name resolves to).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from idla.runtime.netif import ensure_gloo_interface

INIT_TIMEOUT_S = float(os.environ.get("NETIF_TEST_TIMEOUT_S", "20"))


def main() -> None:
    chosen = ensure_gloo_interface(os.environ) if sys.argv[1] == "fix" else None
    dist.init_process_group("gloo", timeout=timedelta(seconds=INIT_TIMEOUT_S))
    total = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(total)
    print(json.dumps({
        "rank": dist.get_rank(), "world_size": dist.get_world_size(), "sum": total.item(),
        "chosen": chosen, "master_addr": os.environ["MASTER_ADDR"],
        "master_port": os.environ["MASTER_PORT"],
    }), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
