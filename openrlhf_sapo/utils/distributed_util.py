"""The weight-sync process group between the actor's rank 0 and the vLLM workers, on CPU
(the counterpart of openrlhf/utils/distributed_util.py's `stateless_init_process_group`).

Upstream builds that group with vLLM's `PyNcclCommunicator`: CUDA only. Without a GPU the same
group is a gloo process group built outside `torch.distributed`'s default group (the trainer's
ranks and vLLM's workers already have their own default groups), over a TCPStore hosted by rank 0
(the actor), as upstream's `StatelessProcessGroup` is. It offers the one call upstream makes on
the group, `broadcast(tensor, src, stream)`.

Each member binds gloo to the local address that routes to the master (found with a UDP
`connect`, which sends nothing), so the group works across Ray nodes without relying on host
names resolving to a reachable address.
"""

from __future__ import annotations

import datetime
import socket

WEIGHT_SYNC_TIMEOUT = datetime.timedelta(minutes=30)


def local_address_towards(address: str) -> str:
    """This host's address on the route to `address`."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((address, 9))  # UDP connect: picks the route, sends nothing
        return sock.getsockname()[0]


class GlooBroadcastGroup:
    """A stateless gloo process group with upstream's PyNccl-like `broadcast` signature."""

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int,
                 timeout: datetime.timedelta = WEIGHT_SYNC_TIMEOUT):
        import torch.distributed as dist

        self.rank, self.world_size = rank, world_size
        store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0, timeout=timeout,
                              wait_for_workers=False)
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timeout
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=local_address_towards(master_address))]
        self._store = store  # the group keeps using it
        self._group = dist.ProcessGroupGloo(dist.PrefixStore("sapo_weight_sync", store), rank, world_size, options)

    def broadcast(self, tensor, src: int = 0, stream=None) -> None:
        """In place, like PyNcclCommunicator.broadcast; `stream` (CUDA) is ignored on CPU."""
        import torch.distributed as dist

        options = dist.BroadcastOptions()
        options.rootRank = src
        self._group.broadcast([tensor], options).wait()


def stateless_init_process_group(master_address, master_port, rank, world_size, device):
    """Upstream's function where the device is a GPU; a `GlooBroadcastGroup` on CPU."""
    import torch

    if torch.device(device).type == "cpu":
        return GlooBroadcastGroup(master_address, int(master_port), int(rank), int(world_size))
    from openrlhf.utils.distributed_util import stateless_init_process_group as upstream_init

    return upstream_init(master_address, master_port, rank, world_size, device)
