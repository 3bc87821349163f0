"""Crash-safe training checkpoints with ``torch.distributed.checkpoint`` (DCP).

A checkpoint holds everything a run needs to continue exactly where it stopped:

* the model's state dict (sharded codebooks, CCE assignments, also when split by id range,
  hash generations), written by DCP so that it reshards to another world size;
* the optimizer's state dict (the fused sparse optimizer's and the dense one's);
* online hot tiers' sketches, their pending per-rank counts summed over ranks first
  (:func:`torchrec_cce.hot_migration.sync_sketches`), so the saved counts hold every rank's ids;
* per-rank training state that is not in any state dict: the re-clustering reservoir of every
  CCE table (its ids, count and generator) and the RNG states (torch CPU, CUDA, ``random``,
  numpy) of every rank;
* the data position and anything else the training loop passes as ``progress`` (epoch, step,
  step within the epoch, shuffle seed, ...), in the ``complete`` marker (JSON).

Layout: ``<dir>/step_<N>/`` (DCP files plus ``complete``). A save writes into
``<dir>/.tmp-step_<N>/``; after every rank has finished, rank 0 writes ``complete`` (the
metadata, last) and renames the directory to ``step_<N>`` in one ``os.replace``, so a crash at
any point leaves either the new complete checkpoint or none; older checkpoints are pruned only
after that (``keep``). Loading takes the newest ``step_<N>`` with a ``complete`` marker (an
incomplete newer one is skipped, and the log says so), checks the model config, the files and
the tensor shapes before DCP reads anything, and raises a :class:`CheckpointError` naming the
checkpoint, the problem and the fix when nothing usable is left. A directory with no
checkpoint yet is a fresh start (logged).

World-size changes: DCP reshards model and optimizer state. Positions (``position_keys`` of
``progress``, counted in global batches) are rescaled by the ratio of global batch sizes and must
come out whole. Per-rank state goes to rank ``r`` from old ranks ``j`` with
``j % new_world == r`` (reservoirs merged by their counts; the RNG of old rank ``r`` if it
existed): resuming on another world size continues training, not bit for bit.

Example::

    manager = CheckpointManager("runs/ckpt", keep=2, config=model_flags, batch_size=bs)
    resumed = manager.load(dmp, optimizer)          # None: nothing yet, fresh start (logged)
    ...
    guard_loss(loss, step)                          # every step (collective)
    if step % every == 0:
        manager.save(step, dmp, optimizer, {"epoch": e, "step": step, "step_in_epoch": i})
"""

import json
import logging
import os
import pickle
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from torchrec_cce.clustering.kmeans import default_collective
from torchrec_cce.distributed.tensors import local_pieces
from torchrec_cce.hot_migration import sync_sketches
from torchrec_cce.methods.cce import CCETable

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
TMP_PREFIX = ".tmp-step_"
MARKER = "complete"
FORMAT_VERSION = 1
DEFAULT_POSITION_KEYS = ("step", "step_in_epoch")
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_DIR = re.compile(r"^\.tmp-step_(\d+)$")
_OLD_DIR = re.compile(r"^step_(\d+)\.old$")
_WRAPPERS = ("_dmp_wrapped_module.", "module.")


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used (the message names it, the problem and the fix)."""


class CheckpointCorruptError(CheckpointError):
    """Missing or truncated files, an unreadable marker or DCP metadata."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written by another model configuration."""


class CheckpointReshardError(CheckpointError):
    """The checkpoint's data position cannot be continued at this world size / batch size."""


class NonFiniteError(RuntimeError):
    """The loss or a table turned NaN/inf; training stops without writing a checkpoint."""


@dataclass
class Resumed:
    """What :meth:`CheckpointManager.load` restored."""

    path: str
    step: int
    progress: Dict[str, Any]  # positions already rescaled to this world size
    world_size: int  # of the run that wrote it
    meta: Dict[str, Any]


