"""lucidops.data.SyntheticShapes: determinism, balance, shapes, normalisation, errors."""

import numpy as np
import pytest
import torch

from lucidops.data import SHAPES, SyntheticShapes


def test_deterministic_by_seed_and_independent_of_access_order():
    a = SyntheticShapes(20, num_points=64, seed=3)
    b = SyntheticShapes(20, num_points=64, seed=3)
    for i in reversed(range(20)):
        pa, la = a[i]
        pb, lb = b[i]
        assert torch.equal(pa, pb) and torch.equal(la, lb)
    assert torch.equal(a[5][0], a[5][0])  # repeated access too


def test_different_seeds_differ():
    a = SyntheticShapes(10, num_points=64, seed=0)
    b = SyntheticShapes(10, num_points=64, seed=1)
    assert not torch.equal(torch.stack([a[i][0] for i in range(10)]), torch.stack([b[i][0] for i in range(10)]))
    assert not torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("num_classes", [10, len(SHAPES), 3])
def test_class_balance(num_classes):
    ds = SyntheticShapes(10 * num_classes + 3, num_points=8, num_classes=num_classes)
    counts = torch.bincount(ds.labels, minlength=num_classes)
    assert counts.numel() == num_classes and counts.max() - counts.min() <= 1
    assert torch.equal(torch.stack([ds[i][1] for i in range(len(ds))]), ds.labels)


def test_at_least_ten_classes():
    assert len(SHAPES) >= 10
    assert {"sphere", "cube", "cylinder", "cone", "torus", "pyramid"} <= set(SHAPES)


def test_shapes_dtypes_and_normalisation():
    ds = SyntheticShapes(24, num_points=128, num_classes=12, seed=5)
    for i in range(len(ds)):
        pts, label = ds[i]
        assert pts.shape == (128, 3) and pts.dtype == torch.float32 and label.dtype == torch.int64
        assert torch.isfinite(pts).all()
        assert pts.abs().max().item() == pytest.approx(1.0, abs=1e-6)
        # Bounding box centred at the origin.
        torch.testing.assert_close(pts.amax(0) + pts.amin(0), torch.zeros(3), atol=1e-5, rtol=0)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert batch[0].shape == (8, 128, 3) and batch[1].shape == (8,)


def test_unnormalised_scale_and_variable_point_count():
    ds = SyntheticShapes(30, num_points=(10, 40), rotation=None, jitter=0.0, normalize=False,
                         scale_range=(2.0, 2.0), num_classes=1)  # spheres stretched by 2 on every axis
    sizes = set()
    for i in range(len(ds)):
        pts, _ = ds[i]
        sizes.add(pts.shape[0])
        assert 10 <= pts.shape[0] <= 40
        torch.testing.assert_close(pts.norm(dim=1), torch.full((pts.shape[0],), 2.0), rtol=1e-6, atol=1e-6)
    assert len(sizes) > 1


def test_classes_are_distinguishable_by_a_simple_statistic():
    """Sorted distances to the centroid (rotation invariant) separate the classes well with a
    nearest-centroid rule: the shapes really differ."""
    train = SyntheticShapes(240, num_points=256, num_classes=10, seed=0, jitter=0.005, scale_range=(1.0, 1.0))
    test = SyntheticShapes(100, num_points=256, num_classes=10, seed=1, jitter=0.005, scale_range=(1.0, 1.0))

    def feature(pts):
        d = (pts - pts.mean(0)).norm(dim=1)
        return torch.quantile(d, torch.linspace(0, 1, 11))

    xs = torch.stack([feature(train[i][0]) for i in range(len(train))])
    centroids = torch.stack([xs[train.labels == c].mean(0) for c in range(10)])
    correct = sum(int(torch.cdist(feature(test[i][0])[None], centroids).argmin()) == int(test.labels[i])
                  for i in range(len(test)))
    assert correct / len(test) > 0.4  # chance is 0.1; this seed gives 0.63


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_samples"):
        SyntheticShapes(0)
    with pytest.raises(ValueError, match="num_points"):
        SyntheticShapes(4, num_points=0)
    with pytest.raises(ValueError, match="num_points"):
        SyntheticShapes(4, num_points=(5, 2))
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticShapes(4, num_classes=len(SHAPES) + 1)
    with pytest.raises(ValueError, match="seed"):
        SyntheticShapes(4, seed=-1)
    with pytest.raises(ValueError, match="rotation"):
        SyntheticShapes(4, rotation="xyz")
    with pytest.raises(ValueError, match="scale_range"):
        SyntheticShapes(4, scale_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="jitter"):
        SyntheticShapes(4, jitter=-0.1)
    ds = SyntheticShapes(4, num_points=8)
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(TypeError, match="index"):
        ds["a"]
    assert torch.equal(ds[-1][0], ds[3][0])


