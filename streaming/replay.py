"""File replay: stream the frames of an HDF5 dataset or a NumPy ``.npy`` stack at a chosen rate.

What facilities do between beamtimes: re-run the live analysis on recorded data. ``.npy`` stacks
are memory-mapped (frames leave zero-copy from the page cache); HDF5 datasets are read frame by
frame with h5py. The same :class:`beamhub.streaming.source.SourceRunner` paces and sends them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from beamhub.streaming.params import ParamSet, ParamSpec
from beamhub.streaming.wire import ALLOWED_DTYPES

__all__ = ["REPLAY_PARAMS", "ReplayError", "ReplaySource"]

REPLAY_PARAMS = (
    ParamSpec(
        "rate_hz", "float", 10.0, "frames per second to replay", "Hz", min=0.1, max=1000.0, step=0.1
    ),
    ParamSpec("loop", "bool", False, "start again at the first frame after the last one"),
)
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs", ".cxi")


class ReplayError(ValueError):
    """A file that cannot be replayed; the message says what was found and what is needed."""


def _list_datasets(handle: Any) -> list[tuple[str, tuple[int, ...], str]]:
    import h5py

    found: list[tuple[str, tuple[int, ...], str]] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            found.append((f"/{name}", obj.shape, str(obj.dtype)))

    handle.visititems(visit)
    return found


class ReplaySource:
    """A frame generator over a 3-D stack ``(frames, y, x)`` in a file."""

    kind = "replay"

    def __init__(self, path: str | os.PathLike, dataset: str | None = None, **params: Any) -> None:
        self.path = Path(path)
        self.dataset = dataset
        self.params = ParamSet(REPLAY_PARAMS, params)
        self._h5 = None
        if not self.path.is_file():
            raise ReplayError(f"no such file: {self.path}")
        if self.path.suffix.lower() == ".npy":
            if dataset is not None:
                raise ReplayError(f"--dataset applies to HDF5 files only, not {self.path.name}")
            try:
                self._stack = np.load(self.path, mmap_mode="r", allow_pickle=False)
            except ValueError as exc:
                raise ReplayError(f"{self.path} is not a plain NumPy array: {exc}") from exc
            where = str(self.path)
        else:
            self._stack = self._open_hdf5()
            where = f"{self.path}:{self.dataset}"
        problem = None
        if self._stack.ndim != 3:
            problem = (
                f"{where} has shape {self._stack.shape} (ndim {self._stack.ndim}); replay "
                "needs a 3-D stack (frames, y, x)"
            )
        elif self._stack.shape[0] == 0:
            problem = f"{where} holds no frames"
        elif self._stack.dtype.str not in ALLOWED_DTYPES:
            problem = (
                f"{where} has dtype {self._stack.dtype}; the wire carries plain numeric dtypes only"
            )
        if problem is not None:
            self.close()
            raise ReplayError(problem)
        self.n_frames = int(self._stack.shape[0])
        self.index = 0
        self.loops = 0

    def _open_hdf5(self) -> Any:
        import h5py

        try:
            handle = h5py.File(self.path, "r")
        except OSError as exc:
            raise ReplayError(
                f"{self.path} is neither a .npy file nor a readable HDF5 file: {exc}"
            ) from exc
        self._h5 = handle
        if self.dataset is None:
            candidates = [d[0] for d in _list_datasets(handle) if len(d[1]) == 3]
            if len(candidates) != 1:
                self.close()
                raise ReplayError(
                    f"{self.path}: name the dataset with --dataset; 3-D datasets found: "
                    f"{', '.join(candidates) or 'none'}"
                )
            self.dataset = candidates[0]
        obj = handle.get(self.dataset)
        if obj is None or not isinstance(obj, h5py.Dataset):
            datasets = ", ".join(f"{n} {shape} {dt}" for n, shape, dt in _list_datasets(handle))
            self.close()
            raise ReplayError(
                f"dataset {self.dataset!r} not found in {self.path}; datasets present: "
                f"{datasets or 'none'}"
            )
        return obj

    def set_param(self, name: str, value: Any) -> Any:
        return self.params.set(name, value)

    def start_run(self) -> None:
        """A new run replays from the first frame."""
        self.index = 0
        self.loops = 0

    def generate(self) -> tuple[np.ndarray, dict[str, Any]]:
        if self.index >= self.n_frames:
            if not self.params["loop"]:
                raise StopIteration
            self.index = 0
            self.loops += 1
        i = self.index
        frame = self._stack[i]
        if self._h5 is None:
            frame = np.asarray(frame)  # a zero-copy view of the memory map
        self.index += 1
        meta = {
            "source": "replay",
            "file": self.path.name,
            "dataset": self.dataset,
            "index": i,
            "n_frames": self.n_frames,
            "loop": self.loops,
        }
        return frame, meta

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None
