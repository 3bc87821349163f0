"""An append-only temporary file of numpy arrays and string arrays (preprocessing's pass 1 ->
pass 2, so the input is parsed once). Read back with ``readinto`` into fresh buffers, not
memory-mapped, so the pages read do not stay in the process's RSS."""

import os
from typing import Tuple, Union

import numpy as np
import pyarrow as pa

Ref = Tuple  # what :meth:`Spill.put` returns and :meth:`Spill.get` takes


class Spill:
    """``put`` arrays while writing, then ``get`` them back by the returned references."""

    def __init__(self, path: str):
        self.path = path
        self._f = open(path, "w+b")
        self._end = 0

    def _put(self, a: np.ndarray) -> Ref:
        a = np.ascontiguousarray(a)
        ref = (self._end, a.dtype.str, a.shape)
        if a.nbytes:
            self._f.seek(self._end)
            self._f.write(memoryview(a).cast("B"))
            self._end += a.nbytes
        return ref

    def _get(self, ref: Ref) -> np.ndarray:
        offset, dtype, shape = ref
        out = np.empty(shape, dtype=np.dtype(dtype))
        if out.nbytes:
            self._f.seek(offset)
            if self._f.readinto(memoryview(out).cast("B")) != out.nbytes:
                raise OSError(f"{self.path}: temporary file truncated (disk full or removed?)")
        return out

    def put(self, a: Union[np.ndarray, pa.Array]) -> Ref:
        """Store a numpy array, or a pyarrow uint64 or string array."""
        if isinstance(a, np.ndarray):
            return ("np", self._put(a))
        if a.type == pa.uint64():
            return ("u64", self._put(a.to_numpy(zero_copy_only=False)))
        if a.type != pa.string():
            raise TypeError(f"Spill stores numpy, uint64 and string arrays, not {a.type}")
        bufs = a.buffers()
        offsets = np.frombuffer(bufs[1], dtype=np.int32, count=len(a) + 1, offset=a.offset * 4)
        data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
        data = data[offsets[0]: offsets[-1]]
        return ("str", self._put(offsets - offsets[0]), self._put(data))

    def get(self, ref: Ref) -> Union[np.ndarray, pa.Array]:
        """The array stored under ``ref`` (a fresh copy)."""
        if ref[0] == "np":
            return self._get(ref[1])
        if ref[0] == "u64":
            return pa.array(self._get(ref[1]))
        offsets, data = self._get(ref[1]), self._get(ref[2])
        return pa.StringArray.from_buffers(len(offsets) - 1, pa.py_buffer(offsets), pa.py_buffer(data))

    @property
    def nbytes(self) -> int:
        return self._end

    def close(self) -> None:
        """Close and delete the file."""
        if not self._f.closed:
            self._f.close()
        if os.path.exists(self.path):
            os.remove(self.path)
