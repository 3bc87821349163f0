"""
TorchX components that launch the one training script, ``examples/dlrm/train.py``.

A component is a small typed function returning a :py:class:`torchx.specs.AppDef`;
its docstring is the CLI help (``torchx run launch/components.py:dlrm --help``).
``dlrm`` is a thin layer over the builtin :py:func:`torchx.components.dist.ddp`
(``torchrun`` under the hood, so every worker sees ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). Everything after ``--`` is forwarded
to ``train.py`` unchanged, in order.

Run from the repository root with the virtualenv active (``source .venv/bin/activate``):
``torchrun`` must be on ``PATH`` on the local host and, for slurm, in the inherited
environment of the job. The script path ``examples/dlrm/train.py`` is relative to the
working directory (local_cwd, slurm) or to the image's ``WORKDIR`` (kubernetes).

.. code:: shell-session

    # local, 1 node x 2 CPU workers (gloo); .torchxconfig makes local_cwd + dlrm the defaults
    $ torchx run launch/components.py:dlrm -j 1x2 -- --data synthetic --method cce --epochs 1
    $ torchx run -- -j 1x2 -- --data synthetic --method cce --epochs 1  # same, via [cli:run]

    # slurm, 4 nodes x 8 GPUs (nccl)
    $ torchx run -s slurm -cfg partition=gpu,time=24:00:00 launch/components.py:dlrm \\
        -j 4x8 --gpu 8 -- --data criteo_tsv --train-path /data/criteo/train.txt --method cce

    # kubernetes (Volcano), 4 pods x 8 GPUs; the repo is copied into --image and pushed to image_repo
    $ torchx run -s kubernetes -cfg queue=default,namespace=default,image_repo=registry.example.com/dlrm_cce \\
        launch/components.py:dlrm -j 4x8 --gpu 8 --image registry.example.com/torchrec:latest \\
        -- --data criteo_npy --train-path /data/criteo_npy --method cce

    # show the job without launching anything
    $ torchx run --dryrun -s local_cwd launch/components.py:dlrm -j 1x2 -- --data synthetic --epochs 1
"""
from typing import Dict, List, Optional

import torchx
import torchx.specs as specs
from torchx.components.dist import ddp, parse_nnodes

TRAIN_SCRIPT = "examples/dlrm/train.py"
"""The training script every component launches (path relative to the job's working dir)."""

BACKEND_ENV = "TORCHREC_CCE_BACKEND"
"""Env var naming the ``torch.distributed`` backend ``train.py`` should use (``gloo`` or ``nccl``)."""


def dlrm(
    *script_args: str,
    j: str = "1x2",
    cpu: int = 8,
    gpu: int = 0,
    memMB: int = 32768,
    h: Optional[str] = None,
    image: str = torchx.IMAGE,
    name: str = "dlrm_cce",
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
    debug: bool = False,
) -> specs.AppDef:
    """
    DLRM with compressed (CCE, hashing, CE, QR, MEmCom, MPE) embedding tables: runs
    examples/dlrm/train.py under torchrun (dist.ddp) on n nodes x m processes.
    Training flags go after "--" and are forwarded to train.py unchanged and in order;
    a flag may appear only once (torchx rejects repeated options), so pass lists as one value.
    CPU jobs (gpu == 0) get TORCHREC_CCE_BACKEND=gloo, GPU jobs get TORCHREC_CCE_BACKEND=nccl
    (a value given with --env wins).

    Local (from the repo root, venv active): torchx run launch/components.py:dlrm -j 1x2 -- --data synthetic --method cce --epochs 1

    Slurm: torchx run -s slurm -cfg partition=gpu launch/components.py:dlrm -j 4x8 --gpu 8 -- --data criteo_tsv --train-path /data/criteo/train.txt --method cce

    Kubernetes: torchx run -s kubernetes -cfg queue=default,namespace=default,image_repo=registry.example.com/dlrm_cce launch/components.py:dlrm -j 4x8 --gpu 8 --image registry.example.com/torchrec:latest -- --data criteo_npy --train-path /data/criteo_npy --method cce

    Args:
        script_args: training flags for examples/dlrm/train.py (after "--"), e.g.
            --data synthetic --method cce --epochs 1
        j: [{min_nnodes}:]{nnodes}x{nproc_per_node}, e.g. 1x2 (one node, two workers) or 4x8;
            with GPUs, nproc_per_node must not exceed the GPUs per node
        cpu: number of cpus per node (replica); ignored if h is set
        gpu: number of gpus per node (replica); 0 means a CPU job with the gloo backend; ignored if h is set
        memMB: cpu memory in MB per node (replica); ignored if h is set
        h: a registered named resource (host type, e.g. aws_p4d.24xlarge); takes precedence over cpu, gpu, memMB
        image: container image with torch, torchrec and fbgemm installed (kubernetes, docker);
            the workspace (this repo) is copied on top of it. Unused by local_cwd and slurm
        name: job name: {experimentname}/{runname}, {experimentname}/, /{runname} or {runname}
        env: extra environment variables for every worker (e.g. ENV1=v1,ENV2=v2)
        max_retries: restarts allowed after a worker fails: passed to torchrun as
            --max_restarts (every worker is restarted in place; train.py with
            --checkpoint-dir DIR --resume continues from its last complete checkpoint) and to
            the scheduler as its retry count (slurm requeue, kubernetes maxRetry) for failures
            torchrun cannot recover from, such as a lost node
        rdzv_port: port on rank0's host for the c10d rendezvous store (multi-node only;
            single-node jobs pick a free port)
        mounts: mounts for container schedulers (ex. type=bind,src=/data,dst=/data[,readonly])
        debug: run with PyTorch debug env vars (TORCH_DISTRIBUTED_DEBUG=DETAIL, ...)
    """
    _, _, nproc_per_node, _ = parse_nnodes(j)
    resource = specs.resource(cpu=cpu, gpu=gpu, memMB=memMB, h=h)
    if resource.gpu > 0 and nproc_per_node > resource.gpu:
        raise ValueError(
            f"-j {j} starts {nproc_per_node} workers per node but each node has only "
            f"{resource.gpu} GPU(s); use -j <nodes>x{resource.gpu} or request more GPUs"
        )

    env = dict(env or {})  # never mutate the caller's dict (ddp writes into it)
    env.setdefault(BACKEND_ENV, "nccl" if resource.gpu > 0 else "gloo")
    # Restarts need no TORCH_DISABLE_SHARE_RDZV_TCP_STORE: train.py's workers prefix torchrun's
    # shared store by restart attempt (torchrec_cce.train.init_distributed, pytorch#135712).

    app = ddp(
        *script_args,
        script=TRAIN_SCRIPT,
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env=env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        mounts=mounts,
        debug=debug,
    )
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    if max_retries:
        (role,) = app.roles
        cmd = role.args[1]
        if not cmd.startswith("torchrun "):  # dist.ddp's command layout changed: fail loudly
            raise RuntimeError(f"unexpected torchrun command from dist.ddp: {cmd!r}")
        role.args[1] = f"torchrun --max_restarts {max_retries} " + cmd[len("torchrun "):]
    return app
