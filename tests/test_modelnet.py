"""lucidops.data.ModelNet40 on tiny files in PointNet's ply_hdf5_2048 layout."""

import builtins
import warnings

import numpy as np
import pytest
import torch

h5py = pytest.importorskip("h5py")

from lucidops.data import ModelNet40  # noqa: E402

CLASSES = ["airplane", "bathtub", "bed"]


def _write(root, name, data, label):
    with h5py.File(root / name, "w") as f:
        f.create_dataset("data", data=data.astype(np.float32))
        f.create_dataset("label", data=label.astype(np.uint8).reshape(-1, 1))


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    train = [rng.uniform(-1, 1, (4, 16, 3)), rng.uniform(-1, 1, (3, 16, 3))]
    test = rng.uniform(-1, 1, (2, 16, 3))
    _write(tmp_path, "ply_data_train0.h5", train[0], np.array([0, 1, 2, 0]))
    _write(tmp_path, "ply_data_train1.h5", train[1], np.array([2, 2, 1]))
    _write(tmp_path, "ply_data_test0.h5", test, np.array([1, 0]))
    (tmp_path / "shape_names.txt").write_text("\n".join(CLASSES) + "\n")
    # The original lists carry a directory prefix: only the file name counts.
    (tmp_path / "train_files.txt").write_text(
        "data/modelnet40_ply_hdf5_2048/ply_data_train0.h5\ndata/modelnet40_ply_hdf5_2048/ply_data_train1.h5\n")
    (tmp_path / "test_files.txt").write_text("data/modelnet40_ply_hdf5_2048/ply_data_test0.h5\n")
    return tmp_path, np.concatenate(train).astype(np.float32), test.astype(np.float32)


def test_reads_both_splits(folder):
    root, train, test = folder
    ds = ModelNet40(root, "train", num_points=10)
    assert len(ds) == 7 and ds.classes == CLASSES and ds.num_classes == 3 and ds.stored_points == 16
    pts, label = ds[5]
    assert pts.shape == (10, 3) and pts.dtype == torch.float32 and label.dtype == torch.int64
    np.testing.assert_array_equal(pts.numpy(), train[5, :10])
    assert [int(ds[i][1]) for i in range(7)] == [0, 1, 2, 0, 2, 2, 1]
    assert torch.equal(ds[-1][0], ds[6][0])
    te = ModelNet40(str(root), "test", num_points=None)
    assert len(te) == 2 and te[0][0].shape == (16, 3) and int(te[0][1]) == 1
    np.testing.assert_array_equal(te[1][0].numpy(), test[1])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch[0].shape == (4, 10, 3) and batch[1].shape == (4,)
    with pytest.raises(IndexError):
        ds[7]


def test_augmentation_rotates_about_y_and_jitters(folder):
    root, train, _ = folder
    rot = ModelNet40(root, "train", num_points=16, augment=True, jitter=0.0, seed=1)
    pts = rot[2][0].double().numpy()
    orig = train[2].astype(np.float64)
    # A rotation about y keeps y and each point's distance to the y axis, but moves the points.
    np.testing.assert_allclose(pts[:, 1], orig[:, 1], atol=1e-6)
    np.testing.assert_allclose(np.hypot(pts[:, 0], pts[:, 2]), np.hypot(orig[:, 0], orig[:, 2]), atol=1e-5)
    assert np.abs(pts - orig).max() > 1e-3
    # Deterministic per (seed, epoch, index); a new epoch draws a new rotation.
    assert torch.equal(rot[2][0], rot[2][0])
    rot.set_epoch(1)
    assert not torch.equal(rot[2][0], torch.from_numpy(pts.astype(np.float32)))
    jit = ModelNet40(root, "train", num_points=16, augment=True, jitter=0.01, jitter_clip=0.02, seed=1)
    diff = jit[2][0].double().numpy() - pts  # same rotation (same seed, epoch 0), plus the jitter
    assert 0 < np.abs(diff).max() <= 0.02 + 1e-6


