"""From a trained (sharded or unsharded) model to a served TorchScript file, with TorchRec's tools.

The path, step by step (:func:`export_for_inference` does 2-4)::

    # 1. sharded training -> an unsharded model (any process, no process group needed)
    dcp.save(dmp.state_dict(), checkpoint_id=path)     # on every rank (or CheckpointManager.save)
    model = build_model(device="cpu")                   # the same tables and compression
    load_unsharded(model, path)                         # DCP reshards into plain tensors
    # 2. INT8 codebooks: every CCEEmbeddingBagCollection's codebook EBC becomes TorchRec's
    #    quantised EBC (serving.quantize_codebooks; error bound: serving.row_error_bound)
    # 3. torchrec.fx.symbolic_trace(model)   4. torch.jit.script(graph)
    scripted = export_for_inference(model, dtype=torch.int8)
    torch.jit.save(scripted, "model.pt")
    # serving process: import torchrec_cce first (it registers the remap op the graph calls)
    import torchrec_cce; served = torch.jit.load("model.pt")
    # or torch.export: export_program(model, (kjt,)) -> torch.export.save; load_program

Step 1 works because the sharded collection's state dict has the unsharded one's keys (its
codebooks, CCE assignments split by id range, MEmCom per-id weights are ``ShardedTensor``s of
the logical shapes), so ``torch.distributed.checkpoint`` reshards them to one process. A
:class:`~torchrec_cce.checkpoint.CheckpointManager` directory (or one of its ``step_<N>``
checkpoints) loads the same way.

What cannot be exported: MPE tables (no codebook to quantise: they serve at their learned
widths through :mod:`torchrec_cce.mpe`'s export; the fx graph keeps their lookup as a Python
call, which TorchScript cannot compile, and ``torch.export`` meets its data-dependent stage
branches); ``dtype=None`` exports float codebooks. INT4
(``torch.quint4x2``) needs codebooks whose column count is a multiple of 4
(:func:`torchrec_cce.serving.quantize_codebooks` says which).
"""

import copy
import os
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed.checkpoint as dcp
import torchrec.fx
from torch import nn
from torchrec import KeyedJaggedTensor
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from torchrec_cce.checkpoint import MARKER, CheckpointManager
from torchrec_cce.api import iter_collections
from torchrec_cce.methods import MPETable
from torchrec_cce.modules import CCEEmbeddingBagCollection
from torchrec_cce.serving import quantize_codebooks