# ---------------------------------------------------------------- small helpers
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_ok(ok: bool) -> bool:
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag) == 0


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _strip_wrappers(fqn: str) -> str:
    changed = True
    while changed:
        changed = False
        for w in _WRAPPERS:
            if fqn.startswith(w):
                fqn, changed = fqn[len(w):], True
    return fqn.replace("._dmp_wrapped_module.", ".").replace(".module.", ".")


def cce_tables(model: nn.Module) -> Dict[str, CCETable]:
    """Every CCE table of ``model`` (sharded or not), by module path without DMP/DDP wrappers."""
    return {_strip_wrappers(name): m for name, m in model.named_modules() if isinstance(m, CCETable)}


def _dir_files(path: str) -> Dict[str, int]:
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            rel = os.path.relpath(full, path)
            if rel != MARKER:
                out[rel] = os.path.getsize(full)
    return out


# ---------------------------------------------------------------- per-rank state
def _reservoir_state(table: CCETable) -> Dict[str, torch.Tensor]:
    res = table.reservoir
    gen = res._generator
    if gen is None:  # not drawn from yet: its state is the seeded initial one
        gen = torch.Generator(device=res.ids.device).manual_seed(res.seed)
    return {"ids": res.ids.detach().clone(), "seen": torch.tensor(res.seen, dtype=torch.int64),
            "rng": gen.get_state()}


def _rank_state(model: nn.Module) -> Dict[str, Any]:
    state: Dict[str, Any] = {
        "torch_rng": torch.get_rng_state(),
        "python_rng": pickle.dumps(random.getstate()),
    }
    reservoirs = {name: _reservoir_state(t) for name, t in cce_tables(model).items()}
    if reservoirs:  # an empty dict saves no key, and DCP's load would then miss it
        state["reservoirs"] = reservoirs
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = pickle.dumps([s.cpu() for s in torch.cuda.get_rng_state_all()])
    try:
        import numpy as np

        state["numpy_rng"] = pickle.dumps(np.random.get_state())
    except ImportError:  # pragma: no cover - numpy ships with torch's stack
        pass
    return state


