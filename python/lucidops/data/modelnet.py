"""ModelNet40 in PointNet's ``modelnet40_ply_hdf5_2048`` layout (never downloaded).

The folder holds ``ply_data_train0.h5``, ... and ``ply_data_test0.h5``, ..., each with a
dataset ``data`` (M, 2048, 3) float32 and ``label`` (M, 1) uint8; ``shape_names.txt``
(one class name per line, label order); and ``train_files.txt`` / ``test_files.txt``
listing the split's h5 files, one per line. The lists in the original archive hold paths
like ``data/modelnet40_ply_hdf5_2048/ply_data_train0.h5``: only the file name is used,
looked up in the folder. h5py is needed (``pip install lucidops[data]``).
"""

from __future__ import annotations

import math
import os
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .. import _validate

SPLITS = ("train", "test")


def _h5py():
    try:
        import h5py
    except ImportError as err:
        raise ImportError("ModelNet40 needs h5py to read its HDF5 files: pip install lucidops[data] "
                          "(or pip install h5py)") from err
    return h5py


def _read_array(h5py, f, key: str, path: str) -> np.ndarray:
    """Dataset ``key`` of the open file ``f`` as an array, with errors naming file and key: h5py's own
    ("Accessing a group is done with bytes or str", "Illegal slicing argument for scalar dataspace") name neither."""
    obj = f[key]
    if not isinstance(obj, h5py.Dataset):
        raise ValueError(f"{path!r}: {key!r} must be a dataset, got an HDF5 {type(obj).__name__.lower()}")
    if not obj.shape:  # () for a scalar dataspace, None for an empty (null) one
        kind = "scalar" if obj.shape == () else "empty (null dataspace)"
        raise ValueError(f"{path!r}: {key!r} must be an array, got a {kind} dataset")
    return np.asarray(obj[()])


