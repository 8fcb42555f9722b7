"""Natural-gradient SGD for 3D Gaussian point encoders (methods.md section 1, "Training").

Each Gaussian g has a mean mu_g (3,) and a packed lower-triangular factor L_g (6,) =
[l00, l10, l20, l11, l21, l22] with precision P_g = L_g L_g^T, covariance Sigma_g = P_g^-1.
That packing is exactly vech(L_g), the column-major lower triangle, which is what the
elimination matrix picks out of vec(L_g).

Two preconditioners, both applied before SGD momentum:

- ``mode="mahalanobis"``: grad_mu <- Sigma_g grad_mu (the inverse Fisher of the mean);
  factors get plain SGD.
- ``mode="fisher"``: the same for the means, and grad_L <- (F_g + damping I)^-1 grad_L with
  F_g the Fisher information of the 6 free entries of L_g.

Derivation of F_g (column-major vec; K the 9x9 commutation matrix, N = (I + K)/2,
E the 6x9 elimination matrix with vech(L) = E vec(L) and, L being lower triangular,
vec(L) = E^T vech(L)):

- For a Gaussian, log p = 1/2 log det P - 1/2 d^T P d + const, d = x - mu; the score in
  vec(P) is 1/2 vec(Sigma - d d^T) and its covariance is 1/2 N (Sigma kron Sigma), i.e.
  (1/2)(Sigma kron Sigma) on symmetric directions. (The mean block decouples.)
- dP = dL L^T + L dL^T, so vec(dP) = (I + K)(L kron I) vec(dL) = 2 N (L kron I) E^T dvech(L):
  the Jacobian is J = 2 N (L kron I) E^T (9x6).
- F = J^T (1/2 N (Sigma kron Sigma)) J = 2 E (L^T kron I) N (Sigma kron Sigma) (L kron I) E^T,
  using N^2 = N and N (Sigma kron Sigma) = (Sigma kron Sigma) N.

F is positive definite whenever L has a non-zero diagonal (L -> P is then a local
bijection); ``damping`` keeps the solve well conditioned when a Gaussian grows very flat.
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Set, Tuple, overload

import torch
from torch import Tensor, nn

from .. import _validate
from .._typing import DeviceLike
from ..nn.gaussian_mixture import GaussianPointEncoder, covariance_from_lower

MODES = ("mahalanobis", "fisher")

# (row, col) of each packed factor entry; the order is vech, column-major.
_PACKED = ((0, 0), (1, 0), (2, 0), (1, 1), (2, 1), (2, 2))


def elimination_matrix(n: int = 3, dtype: torch.dtype = torch.float64,
                       device: Optional[DeviceLike] = None) -> Tensor:
    """E (n(n+1)/2, n^2) with vech(A) = E vec(A), vec column-major (index of A[i, j] is i + n j)."""
    rows = [(i, j) for j in range(n) for i in range(j, n)]
    e = torch.zeros(len(rows), n * n, dtype=dtype, device=device)
    for r, (i, j) in enumerate(rows):
        e[r, i + n * j] = 1.0
    return e


def commutation_matrix(n: int = 3, dtype: torch.dtype = torch.float64,
                       device: Optional[DeviceLike] = None) -> Tensor:
    """K (n^2, n^2) with K vec(A) = vec(A^T), vec column-major."""
    k = torch.zeros(n * n, n * n, dtype=dtype, device=device)
    for i in range(n):
        for j in range(n):
            k[j + n * i, i + n * j] = 1.0
    return k


def _batched_kron(a: Tensor, b: Tensor) -> Tensor:
    """(G, m, n) kron (G, p, q) -> (G, mp, nq), the standard Kronecker product per batch."""
    g, m, n = a.shape
    _, p, q = b.shape
    return torch.einsum("gij,gkl->gikjl", a, b).reshape(g, m * p, n * q)


def factor_matrix(factor: Tensor) -> Tensor:
    """(G, 6) packed [l00, l10, l20, l11, l21, l22] -> (G, 3, 3) lower-triangular L."""
    _check_factor(factor, "factor")
    l_mat = factor.new_zeros(factor.shape[0], 3, 3)
    rows = [r for r, _ in _PACKED]
    cols = [c for _, c in _PACKED]
    l_mat[:, rows, cols] = factor
    return l_mat


def covariance_from_factor(factor: Tensor) -> Tensor:
    """(G, 6) packed L -> (G, 3, 3) Sigma = (L L^T)^-1 (two triangular solves, no general inverse)."""
    return covariance_from_lower(factor_matrix(factor))


def fisher_factor(factor: Tensor) -> Tensor:
    """Closed-form Fisher information (G, 6, 6) of the packed factor entries of each Gaussian.

    F = 2 E (L^T kron I) N (Sigma kron Sigma) (L kron I) E^T, in the dtype of ``factor``
    (see the module docstring for the derivation).
    """
    _check_factor(factor, "factor")
    dtype, device = factor.dtype, factor.device
    g = factor.shape[0]
    l_mat = factor_matrix(factor)
    sigma = covariance_from_lower(l_mat)
    eye3 = torch.eye(3, dtype=dtype, device=device).expand(g, 3, 3)
    e = elimination_matrix(3, dtype, device)
    n_sym = 0.5 * (torch.eye(9, dtype=dtype, device=device) + commutation_matrix(3, dtype, device))
    l_kron_i = _batched_kron(l_mat, eye3)  # (G, 9, 9)
    jac = 2.0 * n_sym @ l_kron_i @ e.T  # d vec(P) / d vech(L), (G, 9, 6)
    return 0.5 * jac.transpose(-1, -2) @ _batched_kron(sigma, sigma) @ jac


def _check_factor(factor, name: str) -> None:
    if not isinstance(factor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(factor).__name__}")
    if not factor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {factor.dtype}")
    if factor.dim() != 2 or factor.shape[1] != 6:
        raise ValueError(f"{name} must have shape (G, 6), got {tuple(factor.shape)}")


def precondition_means(grad: Tensor, factor: Tensor) -> Tensor:
    """grad_mu (G, 3) -> Sigma_g grad_mu (the Mahalanobis / natural gradient of the means)."""
    sigma = covariance_from_factor(factor.detach().double())
    return (sigma @ grad.double().unsqueeze(-1)).squeeze(-1).to(grad.dtype)


def precondition_factor(grad: Tensor, factor: Tensor, damping: float) -> Tensor:
    """grad_L (G, 6) -> (F_g + damping I)^-1 grad_L, solved in float64."""
    fisher = fisher_factor(factor.detach().double())
    fisher = fisher + damping * torch.eye(6, dtype=fisher.dtype, device=fisher.device)
    return torch.linalg.solve(fisher, grad.double().unsqueeze(-1)).squeeze(-1).to(grad.dtype)


def _find_encoders(source) -> List[GaussianPointEncoder]:
    if isinstance(source, GaussianPointEncoder):
        return [source]
    if isinstance(source, nn.Module):
        return [m for m in source.modules() if isinstance(m, GaussianPointEncoder)]
    raise TypeError(f"expected a GaussianPointEncoder or an nn.Module, got {type(source).__name__}")


class GaussianNaturalGradient(torch.optim.Optimizer):
    """SGD with momentum on Gaussian means and factors, with natural-gradient preconditioning.

    Args:
        params: a ``GaussianPointEncoder``, any ``nn.Module`` (all its Gaussian encoders are
            taken), an iterable of encoders, or param groups as :func:`split_parameters`
            returns them: dicts ``{"params": [means, factor], "roles": ["means", "factor"]}``
            (means (G, 3), factor (G, 6) of the same encoder) plus optional overrides
            (lr, momentum, mode, damping).
        lr: learning rate (0.005, the authors' value).
        momentum: heavy-ball momentum (0.9, the authors' value); 0 disables it.
        mode: "mahalanobis" (means preconditioned by Sigma, factors plain SGD) or "fisher"
            (also the factors, by their damped inverse Fisher).
        damping: added to the Fisher's diagonal before solving (fisher mode only).

    The preconditioners are computed in float64 from the factor *before* the step, as the
    authors' gradient hooks do.
    """

    def __init__(self, params: torch.optim.optimizer.ParamsT, lr: float = 0.005, momentum: float = 0.9,
                 mode: str = "mahalanobis", damping: float = 1e-4) -> None:
        _check_hyperparameters(dict(lr=lr, momentum=momentum, mode=mode, damping=damping), "")
        defaults = dict(lr=float(lr), momentum=float(momentum), mode=mode, damping=float(damping))
        super().__init__(self._as_groups(params), defaults)

    def add_param_group(self, param_group: Dict) -> None:
        """Add a ``{"params": [means, factor], "roles": ["means", "factor"], ...}`` group (or
        a GaussianPointEncoder's), its shapes and settings (lr, momentum, mode, damping, each
        defaulting to the constructor's) checked first: a per-group ``lr=-1`` or ``momentum=5``
        would silently ascend or diverge."""
        group = _checked_group(param_group)
        _check_hyperparameters({**self.defaults, **group}, "param group: ")
        # Stored as Python floats, as the constructor stores its own: a numpy float in the
        # state_dict made torch.load (weights_only, its default) refuse the file.
        # A one-element tensor too (its step() read lr as add_'s alpha, which takes a number).
        for key in ("lr", "momentum", "damping"):
            if key in group:
                group[key] = float(group[key])
        super().add_param_group(group)

    @staticmethod
    def _as_groups(params) -> List[Dict]:
        if isinstance(params, nn.Module):
            encoders = _find_encoders(params)
            if not encoders:
                raise ValueError("params: the module contains no GaussianPointEncoder")
            _refuse_partly_tied(params)
            return [_encoder_group(e) for e in encoders]
        if isinstance(params, Tensor):
            raise TypeError("params must be encoders or param groups with roles, not a bare tensor")
        items = list(params)
        if not items:
            raise ValueError("params is empty")
        return [_checked_group(item) for item in items]

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One SGD-with-momentum step on the preconditioned gradients."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            means, factor = group["params"]
            # Both preconditioners use the factor before this step updates it.
            updates = []
            if means.grad is not None:
                updates.append((means, precondition_means(means.grad, factor)))
            if factor.grad is not None:
                g = factor.grad
                if group["mode"] == "fisher":
                    g = precondition_factor(g, factor, group["damping"])
                updates.append((factor, g))
            for p, d_p in updates:
                if group["momentum"] > 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d_p.clone()
                    else:
                        buf.mul_(group["momentum"]).add_(d_p)
                    d_p = buf
                p.add_(d_p, alpha=-group["lr"])
        return loss


def _refuse_partly_tied(model: nn.Module) -> None:
    """Refuse encoders that share their means or factor with another encoder but not both:
    the pair's groups would hold one parameter twice (torch's optimizer then refuses with a
    message naming neither). An encoder reached twice is one module, taken once."""
    owner: Dict[int, str] = {}
    for name, enc in model.named_modules():
        if not isinstance(enc, GaussianPointEncoder):
            continue
        for role, p in (("means", enc.means), ("factor", enc.factor)):
            if id(p) in owner:
                raise ValueError(f"params: the encoder {name or '(root)'!r} shares its {role} with {owner[id(p)]!r}; "
                                 "a natural-gradient group needs an encoder's own means and factor: use "
                                 "lucidops.optim.build_optimizers (or split_parameters), which gives a tied "
                                 "encoder's other parameter to AdamW")
            owner[id(p)] = f"{name or '(root)'}.{role}"


def _encoder_group(encoder: GaussianPointEncoder) -> Dict:
    return {"params": [encoder.means, encoder.factor], "roles": ["means", "factor"]}


# What a param group may hold: its parameters and roles, the settings step() reads, and the
# keys torch itself adds (parameter names, a scheduler's initial_lr).
_GROUP_KEYS = frozenset({"params", "roles", "lr", "momentum", "mode", "damping", "param_names", "initial_lr"})


def _checked_group(item) -> Dict:
    """A param group from a GaussianPointEncoder or a group dict, its roles and shapes checked."""
    if isinstance(item, GaussianPointEncoder):
        return _encoder_group(item)
    if not isinstance(item, dict):
        raise TypeError(f"params: expected GaussianPointEncoder modules or param-group dicts, "
                        f"got {type(item).__name__}")
    group = dict(item)
    unknown = sorted(set(group) - _GROUP_KEYS)
    if unknown:
        raise ValueError(f"params: unknown param-group setting(s) {unknown}; a group takes "
                         f"{sorted(_GROUP_KEYS - {'param_names', 'initial_lr'})} (no weight_decay: "
                         "the natural gradient has none; decay the other parameters with AdamW)")
    ps = group.get("params", [])
    ps = [ps] if isinstance(ps, Tensor) else list(ps)
    if group.get("roles") != ["means", "factor"] or len(ps) != 2:
        raise ValueError("params: each group must be {'params': [means, factor], 'roles': ['means', 'factor']}")
    means, factor = ps
    if not isinstance(means, Tensor) or means.dim() != 2 or means.shape[1] != 3:
        raise ValueError(f"params: means must have shape (G, 3), got {getattr(means, 'shape', None)}")
    if not isinstance(factor, Tensor) or factor.dim() != 2 or factor.shape[1] != 6:
        raise ValueError(f"params: factor must have shape (G, 6), got {getattr(factor, 'shape', None)}")
    if means.shape[0] != factor.shape[0]:
        raise ValueError(f"params: means has {means.shape[0]} Gaussians but factor has {factor.shape[0]}")
    group["params"] = ps
    return group


def _check_hyperparameters(group: Dict, where: str) -> None:
    lr, momentum, damping = group["lr"], group["momentum"], group["damping"]
    if isinstance(lr, Tensor) and lr.numel() == 1:  # torch's optimizers take a tensor lr (schedulers, capturable)
        lr = float(lr.detach())
    # Any real number (a numpy float too, which isinstance(x, (int, float)) refused with a
    # range message); a non-number is a TypeError.
    if not _validate.real_number(lr, f"{where}lr") > 0:
        raise ValueError(f"{where}lr must be > 0, got {lr!r}")
    _validate.probability(momentum, f"{where}momentum")  # [0, 1)
    if group["mode"] not in MODES:
        raise ValueError(f"{where}mode must be one of {MODES}, got {group['mode']!r}")
    _validate.real_number(damping, f"{where}damping", ">= 0")


class ParameterSplit(NamedTuple):
    """Param groups of a model: natural gradient for the Gaussians, AdamW for the rest."""

    natural_gradient: List[Dict]
    adamw: List[Dict]


def split_parameters(model: nn.Module) -> ParameterSplit:
    """Split ``model``'s parameters: each ``GaussianPointEncoder``'s means and factor form a
    natural-gradient group (``{"params": [means, factor], "roles": ["means", "factor"]}``);
    every other parameter (mixers, heads, norms) goes into one AdamW group. Each parameter of
    ``model.parameters()`` appears exactly once (shared parameters are deduplicated).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    natural: List[Dict] = []
    taken: Set[int] = set()
    for enc in _find_encoders(model):
        # The same encoder reached twice (a shared submodule), or one tied to an earlier one by
        # its means or its factor alone: a parameter in two groups made every optimizer refuse
        # the split. Its untaken half goes to AdamW with the rest.
        if id(enc.means) in taken or id(enc.factor) in taken:
            continue
        natural.append({"params": [enc.means, enc.factor], "roles": ["means", "factor"]})
        taken.update((id(enc.means), id(enc.factor)))
    rest = [p for p in model.parameters() if id(p) not in taken]
    return ParameterSplit(natural, [{"params": rest}] if rest else [])


def build_optimizers(model: nn.Module, *, lr: float = 0.005, momentum: float = 0.9, mode: str = "mahalanobis",
                     damping: float = 1e-4, adamw_lr: float = 1e-3, weight_decay: float = 1e-2
                     ) -> Tuple[Optional[GaussianNaturalGradient], Optional[torch.optim.AdamW]]:
    """(GaussianNaturalGradient or None, AdamW or None) over :func:`split_parameters` of ``model``."""
    split = split_parameters(model)
    natural = (GaussianNaturalGradient(split.natural_gradient, lr=lr, momentum=momentum, mode=mode, damping=damping)
               if split.natural_gradient else None)
    adamw = torch.optim.AdamW(split.adamw, lr=adamw_lr, weight_decay=weight_decay) if split.adamw else None
    return natural, adamw


__all__ = [
    "GaussianNaturalGradient", "ParameterSplit", "split_parameters", "build_optimizers", "fisher_factor",
    "covariance_from_factor", "factor_matrix", "elimination_matrix", "commutation_matrix",
    "precondition_means", "precondition_factor", "MODES",
]