def test_missing_files_and_bad_arguments(folder, tmp_path_factory):
    root, _, _ = folder
    with pytest.raises(FileNotFoundError, match="never downloads"):
        ModelNet40(root / "nowhere")
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match="shape_names.txt"):
        ModelNet40(empty)
    (root / "ply_data_test0.h5").unlink()
    with pytest.raises(FileNotFoundError, match="ply_data_test0.h5"):
        ModelNet40(root, "test")
    with pytest.raises(ValueError, match="split"):
        ModelNet40(root, "val")
    with pytest.raises(ValueError, match="num_points"):
        ModelNet40(root, num_points=0)
    with pytest.raises(ValueError, match="num_points"):
        ModelNet40(root, num_points=17)
    with pytest.raises(ValueError, match="jitter"):
        ModelNet40(root, jitter=-1.0)
    with pytest.raises(TypeError, match="root"):
        ModelNet40(3)
    with pytest.raises(ValueError, match="seed"):  # numpy's generators would fail on every item
        ModelNet40(root, "train", num_points=16, seed=-1)
    with pytest.raises(ValueError, match="epoch"):
        ModelNet40(root, "train", num_points=16).set_epoch(-1)


def test_bad_contents(tmp_path):
    (tmp_path / "shape_names.txt").write_text("a\nb\n")
    (tmp_path / "train_files.txt").write_text("x.h5\n")
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("data", data=np.zeros((2, 4, 3), np.float32))
        f.create_dataset("label", data=np.array([[0], [5]], np.uint8))
    with pytest.raises(ValueError, match="labels"):
        ModelNet40(tmp_path, num_points=4)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("data", data=np.zeros((2, 4, 3), np.float32))
    with pytest.raises(ValueError, match="'label'"):
        ModelNet40(tmp_path, num_points=4)
    # Loaded silently before: float labels truncated to classes, NaN coordinates.
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("data", data=np.zeros((2, 4, 3), np.float32))
        f.create_dataset("label", data=np.array([[0.7], [1.2]], np.float32))
    with pytest.raises(ValueError, match="integer class ids"):
        ModelNet40(tmp_path, num_points=4)
    data = np.zeros((2, 4, 3), np.float32)
    data[1, 2, 0] = np.nan
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("data", data=data)
        f.create_dataset("label", data=np.array([[0.0], [1.0]], np.float32))  # whole floats are class ids
    with pytest.raises(ValueError, match="non-finite coordinates in 1 cloud"):
        ModelNet40(tmp_path, num_points=4)
    data[1, 2, 0] = 0.0
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("data", data=data)
        f.create_dataset("label", data=np.array([[0.0], [1.0]], np.float32))
    loaded = ModelNet40(tmp_path, num_points=4)
    assert loaded[np.int64(1)][1].item() == 1 and loaded[torch.tensor(1)][1].item() == 1
    assert torch.utils.data.Subset(loaded, torch.arange(2))[1][1].item() == 1
    for bad in (slice(0, 2), 1.0, True):
        with pytest.raises(TypeError, match="index must be an integer"):
            loaded[bad]


def test_clear_import_error_without_h5py(folder, monkeypatch):
    root, _, _ = folder
    real_import = builtins.__import__

    def no_h5py(name, *args, **kwargs):
        if name == "h5py":
            raise ImportError("No module named 'h5py'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_h5py)
    with pytest.raises(ImportError, match=r"lucidops\[data\]"):
        ModelNet40(root)


@pytest.mark.parametrize("content", [b"", b"not an HDF5 file\n" * 8, "truncated"])
def test_unreadable_h5_file_is_a_value_error_naming_it(tmp_path, content):
    # h5py's OSError ("file signature not found") named no file: the demo printed a traceback.
    (tmp_path / "shape_names.txt").write_text("a\nb\n")
    (tmp_path / "train_files.txt").write_text("x.h5\n")
    path = tmp_path / "x.h5"
    if content == "truncated":
        _write(tmp_path, "x.h5", np.zeros((64, 16, 3)), np.zeros(64))
        content = path.read_bytes()[:1024]
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"x\.h5' is not a readable HDF5 file \(.+\)") as exc:
        ModelNet40(tmp_path, num_points=4)
    assert str(path) in str(exc.value) and isinstance(exc.value.__cause__, OSError)


