r"""scikit-learn transformers: random features of PNG kernels from URN / ORN / HORN / KAMA matrices.

Example:
    >>> import numpy as np
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.linear_model import RidgeClassifier
    >>> X = np.random.default_rng(0).normal(size=(60, 8)); y = (X[:, 0] > 0).astype(int)
    >>> model = make_pipeline(PNGFeatures(n_components=64, random_state=0), RidgeClassifier()).fit(X, y)
    >>> model.score(X, y) > 0.8
    True
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import numpy as np
import torch

from ._optional import MissingDependencyError

try:
    from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
    from sklearn.utils import check_random_state
    from sklearn.utils.validation import check_is_fitted
except ImportError as _e:
    raise MissingDependencyError("kama.sklearn (PNGFeatures) needs scikit-learn, which is not installed: "
                                 "pip install 'kama-nn[sklearn]'") from _e

from .features import SAMPLERS, feature_map, random_matrix
from .png import KERNELS, feature_function

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - older scikit-learn
    def _validate_data(est, X, reset=True, **kw):
        return est._validate_data(X, reset=reset, **kw)

__all__ = ["PNGFeatures"]


class PNGFeatures(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    r"""Random features :math:`\phi(x) = f(W x)/\sqrt{m}` whose inner products estimate a PNG kernel.

    :math:`\phi(x)^\top \phi(y)` is an unbiased estimate of :math:`K_f(x, y) = E[f(g^\top x) f(g^\top y)]`
    (see :mod:`kama.png`); orthogonal samplers (``orthogonal``, ``hadamard``, ``kama``) give lower-variance
    estimates than i.i.d. Gaussian ones (the paper's Theorems 1 and 2), and ``kama`` applies its matrix in
    ``O(d log d)`` per point.

    Args:
        kernel: ``"angular"`` (f = sign), ``"arccos0"`` (Heaviside), ``"arccos1"`` (ReLU), ``"arccos2"``
            (ReLU squared), ``"rbf"`` (cos and sin of :math:`\sqrt{2\gamma}\, g^\top x`: the Gaussian kernel
            :math:`\exp(-\gamma\lVert x - y\rVert^2)`; ``n_components`` must be even), or a callable f acting
            element-wise on a float64 ``torch.Tensor``.
        n_components: number of features.
        sampler: ``"kama"`` (Kac's walk, KRN), ``"orthogonal"`` (ORN), ``"gaussian"`` (URN) or
            ``"hadamard"`` (HORN).
        num_rotations: rotations per ``d x d`` block for ``sampler="kama"`` (default ``ceil(5 d ln d)``).
        gamma: bandwidth of ``"rbf"``.
        random_state: seed, ``numpy.random.RandomState`` or ``None``.

    Attributes:
        matrix_: the sampled :class:`kama.features.RandomMatrix`.
        feature_function_: the f applied to the projections (a picklable function for the named kernels).
        n_features_in_: number of input features.

    Zero rows have no angle; the estimate for them is ``f(0) phi(y)``-based like the exact kernel
    (``K(0, y) = f(0) E[f(g.y)]``, 0 for sign): no NaN is produced.
    """

    def __init__(
        self,
        kernel: str | Callable[[torch.Tensor], torch.Tensor] = "angular",
        n_components: int = 100,
        sampler: str = "kama",
        num_rotations: int | None = None,
        gamma: float = 1.0,
        random_state: int | np.random.RandomState | None = None,
    ) -> None:
        self.kernel = kernel
        self.n_components = n_components
        self.sampler = sampler
        self.num_rotations = num_rotations
        self.gamma = gamma
        self.random_state = random_state

    def _check_params(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
        if not callable(self.kernel) and self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {list(KERNELS)} or a callable, got {self.kernel!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {self.sampler!r}")
        if isinstance(self.n_components, bool) or not isinstance(self.n_components, numbers.Integral) \
                or self.n_components < 1:
            raise ValueError(f"n_components must be an int >= 1, got {self.n_components!r}")
        if self.num_rotations is not None and (isinstance(self.num_rotations, bool)
                                               or not isinstance(self.num_rotations, numbers.Integral)
                                               or self.num_rotations < 0):
            raise ValueError(f"num_rotations must be None or an int >= 0, got {self.num_rotations!r}")
        if not isinstance(self.gamma, numbers.Real) or not self.gamma > 0:
            raise ValueError(f"gamma must be a positive number, got {self.gamma!r}")
        if self.kernel == "rbf":
            if self.n_components % 2:
                raise ValueError(f"n_components must be even for kernel='rbf' (cos and sin), got {self.n_components}")
            return feature_function("rbf", float(self.gamma)), self.n_components // 2
        f = self.kernel if callable(self.kernel) else feature_function(self.kernel)
        return f, int(self.n_components)

    def _check_feature_function(self, f: Callable[[torch.Tensor], torch.Tensor], m: int) -> None:
        """A callable kernel must act element-wise: a ``(2, m)`` float64 tensor in, the same shape out."""
        if not callable(self.kernel):
            return
        probe = torch.linspace(-2.0, 2.0, 2 * m, dtype=torch.float64).view(2, m)
        out = f(probe)
        if not isinstance(out, torch.Tensor) or out.shape != probe.shape or not out.dtype.is_floating_point:
            got = f"{type(out).__name__} of shape {tuple(out.shape)} and dtype {out.dtype}" \
                if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"kernel, a callable, must map a float64 tensor of shape (n, m) to a floating tensor of "
                             f"the same shape (it acts element-wise), got {got} for shape {tuple(probe.shape)}")

    def fit(self, X, y=None):
        """Sample the random matrix for ``X``'s number of features."""
        f, m = self._check_params()
        self._check_feature_function(f, m)
        X = _validate_data(self, X, reset=True, dtype=np.float64)
        rng = check_random_state(self.random_state)
        gen = torch.Generator().manual_seed(int(rng.randint(0, 2**31 - 1)))
        kw = {"num_rotations": self.num_rotations} if self.sampler.startswith("kama") else {}
        self.matrix_ = random_matrix(self.sampler, X.shape[1], m, generator=gen, dtype=torch.float64, **kw)
        self.feature_function_ = f
        self._n_features_out = int(self.n_components)
        return self

    def transform(self, X):
        """Features of ``X``: ``(n_samples, n_components)``."""
        check_is_fitted(self, "matrix_")
        X = _validate_data(self, X, reset=False, dtype=np.float64)
        with torch.no_grad():
            X = np.ascontiguousarray(X)
            phi = feature_map(torch.from_numpy(X if X.flags.writeable else X.copy()), self.matrix_,
                              self.feature_function_)
        return phi.numpy()

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64"]
        return tags
