"""lucidops.models.PointNet: shapes, parameter counts, permutation invariance, pre-max features."""

import pytest
import torch

from lucidops.models import PointNet, feature_transform_regularizer
from lucidops.models.pointnet import TNet
from lucidops.nn import GaussianPointEncoder, GaussianPointNet, GaussianTNet


def _count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("feature_transform, paper", [(True, 3.47e6), (False, 1.61e6)])
def test_parameter_counts_match_paper(feature_transform, paper):
    n = _count(PointNet(40, feature_transform=feature_transform))
    assert abs(n - paper) <= 0.02 * paper, n


@pytest.mark.parametrize("feature_transform", [True, False])
@pytest.mark.parametrize("input_transform", [True, False])
def test_shapes_and_transforms(feature_transform, input_transform):
    torch.manual_seed(0)
    model = PointNet(7, feature_transform=feature_transform, input_transform=input_transform)
    points = torch.randn(3, 33, 3)
    logits, t_in, t_feat = model(points, return_transforms=True)
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()
    assert (t_in is not None) == input_transform and (t_feat is not None) == feature_transform
    if input_transform:
        assert t_in.shape == (3, 3, 3)
        # The regressor starts at zero: the T-Net starts as the identity.
        torch.testing.assert_close(t_in, torch.eye(3).expand(3, 3, 3))
    if feature_transform:
        assert t_feat.shape == (3, 64, 64)
    assert model.point_features(points).shape == (3, 33, 1024)
    reg = model.regularization_loss(t_feat)
    assert reg.shape == () and reg.item() >= 0
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_permutation_invariance():
    torch.manual_seed(1)
    model = PointNet(10).eval()
    # Train-mode BN statistics once so the eval path is not the trivial init.
    with torch.no_grad():
        model.train()(torch.randn(8, 64, 3))
    model.eval()
    points = torch.randn(4, 64, 3)
    perm = torch.randperm(64)
    with torch.no_grad():
        a, b = model(points), model(points[:, perm])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[0], a[1])  # different clouds, different logits


def test_pre_max_features_pool_to_global_feature():
    torch.manual_seed(2)
    model = PointNet(10).eval()
    points = torch.randn(2, 50, 3)
    with torch.no_grad():
        feats = model.point_features(points)
        assert (feats < 0).any()  # no ReLU after the last conv + BN
        torch.testing.assert_close(feats.amax(dim=1), model.global_feature(points))
        # And the head of the pooled features is the forward.
        torch.testing.assert_close(model.head(feats.amax(dim=1)), model(points))
    transformed = model.transform_points(points)
    assert transformed.shape == points.shape


def test_regularizer_value():
    q, _ = torch.linalg.qr(torch.randn(2, 4, 4))
    assert feature_transform_regularizer(q).item() < 1e-10
    a = 2 * torch.eye(4).expand(2, 4, 4)  # I - A A^T = -3 I: 4 * 9 per cloud
    assert feature_transform_regularizer(a).item() == pytest.approx(36.0)


def test_bad_input_raises():
    model = PointNet(5)
    with pytest.raises(ValueError, match="points"):
        model(torch.randn(2, 3, 10))
    with pytest.raises(ValueError, match="points"):
        model(torch.randn(2, 0, 3))
    with pytest.raises(TypeError, match="points"):
        model(torch.ones(2, 4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="num_classes"):
        PointNet(0)
    with pytest.raises(ValueError, match="dropout"):
        PointNet(5, dropout=1.0)
    # Flags read by truthiness before ("yes" meant True, 0 False), as GaussianPointNet refuses them.
    with pytest.raises(TypeError, match="input_transform must be a bool"):
        PointNet(5, input_transform="yes")
    with pytest.raises(TypeError, match="feature_transform must be a bool"):
        PointNet(5, feature_transform=0)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        TNet(0)
    with pytest.raises(ValueError, match="transform"):
        feature_transform_regularizer(torch.randn(2, 3, 4))


def test_gaussian_models_refuse_a_per_point_encoder():
    """A distillation student (reduce="none", the README's example) was accepted and failed deep
    in BatchNorm, or, with N = 512 points, normalised over the points axis first."""
    per_point = GaussianPointEncoder(8, 1024, reduce="none")
    head = PointNet(5).head
    with pytest.raises(ValueError, match="encoder must have reduce='max'"):
        GaussianPointNet.from_modules(per_point, head)
    with pytest.raises(ValueError, match="encoder must have reduce='max'"):
        GaussianTNet.from_tnet(TNet(3), per_point)
    per_point.reduce = "max"
    model = GaussianPointNet.from_modules(per_point, head).eval()
    assert model(torch.randn(2, 100, 3)).shape == (2, 5)
