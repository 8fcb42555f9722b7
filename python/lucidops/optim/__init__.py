"""Optimizers: natural-gradient SGD for the Gaussians of 3D Gaussian point encoders."""

from .natural_gradient import (MODES, GaussianNaturalGradient, ParameterSplit, build_optimizers, commutation_matrix,
                               covariance_from_factor, elimination_matrix, factor_matrix, fisher_factor,
                               precondition_factor, precondition_means, split_parameters)

__all__ = [
    "GaussianNaturalGradient", "ParameterSplit", "split_parameters", "build_optimizers", "fisher_factor",
    "covariance_from_factor", "factor_matrix", "elimination_matrix", "commutation_matrix",
    "precondition_means", "precondition_factor", "MODES",
]