def _checkpoint_of(path: str) -> tuple:
    """``(DCP directory, state key)``: a CheckpointManager directory's newest complete
    checkpoint or a ``step_<N>`` checkpoint (model under ``"model"``), else a plain DCP
    directory of a model state dict."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_unsharded: {path} is not a directory; pass the directory "
                                f"dcp.save or CheckpointManager wrote")
    if os.path.exists(os.path.join(path, MARKER)):
        return path, "model"
    manager = CheckpointManager(path)
    if manager.checkpoints():
        latest = manager.latest()
        if latest is None:
            raise FileNotFoundError(f"load_unsharded: {path} holds no complete checkpoint "
                                    f"(every step_<N> lacks its '{MARKER}' marker)")
        return latest, "model"
    if not os.path.exists(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"load_unsharded: {path} is neither a DCP checkpoint (no "
                                f".metadata) nor a CheckpointManager directory")
    return path, None


def _check_unsharded(model: nn.Module, what: str) -> None:
    for name, module in iter_collections(model):
        if not isinstance(module, CCEEmbeddingBagCollection):
            raise TypeError(f"{what}: '{name}' is a sharded collection "
                            f"({type(module).__name__}); build the model unsharded (no "
                            f"DistributedModelParallel) and load the trained state into it with "
                            f"torchrec_cce.export.load_unsharded")


def _check_fits(state: Dict[str, torch.Tensor], directory: str, key: Optional[str]) -> None:
    """Every tensor of ``state`` is in the checkpoint at the same global shape, else a
    ``ValueError`` naming the keys (before DCP reads anything)."""
    saved = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    missing, shapes = [], []
    for name, value in state.items():
        entry = saved.get(f"{key}.{name}" if key else name)
        if entry is None:
            missing.append(name)
        elif isinstance(entry, TensorStorageMetadata) and tuple(entry.size) != tuple(value.shape):
            shapes.append(f"{name}: saved {tuple(entry.size)}, model {tuple(value.shape)}")
    if missing or shapes:
        raise ValueError(
            f"load_unsharded: {directory} does not fit this model (build it with the trained "
            f"model's tables and compression): missing {missing[:5]}, other shapes {shapes[:5]}")


def load_unsharded(model: nn.Module, path: str) -> nn.Module:
    """Load a checkpoint of a (sharded or unsharded) trained model into ``model``, an
    unsharded model with the same tables and compression, in this process (no process group
    needed). ``path``: a DCP directory of ``model.state_dict()`` (``dcp.save``), a
    :class:`~torchrec_cce.checkpoint.CheckpointManager` directory (its newest complete
    checkpoint) or one ``step_<N>`` checkpoint. Returns ``model``."""
    _check_unsharded(model, "load_unsharded")
    directory, key = _checkpoint_of(path)
    state = model.state_dict()
    _check_fits(state, directory, key)
    dcp.load({key: state} if key else state, checkpoint_id=directory)
    model.load_state_dict(state)
    return model


def quantize_model(model: nn.Module, dtype: torch.dtype = torch.int8,
                   inplace: bool = False) -> nn.Module:
    """``model`` with every ``CCEEmbeddingBagCollection`` in it quantised for serving
    (:func:`torchrec_cce.serving.quantize_codebooks`); a copy unless ``inplace``."""
    _check_unsharded(model, "quantize_model")
    out = model if inplace else copy.deepcopy(model)
    found = False
    for _, module in list(iter_collections(out)):
        quantize_codebooks(module, dtype, inplace=True)
        found = True
    if not found:
        raise ValueError("quantize_model: the model holds no CCEEmbeddingBagCollection")
    return out.eval()


def _servable_copy(model: nn.Module, dtype: Optional[torch.dtype], what: str) -> nn.Module:
    """An eval-mode copy of ``model`` with codebooks quantised to ``dtype`` (None: float);
    refuses sharded collections and MPE tables (see the module docstring)."""
    _check_unsharded(model, what)
    for path, collection in iter_collections(model):
        for name, method in collection.tables.items():
            if isinstance(method, MPETable):
                raise ValueError(
                    f"{what}: table '{name}' of '{path}' is an MPE table: it has no codebook "
                    f"to quantise and its lookup is not traceable for serving; serve it with "
                    f"torchrec_cce.mpe's export (save_mpe / install_serving_tables)")
    return quantize_model(model, dtype) if dtype is not None else copy.deepcopy(model).eval()


def export_for_inference(model: nn.Module, dtype: Optional[torch.dtype] = torch.int8
                         ) -> torch.jit.ScriptModule:
    """TorchScript of an unsharded trained ``model`` for serving: codebooks quantised to
    ``dtype`` (``torch.int8``, ``torch.quint4x2``; None keeps them float), traced with
    ``torchrec.fx.symbolic_trace`` and compiled with ``torch.jit.script``. ``model`` itself is
    not changed. Save with ``torch.jit.save``; load with ``torch.jit.load`` after ``import
    torchrec_cce``. Outputs equal the eager quantised model's (up to fp32 summation order),
    within :func:`torchrec_cce.serving.row_error_bound` of the float model's."""
    served = _servable_copy(model, dtype, "export_for_inference")
    return torch.jit.script(torchrec.fx.symbolic_trace(served))


def export_program(model: nn.Module, example_inputs: Tuple[Any, ...],
                   dtype: Optional[torch.dtype] = torch.int8) -> torch.export.ExportedProgram:
    """The ``torch.export`` alternative to :func:`export_for_inference`: the quantised copy of
    ``model`` exported (non-strict) with ``example_inputs`` (e.g. ``(kjt,)``; batch size and
    id counts are specialised to the example's, as TorchRec's own KJT export does unless given
    dynamic shapes). Save with ``torch.export.save``; load with :func:`load_program`; call
    ``.module()``."""
    served = _servable_copy(model, dtype, "export_program")
    return torch.export.export(served, tuple(example_inputs), strict=False)


def load_program(path: str) -> torch.export.ExportedProgram:
    """``torch.export.load`` of a file :func:`export_program`'s program was saved to, with
    TorchRec's ``KeyedJaggedTensor`` (its stored example input) allowed by the weights-only
    unpickler (torch refuses unknown classes there)."""
    with torch.serialization.safe_globals([KeyedJaggedTensor]):
        return torch.export.load(path)


__all__ = ["export_for_inference", "export_program", "load_program", "load_unsharded",
           "quantize_model"]