def test_argument_types_raise_type_error_naming_the_argument():
    # A wrong type is a TypeError, a wrong value a ValueError (these were all ValueError, and
    # a bare scale_range failed in len() without naming it).
    for num_points in (1.5, "64", None, (8, 16.0), ("8", 16)):
        with pytest.raises(TypeError, match="num_points"):
            SyntheticShapes(4, num_points=num_points)
    for scale_range in (("a", "b"), (0.5, None), 0.5, "ab"):
        with pytest.raises(TypeError, match="scale_range"):
            SyntheticShapes(4, scale_range=scale_range)
    for scale_range in ((0.5,), (0.5, 1.0, 2.0), (1.5, 0.5), (0.5, float("inf")), (-1.0, 1.0)):
        with pytest.raises(ValueError, match="scale_range"):
            SyntheticShapes(4, scale_range=scale_range)
    for num_points in ((8,), (0, 4), (8, 4)):
        with pytest.raises(ValueError, match="num_points"):
            SyntheticShapes(4, num_points=num_points)


def test_numpy_numbers_are_accepted_like_python_ones():
    ds = SyntheticShapes(4, num_points=np.int64(16), num_classes=np.int64(3), scale_range=np.array([0.5, 1.5]))
    assert ds[0][0].shape == (16, 3) and ds.num_points == 16 and type(ds.num_points) is int
    assert ds.scale_range == (0.5, 1.5)
    ranged = SyntheticShapes(4, num_points=(np.int32(8), np.int64(12)), scale_range=(np.float32(0.5), 1))
    assert ranged.num_points == (8, 12) and 8 <= ranged[1][0].shape[0] <= 12


def test_index_must_be_one_integer_and_errors_name_the_index_given():
    ds = SyntheticShapes(20, num_points=8)
    assert torch.equal(ds[torch.tensor(1)][0], ds[1][0]) and torch.equal(ds[np.int64(-1)][0], ds[19][0])
    assert torch.equal(torch.utils.data.Subset(ds, torch.arange(3))[2][0], ds[2][0])
    # A float tensor used to be truncated to item 1; a two-element one failed in int().
    for bad in (torch.tensor(1.7), torch.tensor([1, 2]), torch.tensor(True), 1.0, True, slice(0, 2)):
        with pytest.raises(TypeError, match="index must be an integer"):
            ds[bad]
    for bad in (20, -21):
        with pytest.raises(IndexError, match=rf"index {bad} out of range for 20 samples"):
            ds[bad]


def test_cross_samples_the_surface_of_its_three_bars_by_area():
    """The cross reused the cube's sampler: a face per axis uniformly, so its bars' end caps
    (0.54 of the union's 6.66 surface) drew 33% of the points, and 10% lay inside another bar."""
    p = SHAPES["cross"](np.random.default_rng(0), 100_000)
    half = 0.15
    on_a_bar = np.zeros(len(p), dtype=bool)
    for bar in range(3):
        across = [j for j in range(3) if j != bar]
        extent = np.abs(p[:, across]).max(1)
        assert not ((np.abs(p[:, bar]) < 1) & (extent < half)).any(), "a point inside a bar"
        on_a_bar |= (np.abs(p[:, bar]) <= 1) & (extent <= half + 1e-12)
    assert on_a_bar.all()
    caps = (np.abs(p) == 1.0).any(axis=1).mean()
    assert abs(caps - 0.54 / 6.66) < 0.005, caps
