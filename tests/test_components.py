"""Tests for the TorchX launch components (launch/components.py) and .torchxconfig.

Nothing here launches training: the CLI checks use ``torchx run --dryrun``, which only
builds and prints the scheduler request.
"""
import configparser
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `launch` is a top-level dir of the repo, not an installed package
    sys.path.insert(0, str(REPO_ROOT))

import launch.components  # noqa: E402
from launch.components import BACKEND_ENV, TRAIN_SCRIPT, dlrm  # noqa: E402
from torchx.components.component_test_base import ComponentTestCase  # noqa: E402
from torchx.schedulers import get_scheduler_factories  # noqa: E402
from torchx.specs import AppDef, named_resources  # noqa: E402
from torchx.specs.builders import materialize_appdef  # noqa: E402

TORCHX = Path(sys.executable).parent / "torchx"
TORCHX_CMD = [str(TORCHX)] if TORCHX.exists() else [sys.executable, "-m", "torchx.cli.main"]
COMPONENT = "launch/components.py:dlrm"


class DlrmComponentTest(ComponentTestCase):
    def test_validate(self) -> None:
        # what `torchx run launch/components.py:dlrm --help` does: types + docstring parse
        self.validate(launch.components, "dlrm")


def _torchrun_cmd(app: AppDef) -> List[str]:
    """The torchrun command line of the (single) role, as tokens."""
    (role,) = app.roles
    assert role.entrypoint == "bash"
    assert role.args[0] == "-c" and len(role.args) == 2
    return shlex.split(role.args[1])