class ModelNet40(Dataset):
    """ModelNet40 clouds from PointNet's HDF5 files: item ``i`` is (points (num_points, 3) float32, label int64 ()).

    Args:
        root: the ``modelnet40_ply_hdf5_2048`` folder.
        split: "train" or "test".
        num_points: points per cloud (the first ``num_points`` of the 2048 stored, as
            PointNet does; at most the stored count); None keeps them all.
        augment: training augmentation: a random rotation about the up (y) axis, then
            Gaussian jitter of std ``jitter`` clipped to +-``jitter_clip`` (PointNet's).
        jitter, jitter_clip: the jitter's standard deviation and clip.
        seed: seeds the augmentation; item ``i`` of epoch ``e`` (see :meth:`set_epoch`)
            uses its own generator seeded by (seed, e, i), so augmentation does not depend on
            the access order or the worker split.

    The whole split is read into memory at construction (ModelNet40 is ~420 MB as float32).
    """

    def __init__(self, root: str, split: str = "train", num_points: Optional[int] = 1024, augment: bool = False,
                 jitter: float = 0.01, jitter_clip: float = 0.05, seed: int = 0):
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a path, got {type(root).__name__}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if num_points is not None:
            _validate.integer(num_points, "num_points", minimum=1)
        for name, value in (("jitter", jitter), ("jitter_clip", jitter_clip)):
            _validate.real_number(value, name, ">= 0")
        _validate.boolean(augment, "augment")
        _validate.integer(seed, "seed", minimum=0)  # numpy's generators take no negative seed
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"ModelNet40 folder {root!r} does not exist (lucidops never downloads it: "
                                    "get modelnet40_ply_hdf5_2048 and pass its folder)")
        self.root = root
        self.split = split
        self.augment = augment
        self.jitter = float(jitter)
        self.jitter_clip = float(jitter_clip)
        self.seed = seed
        # In shared memory: DataLoader workers (persistent ones too) see set_epoch's value; a plain
        # attribute stayed at its value in each worker's copy, repeating epoch 0's augmentation.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.classes = self._read_lines("shape_names.txt")
        files = [os.path.basename(line) for line in self._read_lines(f"{split}_files.txt")]
        if not files:
            raise ValueError(f"{os.path.join(root, split + '_files.txt')} lists no h5 file")
        h5py = _h5py()
        data, labels = [], []
        for name in files:
            path = os.path.join(root, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{split}_files.txt lists {name!r} but {path!r} does not exist")
            # h5py's OSError ("file signature not found") names no file: say which one.
            try:
                with h5py.File(path, "r") as f:
                    missing = [key for key in ("data", "label") if key not in f]
                    if not missing:
                        raw_data = _read_array(h5py, f, "data", path)
                        raw_labels = _read_array(h5py, f, "label", path)
            except OSError as err:
                raise ValueError(f"{path!r} is not a readable HDF5 file ({err})") from err
            if missing:
                raise ValueError(f"{path!r} has no dataset {missing[0]!r} (expected 'data' and 'label')")
            # Checked before the cast: strings or a compound dtype fail in numpy with no file or key named.
            if not (np.issubdtype(raw_data.dtype, np.integer) or np.issubdtype(raw_data.dtype, np.floating)):
                raise ValueError(f"{path!r}: 'data' must hold real coordinates (float or integer), "
                                 f"got dtype {raw_data.dtype}")
            d = raw_data.astype(np.float32, copy=False)
            # (M, 1) as PointNet writes it, or (M,): a (3, 2) table for 6 clouds was flattened and paired silently.
            if raw_labels.ndim not in (1, 2) or (raw_labels.ndim == 2 and raw_labels.shape[1] != 1):
                raise ValueError(f"{path!r}: 'label' must have shape (M, 1) or (M,), got {raw_labels.shape}")
            raw_labels = raw_labels.reshape(-1)
            # Integer class ids only: a float label (0.7) would be truncated to a class silently.
            if not (np.issubdtype(raw_labels.dtype, np.integer)
                    or (np.issubdtype(raw_labels.dtype, np.floating) and np.all(raw_labels == np.round(raw_labels)))):
                raise ValueError(f"{path!r}: 'label' must hold integer class ids, got {raw_labels.dtype} values "
                                 f"such as {raw_labels[:3].tolist()}")
            # Per file, so the error names it, and before the int64 cast: a float label such as 1e30 or
            # inf would wrap to -2**63 (with a RuntimeWarning) and be reported as that.
            if raw_labels.size and (raw_labels.min() < 0 or raw_labels.max() >= len(self.classes)):
                raise ValueError(f"{path!r}: labels must lie in [0, {len(self.classes)}) (shape_names.txt has "
                                 f"{len(self.classes)} classes), got [{raw_labels.min()}, {raw_labels.max()}]")
            lab = raw_labels.astype(np.int64)
            if d.ndim != 3 or d.shape[2] != 3:
                raise ValueError(f"{path!r}: 'data' must have shape (M, P, 3), got {d.shape}")
            if not np.isfinite(d).all():
                bad = int((~np.isfinite(d)).any(axis=(1, 2)).sum())
                raise ValueError(f"{path!r}: 'data' holds non-finite coordinates in {bad} cloud(s)")
            if lab.shape[0] != d.shape[0]:
                raise ValueError(f"{path!r}: {d.shape[0]} clouds but {lab.shape[0]} labels")
            data.append(d)
            labels.append(lab)
        stored = {d.shape[1] for d in data}
        if len(stored) != 1:
            raise ValueError(f"the {split} files store different point counts per cloud: {sorted(stored)}")
        self.stored_points = stored.pop()
        if num_points is not None and num_points > self.stored_points:
            raise ValueError(f"num_points={num_points} but the files store {self.stored_points} points per cloud")
        self.num_points = self.stored_points if num_points is None else num_points
        self.data = np.concatenate(data)
        self.labels = np.concatenate(labels)

    def _read_lines(self, name: str) -> List[str]:
        path = os.path.join(self.root, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ModelNet40 folder {self.root!r} has no {name} (expected PointNet's "
                                    "modelnet40_ply_hdf5_2048 layout)")
        # An explicit encoding (the locale's may not be UTF-8; "-sig" drops a BOM an editor may add), and a
        # binary file is a ValueError naming it: UnicodeDecodeError names no file.
        try:
            with open(path, encoding="utf-8-sig") as f:
                return [line.strip() for line in f if line.strip()]
        except UnicodeDecodeError as err:
            raise ValueError(f"{path!r} is not a UTF-8 text file ({err})") from err

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def epoch(self) -> int:
        """The epoch whose augmentations items are drawn from (see :meth:`set_epoch`)."""
        return int(self._epoch)

    @epoch.setter
    def epoch(self, epoch: int) -> None:  # ds.epoch = e, as before it lived in shared memory
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Draw fresh augmentations for a new epoch (>= 0); DataLoader workers already running
        (``persistent_workers=True``) see it too."""
        self._epoch.fill_(_validate.integer(epoch, "epoch", minimum=0))

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        index = _validate.dataset_index(index, len(self), "cloud")
        pts = self.data[index, : self.num_points].astype(np.float64)
        if self.augment:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            angle = rng.uniform(0, 2 * math.pi)
            c, s = math.cos(angle), math.sin(angle)
            rot = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])  # about the up (y) axis
            pts = pts @ rot.T
            if self.jitter > 0:
                pts = pts + np.clip(self.jitter * rng.standard_normal(pts.shape), -self.jitter_clip, self.jitter_clip)
        return torch.from_numpy(pts.astype(np.float32)), torch.tensor(int(self.labels[index]), dtype=torch.int64)


__all__ = ["ModelNet40", "SPLITS"]
