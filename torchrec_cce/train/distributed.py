"""Process-group set-up for a training script, and the lock-step batch iterator.

``init_distributed()`` reads RANK / WORLD_SIZE / LOCAL_RANK as torchrun and TorchX set them; a
plain ``python`` run becomes a world of one. Backend: ``$TORCHREC_CCE_BACKEND``, else NCCL with
CUDA, else gloo.

Restarts: torchrun (``--max-restarts N``) keeps its rendezvous TCPStore across attempts and
the workers share it, so a restarted worker group would read the previous attempt's gloo/NCCL
addresses from it ("Gloo connectFullMesh failed ... Connection refused", pytorch/pytorch#135712).
``init_distributed`` prefixes the store with the attempt number (``TORCHELASTIC_RESTART_COUNT``),
so every attempt meets on fresh keys and no ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE`` is needed.
"""

import os
import socket
from typing import Iterable, Iterator, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist

BACKEND_ENV = "TORCHREC_CCE_BACKEND"

T = TypeVar("T")


def choose_backend() -> str:
    """``$TORCHREC_CCE_BACKEND``, else ``nccl`` when CUDA is available, else ``gloo``."""
    return os.environ.get(BACKEND_ENV) or ("nccl" if torch.cuda.is_available() else "gloo")


def init_distributed() -> Tuple[int, int, torch.device]:
    """Initialise the default process group; returns ``(rank, world_size, device)``."""
    if "RANK" not in os.environ:  # plain `python train.py`: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = choose_backend()
    if backend == "nccl":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    store, rank, world = next(dist.rendezvous("env://"))  # torchrun's store, or rank 0's
    store = dist.PrefixStore(f"torchrec_cce/attempt_{restart_attempt()}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
    return rank, world, device


def restart_attempt() -> int:
    """torchrun's restart count of this worker group (0 in the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def in_step(batches: Iterable[T], stop_after: Optional[int] = None) -> Iterator[T]:
    """Yield while *every* rank still has a batch (ranks of a streamed file may differ by one;
    a rank running ahead would hang the collectives). Collective: one all-reduce per batch."""
    it = iter(batches)
    n = 0
    while stop_after is None or n < stop_after:
        batch = next(it, None)
        flag = torch.tensor([0 if batch is None else 1])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if int(flag) == 0:
            return
        n += 1
        yield batch
