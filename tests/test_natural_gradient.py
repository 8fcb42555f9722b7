"""GaussianNaturalGradient: the closed-form Fisher of the factor against a numerical Fisher,
the Mahalanobis step, descent on a loss, parameter splitting, argument errors."""

import io
import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from lucidops.nn.gaussian_mixture import GaussianPointEncoder, precision_from_factor
from lucidops.optim import (GaussianNaturalGradient, build_optimizers, commutation_matrix, covariance_from_factor,
                            elimination_matrix, factor_matrix, fisher_factor, split_parameters)


def _random_factor(g, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(g, 6, generator=gen, dtype=dtype) * 0.4
    # Diagonal away from zero, with mixed signs (P = L L^T does not care about the sign).
    diag = (0.6 + torch.rand(g, 3, generator=gen, dtype=dtype)) * torch.tensor([1.0, -1.0, 1.0], dtype=dtype)
    f[:, [0, 3, 5]] = diag
    return f


def _log_density(theta, d):
    """Gaussian log-density (up to a constant) of one offset d (3,), precision L L^T, L packed in theta."""
    rows, cols = torch.tensor([0, 1, 2, 1, 2, 2]), torch.tensor([0, 0, 0, 1, 1, 2])
    l_mat = torch.zeros(3, 3, dtype=theta.dtype).index_put((rows, cols), theta)
    return torch.log(torch.abs(torch.diagonal(l_mat))).sum() - 0.5 * ((d @ l_mat) ** 2).sum()


def _scores(theta, d):
    """(M, 6) per-sample scores d log p(d_m) / d theta, by autograd (vmapped, not one backward each)."""
    return torch.func.vmap(torch.func.grad(_log_density), in_dims=(None, 0))(theta, d)


def _quadrature_fisher(theta):
    """E[s s^T] of the score s = d log p / d theta, by tensor Gauss-Hermite quadrature.

    The score is quadratic in d, so s s^T is a degree-4 polynomial: 5 nodes per axis are exact.
    """
    x, w = np.polynomial.hermite_e.hermegauss(5)
    w = w / math.sqrt(2 * math.pi)
    z = torch.tensor(list(itertools.product(x, x, x)), dtype=torch.float64)
    weights = torch.tensor([a * b * c for a, b, c in itertools.product(w, w, w)], dtype=torch.float64)
    l_mat = factor_matrix(theta.unsqueeze(0))[0]
    # d = L^-T z has covariance L^-T L^-1 = Sigma.
    d = torch.linalg.solve_triangular(l_mat.T, z.T, upper=True).T
    scores = _scores(theta, d)  # (125, 6)
    return torch.einsum("m,mi,mj->ij", weights, scores, scores)


def test_matrices():
    a = torch.randn(3, 3, dtype=torch.float64)
    vec = a.T.reshape(-1)  # column-major vec
    assert torch.equal(commutation_matrix(3) @ vec, a.reshape(-1))
    lower = torch.tril(a)
    vech = elimination_matrix(3) @ lower.T.reshape(-1)
    # vech, column-major, is the encoder's packing [l00, l10, l20, l11, l21, l22].
    assert torch.equal(vech, torch.stack([a[0, 0], a[1, 0], a[2, 0], a[1, 1], a[2, 1], a[2, 2]]))
    assert torch.equal(factor_matrix(vech.unsqueeze(0))[0], lower)


def test_closed_form_fisher_matches_quadrature_and_expected_hessian():
    factors = _random_factor(4, seed=1)
    closed = fisher_factor(factors)
    assert closed.shape == (4, 6, 6) and closed.dtype == torch.float64
    for g in range(4):
        theta = factors[g]
        numeric = _quadrature_fisher(theta)
        # Exact in float64 up to rounding: relative Frobenius error 1e-10.
        assert torch.linalg.norm(closed[g] - numeric) <= 1e-10 * torch.linalg.norm(numeric)
        # Independent route: F = -E[Hessian of log p]; E[d d^T] = Sigma makes it -Hessian of
        # sum log|l_ii| - 1/2 tr(L L^T Sigma), Sigma held fixed.
        sigma = covariance_from_factor(theta.unsqueeze(0))[0]

        def expected_log_density(t):
            l_mat = factor_matrix(t.unsqueeze(0))[0]
            return torch.log(torch.abs(torch.diagonal(l_mat))).sum() - 0.5 * torch.trace(l_mat @ l_mat.T @ sigma)

        hess = torch.autograd.functional.hessian(expected_log_density, theta)
        assert torch.linalg.norm(closed[g] + hess) <= 1e-10 * torch.linalg.norm(hess)
        assert torch.linalg.eigvalsh(closed[g]).min() > 0


def test_fisher_monte_carlo():
    """A sampled Fisher (200k draws) agrees to the Monte Carlo error (5% of the norm)."""
    theta = _random_factor(1, seed=2)[0]
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(200_000, 3, generator=gen, dtype=torch.float64)
    l_mat = factor_matrix(theta.unsqueeze(0))[0]
    d = torch.linalg.solve_triangular(l_mat.T, z.T, upper=True).T
    scores = _scores(theta, d)
    mc = scores.T @ scores / d.shape[0]
    closed = fisher_factor(theta.unsqueeze(0))[0]
    assert torch.linalg.norm(mc - closed) < 0.05 * torch.linalg.norm(closed)


def _encoder(seed=0, g=5):
    torch.manual_seed(seed)
    enc = GaussianPointEncoder(num_gaussians=g, out_channels=7)
    with torch.no_grad():
        enc.factor.copy_(_random_factor(g, seed=seed + 10, dtype=torch.float32))
    return enc


@pytest.mark.parametrize("mode", ["mahalanobis", "fisher"])
def test_single_step_is_preconditioned_gradient(mode):
    enc = _encoder()
    gm = torch.randn(5, 3)
    gf = torch.randn(5, 6)
    enc.means.grad, enc.factor.grad = gm.clone(), gf.clone()
    means0, factor0 = enc.means.detach().clone(), enc.factor.detach().clone()
    damping = 1e-3
    opt = GaussianNaturalGradient(enc, lr=1.0, momentum=0.0, mode=mode, damping=damping)
    opt.step()
    sigma = torch.linalg.inv(factor_matrix(factor0.double()) @ factor_matrix(factor0.double()).transpose(1, 2))
    expected_means = means0.double() - (sigma @ gm.double().unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(enc.means.detach().double(), expected_means, rtol=1e-5, atol=1e-5)
    if mode == "mahalanobis":
        torch.testing.assert_close(enc.factor.detach(), factor0 - gf)
    else:
        fisher = fisher_factor(factor0.double()) + damping * torch.eye(6, dtype=torch.float64)
        # F (factor0 - factor1) must give back the raw gradient.
        torch.testing.assert_close(fisher @ (factor0.double() - enc.factor.detach().double()).unsqueeze(-1),
                                   gf.double().unsqueeze(-1), rtol=1e-4, atol=1e-4)


def test_momentum_accumulates():
    enc = _encoder()
    opt = GaussianNaturalGradient(enc, lr=0.1, momentum=0.5)
    f0 = enc.factor.detach().clone()
    for _ in range(2):
        enc.factor.grad = torch.ones(5, 6)
        enc.means.grad = None
        opt.step()
    # Steps of 1 then 1 + 0.5: total 0.1 * 2.5.
    torch.testing.assert_close(enc.factor.detach(), f0 - 0.25)


def _nll(enc, data):
    """Mean negative log-likelihood of data (M, 3) under each of the encoder's Gaussians."""
    p = precision_from_factor(enc.factor)
    p_mat = torch.stack([p[:, 0], p[:, 1], p[:, 2], p[:, 1], p[:, 3], p[:, 4], p[:, 2], p[:, 4], p[:, 5]], -1)
    p_mat = p_mat.reshape(-1, 3, 3)
    d = data.unsqueeze(0) - enc.means.unsqueeze(1)  # (G, M, 3)
    quad = torch.einsum("gmi,gij,gmj->gm", d, p_mat, d)
    return (0.5 * quad.mean(1) - 0.5 * torch.logdet(p_mat)).mean()


@pytest.mark.parametrize("mode", ["mahalanobis", "fisher"])
def test_descends_on_gaussian_fit(mode):
    enc = _encoder(seed=3, g=4)
    gen = torch.Generator().manual_seed(4)
    data = torch.randn(256, 3, generator=gen) @ torch.tensor([[0.5, 0.0, 0.0], [0.2, 0.3, 0.0], [0.0, 0.1, 0.8]])
    opt = GaussianNaturalGradient(enc, lr=0.05, mode=mode)
    first = _nll(enc, data).item()
    for _ in range(40):
        opt.zero_grad()
        loss = _nll(enc, data)
        loss.backward()
        opt.step()
    last = _nll(enc, data).item()
    assert math.isfinite(last) and last < first - 0.5


def test_step_through_the_encoder_op():
    torch.manual_seed(5)
    model = nn.Sequential(GaussianPointEncoder(num_gaussians=6, out_channels=8), nn.Linear(8, 3))
    natural, adamw = build_optimizers(model, mode="fisher", lr=0.05)
    points = torch.rand(4, 32, 3) * 2 - 1
    target = torch.tensor([0, 1, 2, 0])
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for _ in range(15):
        natural.zero_grad()
        adamw.zero_grad()
        loss = nn.functional.cross_entropy(model(points), target)
        loss.backward()
        natural.step()
        adamw.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.tnet = GaussianPointEncoder(num_gaussians=3, out_channels=4)
        self.enc = GaussianPointEncoder(num_gaussians=5, out_channels=4)
        self.shared = self.enc  # the same encoder reached twice
        self.head = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.frozen = nn.Parameter(torch.zeros(2), requires_grad=False)


def test_split_covers_every_parameter_once():
    model = _Model()
    split = split_parameters(model)
    assert len(split.natural_gradient) == 2
    grouped = [p for g in split.natural_gradient + split.adamw for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters()}
    natural_ids = {id(p) for g in split.natural_gradient for p in g["params"]}
    assert natural_ids == {id(model.tnet.means), id(model.tnet.factor), id(model.enc.means), id(model.enc.factor)}
    opt = GaussianNaturalGradient(split.natural_gradient)
    assert len(opt.param_groups) == 2
    nat, adamw = build_optimizers(nn.Linear(2, 2))
    assert nat is None and isinstance(adamw, torch.optim.AdamW)


def test_state_dict_roundtrip():
    enc = _encoder()
    opt = GaussianNaturalGradient(enc, mode="fisher")
    enc.means.grad, enc.factor.grad = torch.randn(5, 3), torch.randn(5, 6)
    opt.step()
    opt2 = GaussianNaturalGradient(enc, mode="mahalanobis")
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["mode"] == "fisher"
    torch.testing.assert_close(opt2.state[enc.factor]["momentum_buffer"], opt.state[enc.factor]["momentum_buffer"])


def test_bad_input_raises():
    enc = _encoder()
    with pytest.raises(ValueError, match="mode"):
        GaussianNaturalGradient(enc, mode="adam")
    with pytest.raises(ValueError, match="lr"):
        GaussianNaturalGradient(enc, lr=0.0)
    with pytest.raises(ValueError, match="momentum"):
        GaussianNaturalGradient(enc, momentum=1.0)
    with pytest.raises(ValueError, match="damping"):
        GaussianNaturalGradient(enc, damping=-1.0)
    with pytest.raises(ValueError, match="no GaussianPointEncoder"):
        GaussianNaturalGradient(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="bare tensor"):
        GaussianNaturalGradient(enc.means)
    with pytest.raises(ValueError, match="roles"):
        GaussianNaturalGradient([{"params": [enc.means, enc.factor]}])
    with pytest.raises(ValueError, match="means has 5 Gaussians"):
        GaussianNaturalGradient([{"params": [enc.means, nn.Parameter(torch.ones(4, 6))], "roles": ["means", "factor"]}])
    with pytest.raises(ValueError, match="factor must have shape"):
        GaussianNaturalGradient([{"params": [enc.means, nn.Parameter(torch.ones(5, 3))], "roles": ["means", "factor"]}])
    with pytest.raises(ValueError, match="is empty"):
        GaussianNaturalGradient([])
    with pytest.raises(TypeError, match="param-group"):
        GaussianNaturalGradient([enc.means])
    with pytest.raises(ValueError, match=r"\(G, 6\)"):
        fisher_factor(torch.ones(3, 5))
    with pytest.raises(TypeError, match="floating"):
        fisher_factor(torch.ones(3, 6, dtype=torch.int64))
    with pytest.raises(TypeError, match="model"):
        split_parameters("not a model")


def test_group_settings_and_added_groups_are_checked():
    """Per-group overrides were taken unchecked (lr=-1 ascended, momentum=5 diverged: |means|
    180 after 6 steps), and add_param_group took a group without roles (step() then failed
    with 'not enough values to unpack')."""
    from lucidops.nn import GaussianPointEncoder
    from lucidops.optim import GaussianNaturalGradient

    enc = GaussianPointEncoder(4, 8)
    group = {"params": [enc.means, enc.factor], "roles": ["means", "factor"]}
    for bad, match in ((dict(lr=-1.0), "param group: lr must be > 0"), (dict(momentum=5.0), "momentum"),
                       (dict(damping=-3.0), "damping"), (dict(mode="newton"), "mode")):
        with pytest.raises(ValueError, match=match):
            GaussianNaturalGradient([{**group, **bad}])
    opt = GaussianNaturalGradient([group], lr=0.01)
    other = GaussianPointEncoder(4, 8)
    with pytest.raises(ValueError, match="roles"):
        opt.add_param_group({"params": other.means})
    with pytest.raises(ValueError, match="lr must be > 0"):
        opt.add_param_group({"params": [other.means, other.factor], "roles": ["means", "factor"], "lr": 0.0})
    assert len(opt.param_groups) == 1
    opt.add_param_group(other)  # an encoder, as the constructor takes
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.01
    third = GaussianPointEncoder(4, 8)
    opt.add_param_group({"params": [third.means, third.factor], "roles": ["means", "factor"],
                         "lr": torch.tensor(0.1)})  # a tensor lr, as torch's optimizers take
    with pytest.raises(ValueError, match="lr must be > 0"):
        opt.add_param_group({"params": [third.means, third.factor], "roles": ["means", "factor"],
                             "lr": torch.tensor(-0.1)})


def test_a_zero_on_the_diagonal_of_l_is_named():
    """The forward runs (culling falls back to no box), but the covariance does not exist:
    step() and spread() raised LAPACK's 'diagonal element 1 is zero' (1-based, of l00)."""
    from lucidops.nn import GaussianPointEncoder
    from lucidops.optim import GaussianNaturalGradient

    enc = GaussianPointEncoder(4, 8)
    with torch.no_grad():
        enc.factor[2, 0] = 0.0
    enc(torch.rand(1, 10, 3)).sum().backward()
    for mode in ("mahalanobis", "fisher"):
        with pytest.raises(ValueError, match=r"Gaussian\(s\) \[2\] have a zero on the diagonal of L"):
            GaussianNaturalGradient(enc, mode=mode).step()
    with pytest.raises(ValueError, match=r"\[2\]"):
        enc.spread()


def test_numpy_hyperparameters_are_numbers():
    """isinstance(x, (int, float)) refused numpy floats with a range message ("lr must be > 0,
    got np.float32(0.01)"); a non-number is a TypeError naming the setting."""
    enc = _encoder()
    for kwargs in (dict(lr=np.float32(0.01)), dict(momentum=np.float32(0.9)), dict(damping=np.float64(1e-4)),
                   dict(lr=np.int64(1))):
        opt = GaussianNaturalGradient(enc, **kwargs)
        enc.means.grad, enc.factor.grad = torch.randn(5, 3), torch.randn(5, 6)
        opt.step()
    group = {"params": [enc.means, enc.factor], "roles": ["means", "factor"]}
    opt = GaussianNaturalGradient([{**group, "momentum": np.float32(0.5), "lr": np.float64(0.01)}])
    opt.step()
    # Stored as floats: a numpy scalar in the state_dict made torch.load (weights_only) refuse it.
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer)["param_groups"][0]["momentum"] == 0.5
    for kwargs, error, match in ((dict(lr="0.01"), TypeError, "lr must be a real number"),
                                 (dict(momentum=None), TypeError, "momentum must be a real number"),
                                 (dict(damping="1e-4"), TypeError, "damping must be a real number"),
                                 (dict(lr=True), TypeError, "lr"),
                                 (dict(lr=np.float32(-0.1)), ValueError, "lr must be > 0"),
                                 (dict(lr=float("inf")), ValueError, "lr must be finite"),
                                 (dict(momentum=np.float32(1.0)), ValueError, r"momentum must be in \[0, 1\)"),
                                 (dict(damping=np.float32(-1.0)), ValueError, "damping")):
        with pytest.raises(error, match=match):
            GaussianNaturalGradient(enc, **kwargs)
    with pytest.raises(TypeError, match="param group: momentum must be a real number"):
        GaussianNaturalGradient([{**group, "momentum": "0.9"}])


def test_encoders_tied_by_one_parameter_split_into_groups_once():
    # only the means were deduplicated: a factor shared by two encoders sat in two groups, and
    # every optimizer (GaussianNaturalGradient, distill's, finetune's) refused the split
    a, b = GaussianPointEncoder(4, 8), GaussianPointEncoder(4, 8)
    b.factor = a.factor
    model = nn.ModuleList([a, b])
    split = split_parameters(model)
    ids = [id(p) for g in split.natural_gradient + split.adamw for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert [g["params"] for g in split.natural_gradient] == [[a.means, a.factor]]
    assert any(p is b.means for g in split.adamw for p in g["params"])
    natural, adamw = build_optimizers(model)
    assert natural is not None and adamw is not None


def test_a_one_element_tensor_lr_of_an_added_group_steps():
    # kept as a (1,) tensor, it reached add_'s alpha in step(): TypeError
    enc, other = GaussianPointEncoder(4, 8), GaussianPointEncoder(4, 8)
    opt = GaussianNaturalGradient(enc)
    opt.add_param_group({"params": [other.means, other.factor], "roles": ["means", "factor"],
                         "lr": torch.tensor([0.01])})
    assert opt.param_groups[-1]["lr"] == pytest.approx(0.01) and isinstance(opt.param_groups[-1]["lr"], float)
    before = other.means.detach().clone()
    other(torch.rand(2, 16, 3)).sum().backward()
    opt.step()
    assert not torch.equal(other.means, before)


def test_a_module_with_partly_tied_encoders_is_refused_by_name():
    """GaussianNaturalGradient(model) put a tied parameter in two groups, and torch refused
    with 'some parameters appear in more than one parameter group', naming none of them."""
    a, b = GaussianPointEncoder(4, 8), GaussianPointEncoder(4, 8)
    b.means = a.means
    with pytest.raises(ValueError, match=r"'1' shares its means with '0.means'.*build_optimizers"):
        GaussianNaturalGradient(nn.ModuleList([a, b]))
    shared = nn.ModuleList([a, a])  # one encoder reached twice is one module: one group
    assert len(GaussianNaturalGradient(shared).param_groups) == 1


def test_an_unknown_group_setting_is_refused():
    """A per-group weight_decay was stored and never applied."""
    enc = GaussianPointEncoder(4, 8)
    group = {"params": [enc.means, enc.factor], "roles": ["means", "factor"]}
    with pytest.raises(ValueError, match=r"unknown param-group setting\(s\) \['weight_decay'\]"):
        GaussianNaturalGradient([{**group, "weight_decay": 0.5}])
    opt = GaussianNaturalGradient([group])
    other = GaussianPointEncoder(4, 8)
    with pytest.raises(ValueError, match=r"\['lr_scale'\]"):
        opt.add_param_group({"params": [other.means, other.factor], "roles": ["means", "factor"], "lr_scale": 2})
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)  # adds initial_lr to the groups
    opt.add_param_group({**opt.param_groups[0], "params": [other.means, other.factor]})  # torch's own keys pass
    assert len(opt.param_groups) == 2