def test_index_errors_name_the_index_given(folder):
    ds = ModelNet40(folder[0], "train", num_points=4)  # 7 clouds
    for bad in (7, -8):  # -8 used to be reported as index -1
        with pytest.raises(IndexError, match=rf"index {bad} out of range for 7 clouds"):
            ds[bad]
    for bad in (torch.tensor(1.5), torch.tensor([1, 2]), torch.tensor(True)):
        with pytest.raises(TypeError, match="index must be an integer"):
            ds[bad]
    assert torch.equal(ds[torch.tensor([6])][0], ds[-1][0])


def _one_file_folder(root, write, names="a\nb\nc\n"):
    """A train split of one file x.h5 written by ``write(h5file)``; -> its path."""
    (root / "shape_names.txt").write_text(names)
    (root / "train_files.txt").write_text("x.h5\n")
    with h5py.File(root / "x.h5", "w") as f:
        write(f)
    return root / "x.h5"


def _points(f, m=2):
    f.create_dataset("data", data=np.zeros((m, 4, 3), np.float32))


def _labels(f, m=2):
    f.create_dataset("label", data=np.zeros((m, 1), np.uint8))


# Each raised a raw h5py/numpy TypeError or ValueError naming neither the file nor the key.
@pytest.mark.parametrize("write, message", [
    (lambda f: (f.create_group("data"), _labels(f)), r"'data' must be a dataset, got an HDF5 group"),
    (lambda f: (_points(f), f.create_group("label")), r"'label' must be a dataset, got an HDF5 group"),
    (lambda f: (f.create_dataset("data", data=3.0), _labels(f)), r"'data' must be an array, got a scalar dataset"),
    (lambda f: (_points(f, 1), f.create_dataset("label", data=3)), r"'label' must be an array, got a scalar"),
    (lambda f: (f.create_dataset("data", data=h5py.Empty("f4")), _labels(f)), r"'data' must be an array, got an? "),
    (lambda f: (f.create_dataset("data", data=np.zeros((2, 4, 3), [("x", "f4"), ("y", "f4")])), _labels(f)),
     r"'data' must hold real coordinates \(float or integer\), got dtype \[\('x'"),
    (lambda f: (f.create_dataset("data", data=np.array([b"x", b"y"])), _labels(f)),
     r"'data' must hold real coordinates \(float or integer\), got dtype \|S1"),
], ids=["data-group", "label-group", "data-scalar", "label-scalar", "data-null", "data-compound", "data-strings"])
def test_malformed_datasets_are_value_errors_naming_file_and_key(tmp_path, write, message):
    path = _one_file_folder(tmp_path, write)
    with pytest.raises(ValueError, match=message) as exc:
        ModelNet40(tmp_path, num_points=4)
    assert str(exc.value).startswith(f"{str(path)!r}: ")


def test_integer_data_is_still_read_as_float32(tmp_path):
    _one_file_folder(tmp_path, lambda f: (f.create_dataset("data", data=np.ones((2, 4, 3), np.int32)), _labels(f)))
    pts, _ = ModelNet40(tmp_path, num_points=4)[1]
    assert pts.dtype == torch.float32 and torch.equal(pts, torch.ones(4, 3))