def _restore_rng(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_rng"])
    random.setstate(pickle.loads(state["python_rng"]))
    if "numpy_rng" in state:
        import numpy as np

        np.random.set_state(pickle.loads(state["numpy_rng"]))
    if "cuda_rng" in state and torch.cuda.is_available():
        states = pickle.loads(state["cuda_rng"])
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def _restore_reservoir(table: CCETable, sources: List[Dict[str, torch.Tensor]], seed: int) -> None:
    """Set ``table``'s reservoir from one saved reservoir, or merge several (world change)."""
    res = table.reservoir
    if not sources:
        res.reset()
        res._generator = None
        return
    first = sources[0]
    gen = torch.Generator(device=res.ids.device)
    gen.set_state(first["rng"])
    res._generator = gen
    if len(sources) == 1 and first["ids"].numel() == res.capacity:
        res.ids.copy_(first["ids"])
        res.seen = int(first["seen"])
        return
    # Several reservoirs (fewer ranks now) or another capacity (each rank's share of the
    # sample changes with the world size: CCETable.share_sample): subsample into this one.
    # Merge: slot counts proportional to each reservoir's number of observed ids.
    seen = [int(s["seen"]) for s in sources]
    samples = [s["ids"][: min(n, s["ids"].numel())] for s, n in zip(sources, seen)]
    total = sum(seen)
    if sum(x.numel() for x in samples) <= res.capacity:
        merged = torch.cat(samples)
    else:
        g = torch.Generator().manual_seed(seed)
        quota = [res.capacity * n // total for n in seen]
        for i in sorted(range(len(seen)), key=lambda i: -(res.capacity * seen[i] % total)):
            if sum(quota) >= res.capacity:
                break
            quota[i] += 1
        merged = torch.cat([x[torch.randperm(x.numel(), generator=g)[: min(q, x.numel())]]
                            for x, q in zip(samples, quota)])
    res.ids.zero_()
    res.ids[: merged.numel()] = merged.to(res.ids.device)
    res.seen = total if merged.numel() >= res.capacity else merged.numel()


# ---------------------------------------------------------------- finiteness
def _table_of(key: str) -> str:
    m = re.search(r"embedding_bags\.([^.]+)\.weight", key)
    if m:
        codebook = m.group(1)
        logical = codebook.split("__")[0]
        return (f"embedding table '{logical}'" +
                (f" (codebook '{codebook}')" if codebook != logical else ""))
    return f"parameter '{_strip_wrappers(key)}'"


def check_finite(model: nn.Module, step: Optional[int] = None, last_good: Optional[str] = None
                 ) -> None:
    """Raise :class:`NonFiniteError` naming the tables / parameters holding NaN or inf.

    Collective under ``torch.distributed`` (every rank checks its shards, flags are all-reduced,
    every rank raises the same error)."""
    state = model.state_dict()
    with warnings.catch_warnings():  # TorchRec's ShardedTensors warn of their own deprecation
        warnings.simplefilter("ignore", FutureWarning)
        keys = sorted(k for k, v in state.items() if (torch.is_tensor(v) or hasattr(
            v, "local_shards")) and v.dtype.is_floating_point)
        bad = torch.zeros(len(keys), dtype=torch.float64)
        for i, k in enumerate(keys):
            for piece, _ in local_pieces(state[k]):
                bad[i] += float((~torch.isfinite(piece.detach())).sum())
    if dist.is_initialized():
        dist.all_reduce(bad)
    if float(bad.sum()) == 0:
        return
    names = sorted({f"{_table_of(k)}: {int(bad[i])} non-finite values" for i, k in enumerate(keys)
                    if bad[i] > 0})
    raise NonFiniteError(_nonfinite_message("; ".join(names), step, last_good))


def _nonfinite_message(what: str, step: Optional[int], last_good: Optional[str]) -> str:
    where = f" at step {step}" if step is not None else ""
    keep = (f"the last good checkpoint {last_good} is untouched" if last_good
            else "no checkpoint was written")
    return (f"training stopped{where}: {what}. Nothing was saved ({keep}). Fix: lower --lr "
            f"(or raise the warm-up), check the input data for extreme values, then resume "
            f"from the last good checkpoint with --resume.")


def guard_loss(loss: torch.Tensor, step: int, model: Optional[nn.Module] = None,
               last_good: Optional[str] = None) -> None:
    """Raise :class:`NonFiniteError` on every rank when any rank's loss is NaN/inf.

    With ``model``, the message also names the tables that turned non-finite (if any)."""
    value = float(loss.detach().float().sum())
    losses = torch.zeros(_world(), dtype=torch.float64)
    losses[_rank()] = value
    if dist.is_initialized():
        dist.all_reduce(losses)  # every rank's loss in its own slot (NaN stays in its slot)
    if bool(torch.isfinite(losses).all()):
        return
    if model is not None:
        check_finite(model, step, last_good)  # raises naming the table if one is non-finite
    bad = ", ".join(f"rank {r}: {float(v):g}" for r, v in enumerate(losses.tolist())
                    if not torch.isfinite(torch.tensor(v)))
    raise NonFiniteError(_nonfinite_message(f"the loss is non-finite ({bad})", step, last_good))


# ---------------------------------------------------------------- the manager
class CheckpointManager:
    """Atomic, pruned, resumable DCP checkpoints in ``directory`` (see the module docstring).

    Args:
        directory: where ``step_<N>`` checkpoints live (shared by all ranks).
        keep: how many complete checkpoints to keep (0: all).
        config: the model-defining settings (JSON-able dict); a checkpoint written with other
            values is refused with the differences named.
        batch_size: the per-rank batch size (rescales positions on a world-size change).
        position_keys: ``progress`` entries counted in global batches.
        log: where messages go (default: this module's logger, rank 0 only).
        on_written: called with the step on every rank once its shards are written, before
            the checkpoint is complete (a fault-injection point for restart tests).
    """

    def __init__(self, directory: str, keep: int = 2, config: Optional[Dict[str, Any]] = None,
                 batch_size: Optional[int] = None,
                 position_keys: Sequence[str] = DEFAULT_POSITION_KEYS,
                 log: Optional[Callable[[str], None]] = None,
                 on_written: Optional[Callable[[int], None]] = None) -> None:
        if keep < 0:
            raise ValueError(f"keep must be >= 0 (0 keeps every checkpoint), got {keep}")
        self.directory = directory
        self.keep = keep
        self.config = json.loads(json.dumps(config or {}))
        self.batch_size = batch_size
        self.position_keys = tuple(position_keys)
        self._log = log
        self.on_written = on_written
        self.last_saved: Optional[str] = None

    def log(self, msg: str) -> None:
        if _rank() != 0:
            return
        if self._log is not None:
            self._log(msg)
        else:
            logger.warning(msg)

    # ---- listing
    def checkpoints(self) -> List[Tuple[int, str, bool]]:
        """``(step, path, complete)`` of every ``step_<N>`` directory, newest first."""
        if not os.path.isdir(self.directory):
            return []
        out = []
        for name in os.listdir(self.directory):
            m = _STEP_DIR.match(name)
            path = os.path.join(self.directory, name)
            if m and os.path.isdir(path):
                out.append((int(m.group(1)), path, os.path.exists(os.path.join(path, MARKER))))
        return sorted(out, reverse=True)

    def latest(self) -> Optional[str]:
        """The newest complete checkpoint (not validated), or None."""
        return next((p for _, p, ok in self.checkpoints() if ok), None)

    # ---- saving
    def _state(self, model: nn.Module, optimizer: Optional[Any]) -> Dict[str, Any]:
        state: Dict[str, Any] = {"model": model.state_dict(),
                                 "rank_state": {f"rank{_rank()}": _rank_state(model)}}
        if optimizer is not None:
            state["optim"] = optimizer.state_dict()
        return state

    def save(self, step: int, model: nn.Module, optimizer: Optional[Any],
             progress: Dict[str, Any]) -> str:
        """Write ``step_<step>`` atomically (collective); returns its path.

        Refuses (:class:`NonFiniteError`, nothing written) if the model holds NaN/inf."""
        check_finite(model, step, self.latest())
        # Online hot tiers: every rank's pending sketch counts summed into the (replicated)
        # counts first, so the one copy DCP writes holds all ranks' ids.
        sync_sketches(model, default_collective())
        final = os.path.join(self.directory, f"{CHECKPOINT_PREFIX}{step}")
        tmp = os.path.join(self.directory, f"{TMP_PREFIX}{step}")
        t0 = time.perf_counter()
        error: Optional[BaseException] = None
        if _rank() == 0:
            try:
                os.makedirs(self.directory, exist_ok=True)
                for name in os.listdir(self.directory):  # leftovers of a crash during a save
                    if _TMP_DIR.match(name) or _OLD_DIR.match(name):
                        self.log(f"removing {os.path.join(self.directory, name)}: a partial "
                                 f"write left by an interrupted save")
                        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
                os.makedirs(tmp)
            except OSError as e:
                error = e
        if not _all_ok(error is None):  # (also the barrier before writing)
            raise CheckpointError(f"cannot create the checkpoint directory {tmp}: "
                                  f"{error or 'failed on rank 0'}; check --checkpoint-dir")
        dcp.save(self._state(model, optimizer), checkpoint_id=tmp)
        if self.on_written is not None:
            self.on_written(step)
        _barrier()  # every rank has written its shards (and rank 0 DCP's .metadata)
        if _rank() == 0:
            try:
                meta = {"format": FORMAT_VERSION, "step": int(step), "world_size": _world(),
                        "batch_size": self.batch_size, "progress": progress,
                        "config": self.config, "files": _dir_files(tmp),
                        "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                          time.gmtime())}
                with open(os.path.join(tmp, MARKER + ".part"), "w") as f:
                    json.dump(meta, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(os.path.join(tmp, MARKER + ".part"), os.path.join(tmp, MARKER))
                _fsync_dir(tmp)
                if os.path.exists(final):  # same step saved before (e.g. by a previous attempt)
                    old = final + ".old"
                    shutil.rmtree(old, ignore_errors=True)
                    os.replace(final, old)
                    os.replace(tmp, final)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(tmp, final)
                _fsync_dir(self.directory)
                self._prune()
            except BaseException as e:  # tell the other ranks instead of leaving them waiting
                error = e
        if not _all_ok(error is None):
            if error is not None:
                raise error
            raise CheckpointError(f"rank 0 failed to finish checkpoint {final} (see its log)")
        self.last_saved = final
        self.log(f"checkpoint {final} written in {time.perf_counter() - t0:.1f} s")
        return final

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        complete = [(s, p) for s, p, ok in self.checkpoints() if ok]
        for _, path in complete[self.keep:]:
            shutil.rmtree(path, ignore_errors=True)
            self.log(f"pruned old checkpoint {path} (--keep-checkpoints {self.keep})")

    # ---- validation (rank 0, before DCP reads anything)
    def _read_marker(self, path: str) -> Dict[str, Any]:
        try:
            with open(os.path.join(path, MARKER)) as f:
                meta = json.load(f)
            if not isinstance(meta, dict) or "step" not in meta or "files" not in meta:
                raise ValueError("missing 'step' / 'files'")
            return meta
        except (OSError, ValueError) as e:
            raise CheckpointCorruptError(
                f"checkpoint {path}: its '{MARKER}' marker is unreadable ({e})") from None

    def _check_config(self, path: str, meta: Dict[str, Any]) -> None:
        theirs = meta.get("config", {})
        keys = sorted(set(theirs) | set(self.config))
        diffs = [f"{k}={theirs.get(k, '<unset>')!r} there, {self.config.get(k, '<unset>')!r} here"
                 for k in keys if theirs.get(k, "<unset>") != self.config.get(k, "<unset>")]
        if diffs:
            raise CheckpointMismatchError(
                f"checkpoint {path} was written by another model config: {'; '.join(diffs)}. "
                f"Fix: resume with the same model flags as the run that wrote it, or point "
                f"--checkpoint-dir at a new directory to start a fresh run.")

    def _check_files(self, path: str, meta: Dict[str, Any]) -> Any:
        problems = []
        for rel, size in sorted(meta["files"].items()):
            full = os.path.join(path, rel)
            if not os.path.exists(full):
                problems.append(f"file {rel} is missing")
            elif os.path.getsize(full) != size:
                problems.append(f"file {rel} has {os.path.getsize(full)} bytes, "
                                f"{size} were written (truncated or overwritten)")
        if not problems:
            try:
                metadata = dcp.FileSystemReader(path).read_metadata()
            except Exception as e:  # noqa: BLE001 - any unpickling error means corrupt
                problems.append(f"DCP metadata (.metadata) is unreadable: {type(e).__name__}: {e}")
            else:
                for index, info in (metadata.storage_data or {}).items():
                    full = os.path.join(path, info.relative_path)
                    if not os.path.exists(full):
                        problems.append(f"shard file {info.relative_path} (holding "
                                        f"{index.fqn}) is missing")
                        break
                    if os.path.getsize(full) < info.offset + info.length:
                        problems.append(f"shard file {info.relative_path} is truncated "
                                        f"({os.path.getsize(full)} bytes, {index.fqn} needs "
                                        f"{info.offset + info.length})")
                        break
                if not problems:
                    return metadata
        raise CheckpointCorruptError(f"checkpoint {path} is corrupt: {'; '.join(problems)}")

    def _check_shapes(self, path: str, metadata: Any, expected: Dict[str, Tuple[int, ...]]) -> None:
        saved = metadata.state_dict_metadata
        missing = sorted(k for k in expected if k not in saved)
        extra = sorted(k for k, v in saved.items()
                       if k.startswith(("model.", "optim.")) and k not in expected
                       and isinstance(v, TensorStorageMetadata))
        wrong = sorted(f"{k}: {tuple(saved[k].size)} there, {expected[k]} here" for k in expected
                       if k in saved and isinstance(saved[k], TensorStorageMetadata)
                       and tuple(saved[k].size) != expected[k])
        if missing or extra or wrong:
            parts = []
            for label, items in (("shapes differ", wrong), ("not in the checkpoint", missing),
                                 ("in the checkpoint but not in this model", extra)):
                if items:
                    more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                    parts.append(f"{label}: {', '.join(items[:5])}{more}")
            raise CheckpointMismatchError(
                f"checkpoint {path} does not fit this model ({'; '.join(parts)}). Fix: resume "
                f"with the same model flags as the run that wrote it, or point "
                f"--checkpoint-dir at a new directory to start a fresh run.")

    def _rescale(self, path: str, meta: Dict[str, Any]) -> Dict[str, Any]:
        progress = dict(meta.get("progress", {}))
        old_world, old_bs = int(meta["world_size"]), meta.get("batch_size")
        new_world, new_bs = _world(), self.batch_size
        if old_bs is None or new_bs is None:
            old_bs = new_bs = 1
        old_global, new_global = old_world * int(old_bs), new_world * int(new_bs)
        if old_global == new_global:
            return progress
        for k in self.position_keys:
            if k not in progress:
                continue
            samples = int(progress[k]) * old_global
            if samples % new_global:
                raise CheckpointReshardError(
                    f"checkpoint {path} stopped at {k}={progress[k]} with {old_world} ranks x "
                    f"{old_bs} rows ({samples} rows); {new_world} ranks x {new_bs} rows cannot "
                    f"continue from that position ({samples / new_global:g} batches). Fix: "
                    f"resume with a world size / --batch-size whose global batch divides "
                    f"{samples}, or with {old_world} ranks x {old_bs}.")
            progress[k] = samples // new_global
        return progress

    # ---- loading
    def _expected_shapes(self, state: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
        from torch.distributed.checkpoint._nested_dict import flatten_state_dict

        flat, _ = flatten_state_dict({k: v for k, v in state.items() if k != "rank_state"})
        mine = {k: tuple(v.size()) for k, v in flat.items()
                if torch.is_tensor(v) or hasattr(v, "local_shards")}
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return mine
        # A fused optimizer's state dict holds only the tables a rank stores: take the union.
        every: List[Dict[str, Tuple[int, ...]]] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(every, mine)
        return {k: v for d in every for k, v in d.items()}

    def _plan(self, expected: Dict[str, Tuple[int, ...]]) -> Dict[str, Any]:
        """Rank 0: the candidates to try, newest first, and what was skipped (and why)."""
        found = self.checkpoints()
        tmp = sorted(n for n in (os.listdir(self.directory) if os.path.isdir(self.directory)
                                 else []) if _TMP_DIR.match(n))
        notes = [f"ignoring {os.path.join(self.directory, n)}: a partial write of an interrupted "
                 f"save" for n in tmp]
        if not found:
            return {"fresh": True, "notes": notes, "candidates": [], "problems": []}
        candidates, problems = [], []
        for step, path, complete in found:
            if not complete:
                problems.append(f"{path}: incomplete (no '{MARKER}' marker: its save did not "
                                f"finish)")
                notes.append(f"checkpoint {path} is incomplete (no '{MARKER}' marker): "
                             f"falling back to the previous complete checkpoint")
                continue
            try:
                meta = self._read_marker(path)
                self._check_config(path, meta)
                metadata = self._check_files(path, meta)
                self._check_shapes(path, metadata, expected)
                progress = self._rescale(path, meta)
            except (CheckpointMismatchError, CheckpointReshardError) as e:
                return {"fresh": False, "notes": notes, "candidates": [], "problems": problems,
                        "fatal": (type(e).__name__, str(e))}
            except CheckpointCorruptError as e:
                problems.append(str(e))
                notes.append(f"{e}; falling back to the previous complete checkpoint")
                continue
            old_world = int(meta["world_size"])
            ranks = sorted(k[len("rank_state.rank"):].split(".")[0]
                           for k in metadata.state_dict_metadata if k.startswith("rank_state.rank"))
            # saved reservoir sizes: a rank's share of the sample depends on the world size
            sizes = {k: list(v.size) for k, v in metadata.state_dict_metadata.items()
                     if k.startswith("rank_state.rank") and k.endswith(".ids")
                     and isinstance(v, TensorStorageMetadata)}
            candidates.append({"path": path, "step": step, "meta": meta, "progress": progress,
                               "old_world": old_world, "saved_ranks": sorted(set(map(int, ranks))),
                               "reservoir_sizes": sizes})
        return {"fresh": False, "notes": notes, "candidates": candidates, "problems": problems}

    def load(self, model: nn.Module, optimizer: Optional[Any] = None) -> Optional[Resumed]:
        """Restore the newest usable checkpoint into ``model`` / ``optimizer`` (collective).

        Returns None (and logs it) if ``directory`` holds no checkpoint yet; raises
        :class:`CheckpointError` if checkpoints exist but none can be used."""
        if optimizer is not None and hasattr(optimizer, "init_state"):
            optimizer.init_state()  # create the state tensors DCP loads into
        template = self._state(model, optimizer)
        expected = self._expected_shapes(template)
        plan = _broadcast(self._plan(expected) if _rank() == 0 else None)
        for note in plan["notes"]:
            self.log(note)
        if plan.get("fatal"):
            cls = {c.__name__: c for c in (CheckpointMismatchError, CheckpointReshardError)}
            raise cls[plan["fatal"][0]](plan["fatal"][1])
        if plan["fresh"]:
            self.log(f"no checkpoint in {self.directory} yet: starting fresh")
            return None
        problems = list(plan["problems"])
        for cand in plan["candidates"]:
            resumed = self._try_load(cand, model, optimizer, problems)
            if resumed is not None:
                return resumed
        raise CheckpointError(
            f"no usable checkpoint in {self.directory}: " + " | ".join(problems) +
            ". Fix: restore the damaged files, or move these directories aside (or use a new "
            "--checkpoint-dir) to start a fresh run; training does not silently start over "
            "while checkpoints exist.")

    def _try_load(self, cand: Dict[str, Any], model: nn.Module, optimizer: Optional[Any],
                  problems: List[str]) -> Optional[Resumed]:
        path, old_world, new_world, rank = cand["path"], cand["old_world"], _world(), _rank()
        state = self._state(model, optimizer)
        mine = state["rank_state"].pop(f"rank{rank}")
        sources = [j for j in cand["saved_ranks"] if j % new_world == rank]
        for j in sources:  # templates DCP loads the saved per-rank state into
            state["rank_state"][f"rank{j}"] = template = (_rank_state(model) if j != rank
                                                          else mine)
            for name, res in template.get("reservoirs", {}).items():  # at the saved sizes
                size = cand.get("reservoir_sizes", {}).get(f"rank_state.rank{j}.reservoirs.{name}.ids")
                if size is not None and list(res["ids"].shape) != size:
                    res["ids"] = res["ids"].new_zeros(size)
        if not state["rank_state"]:
            del state["rank_state"]
        error = None
        try:
            dcp.load(state, checkpoint_id=path)
        except Exception as e:  # noqa: BLE001 - DCP wraps per-rank failures
            error = f"checkpoint {path} could not be read: {type(e).__name__}: {e}"
        if not _all_ok(error is None):
            problems.append(error or f"checkpoint {path} could not be read on another rank")
            self.log(f"{problems[-1]}; falling back to the previous complete checkpoint")
            return None
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optim"])
        saved = [state["rank_state"][f"rank{j}"] for j in sources]
        if rank in sources:
            _restore_rng(state["rank_state"][f"rank{rank}"])
        seed = int(cand["step"]) * 1_000_003 + rank
        for name, table in cce_tables(model).items():
            _restore_reservoir(table, [s["reservoirs"][name] for s in saved if name in
                                       s.get("reservoirs", {})], seed)
        if old_world != new_world:
            self.log(f"checkpoint {path} was written by {old_world} ranks, resuming on "
                     f"{new_world}: model and optimizer resharded by DCP; re-clustering samples "
                     f"merged per rank, RNG states of missing ranks kept as seeded")
        self.log(f"resumed from {path} (step {cand['step']})")
        return Resumed(path=path, step=int(cand["progress"].get("step", cand["step"])),
                       progress=cand["progress"], world_size=old_world, meta=cand["meta"])