def _opt(cmd: List[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def _script_args(cmd: List[str]) -> List[str]:
    i = cmd.index(TRAIN_SCRIPT)
    return cmd[i + 1 :]


SCRIPT_ARGS = (
    "--data", "synthetic",
    "--method", "cce",
    "--epochs", "1",
    "--num-embeddings-per-feature", "1000,2000,3000",
    "--recluster-at", "0.25,0.5",
    "--checkpoint-dir", "/tmp/ckpt dir/with space",
    "--metrics-json", "runs/m.json",
)  # fmt: skip


def test_topology_from_j() -> None:
    app = dlrm(*SCRIPT_ARGS, j="2x4")
    (role,) = app.roles
    assert app.name == "dlrm_cce"
    assert role.name == "train"
    assert role.num_replicas == 2
    assert role.min_replicas == 2
    cmd = _torchrun_cmd(app)
    assert cmd[0] == "torchrun"
    assert _opt(cmd, "--nnodes") == "2"
    assert _opt(cmd, "--nproc_per_node") == "4"
    assert _opt(cmd, "--rdzv_backend") == "c10d"
    # multi-node: rendezvous on rank0's host at rdzv_port
    assert _opt(cmd, "--rdzv_endpoint").endswith(":29500")
    assert role.port_map == {"c10d": 29500}


def test_single_node_and_elastic_topologies() -> None:
    cmd = _torchrun_cmd(dlrm(j="1x2"))
    assert _opt(cmd, "--nnodes") == "1"
    assert _opt(cmd, "--nproc_per_node") == "2"
    assert _opt(cmd, "--rdzv_endpoint") == "localhost:0"  # single node: free port

    app = dlrm(j="2:4x3", rdzv_port=29600)
    (role,) = app.roles
    assert (role.min_replicas, role.num_replicas) == (2, 4)
    cmd = _torchrun_cmd(app)
    assert _opt(cmd, "--nnodes") == "2:4"
    assert _opt(cmd, "--nproc_per_node") == "3"
    assert _opt(cmd, "--rdzv_endpoint").endswith(":29600")

    with pytest.raises(ValueError):
        dlrm(j="2by4")


def test_script_args_forwarded_unchanged_in_order() -> None:
    cmd = _torchrun_cmd(dlrm(*SCRIPT_ARGS, j="2x4"))
    assert cmd.count(TRAIN_SCRIPT) == 1
    assert _script_args(cmd) == list(SCRIPT_ARGS)  # incl. the arg with spaces
    # the script comes after all torchrun options
    assert cmd.index(TRAIN_SCRIPT) > cmd.index("--nproc_per_node")

    assert _script_args(_torchrun_cmd(dlrm())) == []


def test_cli_parsing_of_script_args() -> None:
    # exactly how `torchx run launch/components.py:dlrm <args>` materializes the AppDef
    app = materialize_appdef(
        dlrm,
        ["-j", "2x4", "--gpu", "4", "--memMB", "4096", "--", "--data", "synthetic", "--epochs", "1", "--lr", "0.5"],
    )
    (role,) = app.roles
    assert role.num_replicas == 2
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (8, 4, 4096)
    cmd = _torchrun_cmd(app)
    assert _opt(cmd, "--nproc_per_node") == "4"
    assert _script_args(cmd) == ["--data", "synthetic", "--epochs", "1", "--lr", "0.5"]

    # no training flags at all is fine (train.py defaults)
    app = materialize_appdef(dlrm, ["-j", "1x2"])
    assert _script_args(_torchrun_cmd(app)) == []


def test_cpu_resources_and_gloo() -> None:
    app = dlrm("--data", "synthetic", j="2x4")
    (role,) = app.roles
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (8, 0, 32768)
    assert role.env[BACKEND_ENV] == "gloo"

    app = dlrm(j="1x2", cpu=3, memMB=2048)
    (role,) = app.roles
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (3, 0, 2048)
    assert role.env[BACKEND_ENV] == "gloo"


def test_gpu_resources_and_nccl() -> None:
    app = dlrm("--data", "criteo_tsv", j="4x8", gpu=8, cpu=64, memMB=500_000)
    (role,) = app.roles
    assert role.num_replicas == 4
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (64, 8, 500_000)
    assert role.env[BACKEND_ENV] == "nccl"
    assert _opt(_torchrun_cmd(app), "--nproc_per_node") == "8"

    # fewer workers than GPUs is allowed, more is not
    assert dlrm(j="1x4", gpu=8).roles[0].env[BACKEND_ENV] == "nccl"
    with pytest.raises(ValueError, match="GPU"):
        dlrm(j="1x8", gpu=4)


def test_named_resource_takes_precedence() -> None:
    h = "aws_p4d.24xlarge"
    expected = named_resources[h]
    app = dlrm(j="2x8", h=h, cpu=1, gpu=0, memMB=1)
    (role,) = app.roles
    assert role.resource.gpu == expected.gpu == 8
    assert role.resource.cpu == expected.cpu
    assert role.resource.memMB == expected.memMB
    assert role.env[BACKEND_ENV] == "nccl"  # follows the resolved resource, not --gpu


def test_env_debug_image_mounts_name_retries() -> None:
    user_env = {"FOO": "bar", BACKEND_ENV: "mpi"}
    app = dlrm(
        j="1x2",
        env=user_env,
        debug=True,
        image="registry.example.com/torchrec:latest",
        mounts=["type=bind", "src=/data", "dst=/data", "readonly"],  # CLI: --mounts type=bind,src=...
        name="exp/run1",
        max_retries=3,
    )
    (role,) = app.roles
    assert user_env == {"FOO": "bar", BACKEND_ENV: "mpi"}  # caller's dict not mutated
    assert role.env["FOO"] == "bar"
    assert role.env[BACKEND_ENV] == "mpi"  # explicit --env wins
    assert role.env["TORCH_DISTRIBUTED_DEBUG"] == "DETAIL"
    assert role.env["TORCHX_TRACKING_EXPERIMENT_NAME"] == "exp"
    assert app.name == "run1"
    assert role.image == "registry.example.com/torchrec:latest"
    assert role.max_retries == 3
    (mount,) = role.mounts
    assert (mount.src_path, mount.dst_path, mount.read_only) == ("/data", "/data", True)


def test_max_retries_restarts_workers_and_the_job() -> None:
    # torchrun restarts every worker in place after a failure (TorchX's local_cwd honours no
    # scheduler retries, so this is what recovers a killed worker locally) ...
    cmd = _torchrun_cmd(dlrm(*SCRIPT_ARGS, j="1x2", max_retries=2))
    assert _opt(cmd, "--max_restarts") == "2"
    assert cmd.index("--max_restarts") < cmd.index(TRAIN_SCRIPT)
    assert _script_args(cmd) == list(SCRIPT_ARGS)
    # ... and the scheduler gets the same retry count (lost nodes).
    (role,) = dlrm(j="2x4", max_retries=2).roles
    assert role.max_retries == 2
    assert "--max_restarts" not in _torchrun_cmd(dlrm(j="1x2"))  # default: no restarts
    # No store work-around: the workers key their process group by restart attempt
    # (tests/test_elastic.py restarts under this component and under plain torchrun).
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in role.env
    with pytest.raises(ValueError, match="max_retries must be >= 0"):
        dlrm(j="1x2", max_retries=-1)
    app = materialize_appdef(dlrm, ["-j", "1x2", "--max_retries", "1", "--", "--resume"])
    cmd = _torchrun_cmd(app)
    assert _opt(cmd, "--max_restarts") == "1" and _script_args(cmd) == ["--resume"]


# ---------------------------------------------------------------------------- CLI


def _run_torchx(args: List[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TORCHXCONFIG", None)  # use the repo's .torchxconfig
    env["HOME"] = str(tmp_path)  # and not a user-level ~/.torchxconfig
    return subprocess.run(
        TORCHX_CMD + args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def _unwrap(out: str) -> str:
    """Undo pformat's splitting of long strings into adjacent literals."""
    return re.sub(r"""['"]\n\s*['"]""", "", out)


def test_cli_dryrun_local_cwd(tmp_path: Path) -> None:
    p = _run_torchx(
        ["run", "--dryrun", "-s", "local_cwd", COMPONENT, "-j", "1x2", "--", "--data", "synthetic", "--epochs", "1"],
        tmp_path,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    out = _unwrap(p.stdout)
    assert "=== SCHEDULER REQUEST ===" in out
    assert "examples/dlrm/train.py --data synthetic --epochs 1" in out
    assert "--nnodes 1 --nproc_per_node 2" in out
    assert f"'{BACKEND_ENV}': 'gloo'" in out
    assert f"'cwd': '{REPO_ROOT}'" in out


def test_cli_dryrun_defaults_from_torchxconfig(tmp_path: Path) -> None:
    # [cli:run] supplies scheduler=local_cwd and the component; the leading `--` ends run's options
    p = _run_torchx(["run", "--dryrun", "--", "-j", "1x2", "--", "--data", "synthetic", "--method", "cce"], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    out = _unwrap(p.stdout)
    assert "examples/dlrm/train.py --data synthetic --method cce" in out
    assert "local_cwd://" in out


def test_cli_dryrun_slurm(tmp_path: Path) -> None:
    p = _run_torchx(
        ["run", "--dryrun", "-s", "slurm", "-cfg", "partition=gpu,time=24:00:00", COMPONENT,
         "-j", "4x8", "--gpu", "8", "--", "--data", "criteo_tsv", "--train-path", "/data/train.txt"],
        tmp_path,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    sbatch = [line for line in out.splitlines() if line.startswith("#SBATCH --job-name=train-")]
    assert len(sbatch) == 4  # one het-group per node
    for line in sbatch:
        for opt in ("--partition=gpu", "--time=24:00:00", "--gpus-per-task=8", "--cpus-per-task=8", "--ntasks-per-node=1"):
            assert opt in line, line
    assert f"{BACKEND_ENV}=nccl" in out
    assert "--nnodes 4 --nproc_per_node 8" in out
    assert "examples/dlrm/train.py --data criteo_tsv --train-path /data/train.txt" in out


def test_kubernetes_cfg_is_valid() -> None:
    # the -cfg used in the docs resolves against torchx 0.7.0's kubernetes run opts
    opts = get_scheduler_factories()["kubernetes"](session_name="test").run_opts()
    cfg = opts.resolve(opts.cfg_from_str("queue=default,namespace=default,image_repo=registry.example.com/dlrm_cce"))
    assert cfg["queue"] == "default" and cfg["namespace"] == "default"
    assert cfg["image_repo"] == "registry.example.com/dlrm_cce"


def test_cli_dryrun_kubernetes(tmp_path: Path) -> None:
    pytest.importorskip("kubernetes", reason="torchx's kubernetes dryrun needs the `kubernetes` client")
    p = _run_torchx(
        ["run", "--dryrun", "--workspace", "", "-s", "kubernetes", "-cfg", "queue=default,namespace=default",
         COMPONENT, "-j", "4x8", "--gpu", "8", "--image", "registry.example.com/torchrec:latest",
         "--", "--data", "criteo_npy", "--method", "cce"],
        tmp_path,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    out = _unwrap(p.stdout)
    assert "nvidia.com/gpu" in out
    assert "registry.example.com/torchrec:latest" in out
    assert "examples/dlrm/train.py --data criteo_npy --method cce" in out


# ---------------------------------------------------------------------- .torchxconfig


def _torchxconfig() -> configparser.ConfigParser:
    cp = configparser.ConfigParser()
    cp.optionxform = lambda option: option  # type: ignore[method-assign]  # torchx keeps key case
    cp.read(REPO_ROOT / ".torchxconfig")
    return cp


def test_torchxconfig_cli_run() -> None:
    cp = _torchxconfig()
    assert cp["cli:run"]["scheduler"] == "local_cwd"
    assert cp["cli:run"]["component"] == COMPONENT


@pytest.mark.parametrize("scheduler", ["local_cwd", "slurm", "kubernetes"])
def test_torchxconfig_scheduler_keys_are_valid(scheduler: str) -> None:
    """Real and commented-out (illustrative) keys must be run opts of the scheduler."""
    cp = _torchxconfig()
    assert cp.has_section(scheduler)
    keys = set(cp[scheduler].keys())
    text = (REPO_ROOT / ".torchxconfig").read_text()
    body = re.search(rf"^\[{scheduler}\]\n(.*?)(?=^#?\s*\[|\Z)", text, re.S | re.M)
    assert body is not None
    keys |= set(re.findall(r"^#\s*([A-Za-z_][\w-]*)\s*=", body.group(1), re.M))
    assert keys, f"[{scheduler}] documents no options"
    valid = {name for name, _ in get_scheduler_factories()[scheduler](session_name="test").run_opts()}
    assert keys <= valid, f"unknown [{scheduler}] options: {keys - valid}"