def test_out_of_range_labels_name_their_file(folder):
    # The range was checked after the files were merged, so the error named none of them.
    root, train, _ = folder
    _write(root, "ply_data_train1.h5", train[4:], np.array([2, 3, 1]))  # 3 classes
    with pytest.raises(ValueError, match=r"ply_data_train1\.h5': labels must lie in \[0, 3\) .*got \[1, 3\]"):
        ModelNet40(root, num_points=4)
    with h5py.File(root / "ply_data_train0.h5", "w") as f:
        f.create_dataset("data", data=train[:2])
        f.create_dataset("label", data=np.array([[-1], [0]], np.int8))
    with pytest.raises(ValueError, match=r"ply_data_train0\.h5': labels must lie in \[0, 3\) .*got \[-1, 0\]"):
        ModelNet40(root, num_points=4)


@pytest.mark.parametrize("value, shown", [(1e30, r"1e\+30"), (np.inf, "inf"), (-1e30, r"-1e\+30")])
def test_huge_float_labels_are_range_checked_before_the_int64_cast(tmp_path, value, shown):
    # 1e30 passed the whole-number check, wrapped to -2**63 in the cast (RuntimeWarning) and was shown as that.
    def write(f):
        _points(f, 1)
        f.create_dataset("label", data=np.array([[value]]))

    path = _one_file_folder(tmp_path, write)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "invalid value encountered in cast"
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, 3\) .*got \[{shown}, {shown}\]") as exc:
            ModelNet40(tmp_path, num_points=4)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("name", ["shape_names.txt", "train_files.txt"])
def test_binary_text_file_is_a_value_error_naming_it(tmp_path, name):
    _one_file_folder(tmp_path, lambda f: (_points(f), _labels(f)))
    (tmp_path / name).write_bytes(b"\xff\xfe\x00abc\n")
    with pytest.raises(ValueError, match=r"is not a UTF-8 text file") as exc:
        ModelNet40(tmp_path, num_points=4)
    assert repr(str(tmp_path / name)) in str(exc.value)


def test_text_files_are_utf8_whatever_the_locale(tmp_path):
    # Read with an explicit encoding: a UTF-8 class name (and a BOM an editor may add) under any locale.
    _one_file_folder(tmp_path, lambda f: (_points(f), _labels(f)))
    (tmp_path / "shape_names.txt").write_bytes("\ufeffcafé\nb\n".encode("utf-8"))
    assert ModelNet40(tmp_path, num_points=4).classes == ["café", "b"]


def test_label_table_of_another_shape_is_refused(tmp_path):
    # a (3, 2) label table for 6 clouds was flattened and paired in that order, silently
    (tmp_path / "shape_names.txt").write_text("a\nb\n")
    (tmp_path / "train_files.txt").write_text("x.h5\n")
    for labels, ok in ((np.zeros((6, 1), np.uint8), True), (np.zeros(6, np.uint8), True),
                       (np.zeros((3, 2), np.uint8), False), (np.zeros((6, 1, 1), np.uint8), False)):
        with h5py.File(tmp_path / "x.h5", "w") as f:
            f.create_dataset("data", data=np.zeros((6, 4, 3), np.float32))
            f.create_dataset("label", data=labels)
        if ok:
            assert len(ModelNet40(tmp_path, num_points=4)) == 6
        else:
            with pytest.raises(ValueError, match=r"'label' must have shape \(M, 1\) or \(M,\)"):
                ModelNet40(tmp_path, num_points=4)


def test_set_epoch_reaches_persistent_workers(folder):
    """The epoch was a plain attribute: a persistent worker kept its copy, so every epoch
    repeated epoch 0's augmentation and no longer matched ds[i] read in this process."""
    root, _, _ = folder
    ds = ModelNet40(root, "train", num_points=16, augment=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=7, num_workers=1, persistent_workers=True)
    for epoch in (0, 1, 2):
        if epoch == 2:
            ds.epoch = epoch  # an attribute before it lived in shared memory: still assignable
        else:
            ds.set_epoch(epoch)
        assert ds.epoch == epoch
        batch = next(iter(loader))[0]
        assert torch.equal(batch, torch.stack([ds[i][0] for i in range(7)])), epoch
    assert not torch.equal(batch, torch.stack([ModelNet40(root, "train", num_points=16, augment=True)[i][0]
                                                for i in range(7)]))
