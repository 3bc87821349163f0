"""Run a function in ``world_size`` real processes (gloo) and collect the results.

The processes start from a fork server that has imported torch, TorchRec, fbgemm and this
package once (``multiprocessing``'s ``forkserver`` context with a preload list): a spawned
process would spend ~3 s of CPU importing them again, in every multi-process test. Each child
is still a fresh process of its own (forked from that clean server, not from pytest), with the
parent's current environment variables. Each child initialises a gloo process group over a
free localhost port, calls ``fn(rank, world_size, *args)``, saves its return value with
``torch.save`` and always calls ``destroy_process_group`` (gloo aborts with "terminate called
without an active exception" otherwise). A child's exception fails the parent with the child's traceback.
"""

import os
import socket
import tempfile
import traceback
from typing import Any, Callable, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Imported once by the fork server; every child starts with them loaded.
PRELOAD = ["torch", "torch.distributed", "fbgemm_gpu", "torchrec", "torchrec.distributed",
           "torchrec_cce", "torchrec_cce.train"]


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read when the server starts (the first call)
    return ctx


def _child(rank: int, world_size: int, port: int, out_dir: str, env: Dict[str, str],
           fn: Callable, args: tuple) -> None:
    os.environ.clear()  # the parent's environment now, not the server's at its start
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:  # report any failure to the parent
        torch.save({"ok": False, "error": traceback.format_exc()},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_multiprocess(fn: Callable, world_size: int = 2, *args: Any, timeout: float = 300) -> List[Any]:
    """``[fn(0, world_size, *args), fn(1, ...), ...]``, each computed in its own process."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = _context()
        port = _free_port()
        env = dict(os.environ)
        procs = [ctx.Process(target=_child, args=(r, world_size, port, out_dir, env, fn, args))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
                raise TimeoutError(f"{fn.__name__} did not finish in {timeout} s")
        results = []
        for r in range(world_size):
            path = os.path.join(out_dir, f"{r}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} of {fn.__name__} died (exit code {procs[r].exitcode})")
            payload = torch.load(path, weights_only=False)
            if not payload["ok"]:
                raise RuntimeError(f"rank {r} of {fn.__name__} failed:\n{payload['error']}")
            results.append(payload["result"])
        return results
