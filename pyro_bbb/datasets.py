"""Data for fitting and judging Bayes by Backprop.

* :func:`regression_curve` / :func:`curve` -- the toy regression curve of
  Blundell et al. (2015, Figure 5).
* :func:`load_sklearn` -- scikit-learn's bundled ``diabetes`` (regression) and
  ``breast_cancer`` (classification) sets with a seeded train/test split.
* :func:`load_uci` / :func:`uci_num_splits` -- any folder in the standard UCI
  regression layout (Hernandez-Lobato & Adams 2015; Gal & Ghahramani 2016) with
  its published splits; :func:`load_uci_gap` / :func:`uci_num_gap_splits` -- the
  "in-between" gap splits of Foong et al. (2019), one per input feature.
* :func:`conjugate_linear_regression` -- Bayesian linear regression with a
  closed-form posterior and mean-field optimum, an exact reference for VI.

All functions return torch tensors and never touch the global random state.
Inputs and regression targets are standardized with *training* statistics
(population standard deviation, ``ddof=0``); constant features are centred
but left unscaled.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ._checks import choice, positive_float, positive_int

__all__ = [
    "ConjugateLinearRegression",
    "Dataset",
    "conjugate_linear_regression",
    "curve",
    "curve_function",
    "gap_split",
    "load_mushroom",
    "load_sklearn",
    "load_uci",
    "load_uci_gap",
    "regression_curve",
    "uci_num_gap_splits",
    "uci_num_splits",
]

UCI_ROOT_ENV = "PYRO_BBB_UCI_ROOT"
_SKLEARN_SETS = ("breast_cancer", "diabetes")


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def _nonnegative_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _moments(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and std (``ddof=0``) of ``a``; constant columns get std 1.

    For a constant column the mean is set to the constant itself, so that the
    standardized column is exactly zero rather than round-off noise.
    """
    a = np.asarray(a, dtype=np.float64)
    mean, std = a.mean(axis=0), a.std(axis=0)
    constant = np.ptp(a, axis=0) == 0
    mean = np.where(constant, a[0], mean)
    std = np.where(constant, 1.0, std)
    return mean, std


def _to_tensor(a, dtype: torch.dtype) -> Tensor:
    return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype)


def _import_sklearn_datasets():
    try:
        import sklearn.datasets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "this data set needs scikit-learn: pip install pyro_bbb[datasets]"
        ) from err
    return sklearn.datasets


# ----------------------------------------------------------------------------
# The regression curve (Blundell et al. 2015, Figure 5)
# ----------------------------------------------------------------------------


def curve_function(x, eps=0.0):
    """The curve ``x + 0.3 sin(2 pi (x + eps)) + 0.3 sin(4 pi (x + eps)) + eps``.

    Parameters
    ----------
    x : Tensor, ndarray or float
        Inputs.
    eps : Tensor, ndarray or float, default 0.0
        Noise, broadcast elementwise against ``x`` (mind the shapes: an ``x`` of
        shape ``(n, 1)`` and an ``eps`` of shape ``(n,)`` broadcast to
        ``(n, n)``). With ``eps=0`` this is the noise-free curve.

    Returns
    -------
    Tensor or ndarray
        A tensor if ``x`` or ``eps`` is a tensor, else a numpy array (or float).

    Examples
    --------
    >>> import torch
    >>> grid = torch.linspace(-0.2, 1.2, 5)
    >>> curve_function(grid).shape
    torch.Size([5])
    >>> round(float(curve_function(0.25)), 6)
    0.55
    """
    if isinstance(x, Tensor) or isinstance(eps, Tensor):
        x = torch.as_tensor(x)
        eps = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
        sin = torch.sin
    else:
        x, eps, sin = np.asarray(x, dtype=np.float64), np.asarray(eps, dtype=np.float64), np.sin
        if x.ndim == 0 and eps.ndim == 0:
            x, eps = float(x), float(eps)
    u = x + eps
    return x + 0.3 * sin(2 * math.pi * u) + 0.3 * sin(4 * math.pi * u) + eps


def regression_curve(
    n: int = 100,
    *,
    seed: int = 0,
    low: float = 0.0,
    high: float = 0.5,
    noise: float = 0.02,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Draw the toy regression data of Blundell et al. (2015, Figure 5).

    ``x ~ U[low, high]`` and ``y = x + 0.3 sin(2 pi (x + eps)) + 0.3 sin(4 pi (x + eps)) + eps``
    with ``eps ~ N(0, noise^2)``; see :func:`curve_function`. Draws come from a
    private ``torch.Generator`` (in float64, then cast), so the global random
    state is untouched and a seed gives the same data for every ``dtype``.

    Parameters
    ----------
    n : int, default 100
        Number of points.
    seed : int, default 0
        Seed of the private generator.
    low, high : float, default 0.0, 0.5
        Input interval, ``low < high``.
    noise : float, default 0.02
        Standard deviation of ``eps`` (0 gives the noise-free curve).
    dtype : torch.dtype, default torch.float32
        Floating dtype of the outputs.

    Returns
    -------
    x : Tensor, shape (n, 1)
    y : Tensor, shape (n,)

    Examples
    --------
    >>> x, y = regression_curve(50, seed=1)
    >>> x.shape, y.shape
    (torch.Size([50, 1]), torch.Size([50]))
    >>> bool(((x >= 0.0) & (x <= 0.5)).all())
    True
    """
    n = positive_int("n", n)
    noise = _nonnegative_float("noise", noise)
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"low must be < high (both finite), got low={low!r}, high={high!r}")
    gen = torch.Generator().manual_seed(int(seed))
    x = low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)
    eps = noise * torch.randn(n, generator=gen, dtype=torch.float64)
    y = curve_function(x, eps)
    return x.unsqueeze(-1).to(dtype), y.to(dtype)


# ----------------------------------------------------------------------------
# Dataset container
# ----------------------------------------------------------------------------


@dataclass
class Dataset:
    """A train/test data set as used by the command line and the studies.

    Attributes
    ----------
    name : str
        Data set name.
    task : {"regression", "classification"}
    x_train : Tensor, shape (n, d)
        Training inputs (floating).
    y_train : Tensor, shape (n,)
        Regression: standardized float targets. Classification: int64 labels.
    x_test : Tensor, shape (m, d)
        Test inputs (or a plotting grid).
    y_test : Tensor of shape (m,) or None
        Same conventions as ``y_train``; None when there are no targets.
    y_mean, y_std : float
        Regression targets are ``(y - y_mean) / y_std`` with *training*
        statistics; ``y * y_std + y_mean`` gives original units.
    num_classes : int or None
        Number of classes for classification.
    feature_names : list of str or None

    Examples
    --------
    >>> data = curve(20, num_test=7)
    >>> data
    Dataset(name='curve', task='regression', x_train=(20, 1), y_train=(20,), x_test=(7, 1), y_test=None)
    >>> data.x_train.shape[1]
    1
    """

    name: str
    task: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor | None
    y_mean: float = 0.0
    y_std: float = 1.0
    num_classes: int | None = None
    feature_names: list[str] | None = None

    def __post_init__(self):
        if self.task not in ("regression", "classification"):
            raise ValueError(
                f"task must be 'regression' or 'classification', got {self.task!r}"
            )

    def __repr__(self) -> str:
        def shape(t):
            return None if t is None else tuple(t.shape)

        parts = [
            f"name={self.name!r}",
            f"task={self.task!r}",
            f"x_train={shape(self.x_train)}",
            f"y_train={shape(self.y_train)}",
            f"x_test={shape(self.x_test)}",
            f"y_test={shape(self.y_test)}",
        ]
        if self.task == "regression" and (self.y_mean != 0.0 or self.y_std != 1.0):
            parts.append(f"y_mean={self.y_mean:.4g}, y_std={self.y_std:.4g}")
        if self.num_classes is not None:
            parts.append(f"num_classes={self.num_classes}")
        return f"Dataset({', '.join(parts)})"


def curve(
    n: int = 100,
    *,
    seed: int = 0,
    num_test: int = 200,
    test_range: tuple[float, float] = (-0.2, 1.2),
    noise: float = 0.02,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """The regression curve of :func:`regression_curve` as a :class:`Dataset`.

    Training points lie in ``[0, 0.5]``; the test inputs are an evenly spaced
    grid over ``test_range`` (wider, to show uncertainty away from the data)
    without targets. Targets are *not* standardized (``y_mean=0``,
    ``y_std=1``), so plots show the paper's units.

    Parameters
    ----------
    n : int, default 100
        Number of training points.
    seed : int, default 0
    num_test : int, default 200
        Number of grid points.
    test_range : (float, float), default (-0.2, 1.2)
        Grid end points, increasing.
    noise : float, default 0.02
        Noise standard deviation.
    dtype : torch.dtype, default torch.float32

    Returns
    -------
    Dataset
        ``x_test`` of shape ``(num_test, 1)``, ``y_test`` None.

    Examples
    --------
    >>> data = curve(30, num_test=11)
    >>> data.x_test[[0, -1], 0].tolist()
    [-0.20000000298023224, 1.2000000476837158]
    >>> data.y_test is None
    True
    """
    num_test = positive_int("num_test", num_test)
    try:
        lo, hi = (float(v) for v in test_range)
    except (TypeError, ValueError):
        raise ValueError(f"test_range must be a pair (low, high), got {test_range!r}") from None
    if not lo < hi:
        raise ValueError(f"test_range must be increasing, got {test_range!r}")
    x, y = regression_curve(n, seed=seed, noise=noise, dtype=dtype)
    grid = torch.linspace(lo, hi, num_test, dtype=torch.float64).unsqueeze(-1).to(dtype)
    return Dataset("curve", "regression", x, y, grid, None, feature_names=["x"])


# ----------------------------------------------------------------------------
# scikit-learn's bundled data sets
# ----------------------------------------------------------------------------


def load_sklearn(
    name: str,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Load scikit-learn's ``diabetes`` or ``breast_cancer`` with a random split.

    Rows are split by a permutation from ``numpy.random.default_rng(seed)``;
    ``round(test_fraction * N)`` go to the test set. Features are standardized
    with the training mean and std. ``diabetes`` (442 x 10, regression) also has
    its target standardized with training statistics; ``breast_cancer``
    (569 x 30, classification) keeps int64 labels in {0, 1}.

    Parameters
    ----------
    name : {"diabetes", "breast_cancer"}
    test_fraction : float, default 0.2
        Share of rows for the test set, in (0, 1).
    seed : int, default 0
        Seed of the split.
    dtype : torch.dtype, default torch.float32
        Dtype of the features (and of regression targets).

    Returns
    -------
    Dataset

    Raises
    ------
    ImportError
        If scikit-learn is missing (``pip install pyro_bbb[datasets]``).

    Examples
    --------
    >>> data = load_sklearn("breast_cancer", seed=1)
    >>> data.x_train.shape, data.x_test.shape, data.num_classes
    (torch.Size([455, 30]), torch.Size([114, 30]), 2)
    >>> load_sklearn("diabetes").task
    'regression'
    """
    choice("name", name, _SKLEARN_SETS)
    if not (isinstance(test_fraction, (int, float)) and 0 < test_fraction < 1):
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    skd = _import_sklearn_datasets()
    bunch = getattr(skd, f"load_{name}")()
    x, y = np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target)
    num = len(x)
    num_test = int(round(test_fraction * num))
    if not 0 < num_test < num:
        raise ValueError(
            f"test_fraction={test_fraction!r} leaves {num_test} of {num} rows for testing"
        )
    perm = np.random.default_rng(seed).permutation(num)
    test, train = perm[:num_test], perm[num_test:]
    x_mean, x_std = _moments(x[train])
    x = (x - x_mean) / x_std
    common = dict(feature_names=[str(f) for f in bunch.feature_names])
    if name == "diabetes":
        y_mean, y_std = (float(v) for v in _moments(y[train]))
        y = (y - y_mean) / y_std
        return Dataset(
            name, "regression",
            _to_tensor(x[train], dtype), _to_tensor(y[train], dtype),
            _to_tensor(x[test], dtype), _to_tensor(y[test], dtype),
            y_mean=y_mean, y_std=y_std, **common,
        )
    y = y.astype(np.int64)
    return Dataset(
        name, "classification",
        _to_tensor(x[train], dtype), _to_tensor(y[train], torch.int64),
        _to_tensor(x[test], dtype), _to_tensor(y[test], torch.int64),
        num_classes=2, **common,
    )


# ----------------------------------------------------------------------------
# UCI regression suite (standard layout with published splits)
# ----------------------------------------------------------------------------


def _uci_folder(name, root) -> Path:
    """Resolve ``name`` (a folder name under ``root``, or a folder path)."""
    if isinstance(name, os.PathLike) or (
        isinstance(name, str) and ("/" in name or os.sep in name)
    ):
        folder = Path(name).expanduser()
        if not (folder / "data.txt").is_file():
            raise ValueError(f"name={str(name)!r} is not a UCI data set folder (no data.txt)")
        return folder
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a data set name or a folder path, got {name!r}")
    if root is None:
        root = os.environ.get(UCI_ROOT_ENV)
        if not root:
            raise ValueError(
                f"no UCI data root: pass root=<folder holding one sub-folder per data "
                f"set> or set the environment variable {UCI_ROOT_ENV}; or pass name as "
                f"a path to a data set folder"
            )
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"root={str(root)!r} is not a directory")
    folder = root / name
    if not (folder / "data.txt").is_file():
        available = sorted(p.name for p in root.iterdir() if (p / "data.txt").is_file())
        raise ValueError(
            f"unknown UCI data set name={name!r} under {str(root)!r}; available: {available}"
        )
    return folder


def _read_ints(path: Path) -> np.ndarray:
    return np.atleast_1d(np.loadtxt(path, dtype=np.float64)).astype(np.int64)


def _num_splits(folder: Path) -> int:
    path = folder / "n_splits.txt"
    if path.is_file():
        return int(_read_ints(path)[0])
    num = 0
    while (folder / f"index_train_{num}.txt").is_file():
        num += 1
    return num


def uci_num_splits(name: str | os.PathLike, root: str | os.PathLike | None = None) -> int:
    """Number of published train/test splits of a UCI data set.

    Read from ``n_splits.txt``, or counted from the ``index_train_K.txt``
    files if that is absent. ``name`` and ``root`` as in :func:`load_uci`.

    Examples
    --------
    >>> uci_num_splits("yacht", root="../shared/data/uci")  # doctest: +SKIP
    20
    """
    return _num_splits(_uci_folder(name, root))


def load_uci(
    name: str | os.PathLike,
    split: int = 0,
    root: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Load one published split of a data set in the standard UCI layout.

    The folder holds ``data.txt`` (whitespace-separated rows),
    ``index_features.txt`` and ``index_target.txt`` (0-based columns),
    ``index_train_K.txt`` / ``index_test_K.txt`` (0-based rows of split K) and
    ``n_splits.txt``. Inputs and target are standardized with the training
    split's mean and std (constant features are only centred), as in the
    published protocol; report errors in original units via ``y_std``/``y_mean``.

    Parameters
    ----------
    name : str or path-like
        A folder name under ``root`` (e.g. ``"yacht"``), or a path to a data set
        folder (a path-like object or a string containing a path separator);
        then ``root`` is ignored.
    split : int, default 0
        Split index, ``0 <= split < uci_num_splits(name, root)``.
    root : str or path-like, optional
        Folder holding one sub-folder per data set. Defaults to the environment
        variable ``PYRO_BBB_UCI_ROOT``.
    dtype : torch.dtype, default torch.float32

    Returns
    -------
    Dataset
        Task ``"regression"``, ``name`` the folder name.

    Examples
    --------
    >>> data = load_uci("yacht", split=3, root="../shared/data/uci")  # doctest: +SKIP
    >>> data.x_train.shape, data.x_test.shape  # doctest: +SKIP
    (torch.Size([277, 6]), torch.Size([31, 6]))
    >>> rmse = ((pred - data.y_test) * data.y_std).pow(2).mean().sqrt()  # doctest: +SKIP
    """
    folder = _uci_folder(name, root)
    num_splits = _num_splits(folder)
    if isinstance(split, bool) or not isinstance(split, (int, np.integer)) or not (
        0 <= split < num_splits
    ):
        raise ValueError(
            f"split must be an integer in [0, {num_splits}); {folder.name!r} has "
            f"{num_splits} splits, got split={split!r}"
        )
    data = np.loadtxt(folder / "data.txt", dtype=np.float64, ndmin=2)
    features = _read_ints(folder / "index_features.txt")
    target = int(_read_ints(folder / "index_target.txt")[0])
    train = _read_ints(folder / f"index_train_{split}.txt")
    test = _read_ints(folder / f"index_test_{split}.txt")
    x, y = data[:, features], data[:, target]
    x_mean, x_std = _moments(x[train])
    y_mean, y_std = (float(v) for v in _moments(y[train]))
    x = (x - x_mean) / x_std
    y = (y - y_mean) / y_std
    return Dataset(
        folder.name, "regression",
        _to_tensor(x[train], dtype), _to_tensor(y[train], dtype),
        _to_tensor(x[test], dtype), _to_tensor(y[test], dtype),
        y_mean=y_mean, y_std=y_std,
    )


def _num_features(folder: Path) -> int:
    return len(_read_ints(folder / "index_features.txt"))


def uci_num_gap_splits(name: str | os.PathLike, root: str | os.PathLike | None = None) -> int:
    """Number of gap splits of a UCI data set: one per input feature.

    ``name`` and ``root`` as in :func:`load_uci`; see :func:`load_uci_gap`.

    Examples
    --------
    >>> uci_num_gap_splits("yacht", root="../shared/data/uci")  # doctest: +SKIP
    6
    """
    return _num_features(_uci_folder(name, root))


def gap_split(values, fraction: float = 1 / 3) -> tuple[np.ndarray, np.ndarray]:
    """Train and test rows of a gap split on one feature's ``values``: rows sorted by
    value (ties in row order), the middle ``fraction`` the test set, the rest training.

    With ``n`` rows the test rows are ranks ``round(n (1 - fraction) / 2)`` to
    ``n - round(n (1 - fraction) / 2)`` (exclusive), the two outer parts as equal as
    possible; both index arrays are sorted.

    Examples
    --------
    >>> train, test = gap_split([5.0, 1.0, 4.0, 2.0, 3.0, 6.0])
    >>> train.tolist(), test.tolist()
    ([0, 1, 3, 5], [2, 4])
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size < 3:
        raise ValueError(f"values must be one feature of at least 3 rows, got shape {values.shape}")
    if not (isinstance(fraction, Real) and 0 < fraction < 1):
        raise ValueError(f"fraction must lie in (0, 1), got {fraction!r}")
    n = values.size
    order = np.argsort(values, kind="stable")
    outer = int(round(n * (1 - fraction) / 2))
    test = order[outer : n - outer]
    train = np.concatenate([order[:outer], order[n - outer :]])
    if test.size == 0 or train.size == 0:
        raise ValueError(f"fraction={fraction!r} leaves an empty split of {n} rows")
    return np.sort(train), np.sort(test)


def load_uci_gap(
    name: str | os.PathLike,
    feature: int = 0,
    root: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Load the "in-between" gap split of a UCI data set on one input feature.

    Foong, Li, Hernandez-Lobato & Turner (2019), "'In-Between' Uncertainty in Bayesian
    Neural Networks" (arXiv 1906.11537): sort all rows of ``data.txt`` on input feature
    ``feature`` and hold out the middle third as the test set (:func:`gap_split`), so
    that the test inputs lie in a gap between two training clusters; one split per
    feature (:func:`uci_num_gap_splits`).  Only ``data.txt``, ``index_features.txt``
    and ``index_target.txt`` are read.  As in :func:`load_uci`, inputs and target are
    standardized with the training rows' mean and std (constant features only centred).
    On a feature with few distinct values (yacht's discrete settings) ties are broken in
    row order, so the gap may cut through one value.

    Parameters
    ----------
    name : str or path-like
        A folder name under ``root``, or a path to a data set folder, as in :func:`load_uci`.
    feature : int, default 0
        Position of the input feature in ``index_features.txt``,
        ``0 <= feature < uci_num_gap_splits(name, root)``.
    root : str or path-like, optional
        Folder holding one sub-folder per data set; default ``PYRO_BBB_UCI_ROOT``.
    dtype : torch.dtype, default torch.float32

    Returns
    -------
    Dataset
        Task ``"regression"``, ``name`` the folder name.

    Examples
    --------
    >>> data = load_uci_gap("yacht", feature=5, root="../shared/data/uci")  # doctest: +SKIP
    >>> data.x_train.shape, data.x_test.shape  # doctest: +SKIP
    (torch.Size([206, 6]), torch.Size([102, 6]))
    """
    folder = _uci_folder(name, root)
    num_features = _num_features(folder)
    if isinstance(feature, bool) or not isinstance(feature, (int, np.integer)) or not (
        0 <= feature < num_features
    ):
        raise ValueError(
            f"feature must be an integer in [0, {num_features}); {folder.name!r} has "
            f"{num_features} input features, got feature={feature!r}"
        )
    data = np.loadtxt(folder / "data.txt", dtype=np.float64, ndmin=2)
    features = _read_ints(folder / "index_features.txt")
    target = int(_read_ints(folder / "index_target.txt")[0])
    x, y = data[:, features], data[:, target]
    train, test = gap_split(x[:, feature])
    x_mean, x_std = _moments(x[train])
    y_mean, y_std = (float(v) for v in _moments(y[train]))
    x = (x - x_mean) / x_std
    y = (y - y_mean) / y_std
    return Dataset(
        folder.name, "regression",
        _to_tensor(x[train], dtype), _to_tensor(y[train], dtype),
        _to_tensor(x[test], dtype), _to_tensor(y[test], dtype),
        y_mean=y_mean, y_std=y_std,
    )


# ----------------------------------------------------------------------------
# Conjugate Bayesian linear regression: an exact reference for VI
# ----------------------------------------------------------------------------


@dataclass
class ConjugateLinearRegression:
    r"""Closed-form posterior of Bayesian linear regression with known noise.

    Model: ``w ~ N(0, s^2 I)``, ``y | X, w ~ N(X w, sigma^2 I)`` (no intercept),
    with ``s = prior_scale`` and ``sigma = noise``. Posterior ``N(m, Sigma)``:

    .. math::

        \Lambda = X^\top X / \sigma^2 + I / s^2, \quad
        \Sigma = \Lambda^{-1}, \quad
        m = \Sigma X^\top y / \sigma^2 .

    The fully factorized Gaussian ``q`` minimizing ``KL(q || p)`` has mean
    ``m`` and std ``1 / sqrt(Lambda_ii)`` (Bishop 2006, Sec. 10.1.2), which
    never exceeds the exact marginal std ``sqrt(Sigma_ii)``; the ratio
    ``1 / sqrt(Lambda_ii Sigma_ii)`` measures how much mean-field VI (and so
    BBB on this model) underestimates uncertainty. It is 1 exactly when
    ``X^T X`` is diagonal.

    Build one with :meth:`from_data` or :func:`conjugate_linear_regression`.

    Attributes
    ----------
    x : Tensor, shape (n, d)
    y : Tensor, shape (n,)
    noise : float
        Known observation noise std ``sigma``.
    prior_scale : float
        Prior std ``s``.
    posterior_mean : Tensor, shape (d,)
    posterior_cov : Tensor, shape (d, d)
    precision : Tensor, shape (d, d)
    true_weights : Tensor of shape (d,) or None
        The weights that generated ``y`` (synthetic data only).

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> ref = ConjugateLinearRegression.from_data(x, torch.tensor([1.0, 2.0]), noise=1.0)
    >>> ref.posterior_mean
    tensor([0.5000, 0.8000], dtype=torch.float64)
    >>> ref.std_ratio   # orthogonal design: mean-field is exact
    tensor([1., 1.], dtype=torch.float64)
    """

    x: Tensor
    y: Tensor
    noise: float
    prior_scale: float
    posterior_mean: Tensor
    posterior_cov: Tensor
    precision: Tensor
    true_weights: Tensor | None = None

    @classmethod
    def from_data(
        cls,
        x: Tensor,
        y: Tensor,
        *,
        noise: float,
        prior_scale: float = 1.0,
        true_weights: Tensor | None = None,
    ) -> ConjugateLinearRegression:
        """Compute the posterior for inputs ``x`` (n, d) and targets ``y`` (n,).

        Computations run in ``x``'s dtype if it is float64, else in float64.

        Examples
        --------
        >>> import torch
        >>> x = torch.randn(20, 2, generator=torch.Generator().manual_seed(0))
        >>> ref = ConjugateLinearRegression.from_data(x, x.sum(1), noise=0.1)
        >>> ref.posterior_cov.shape
        torch.Size([2, 2])
        """
        noise = positive_float("noise", noise)
        prior_scale = positive_float("prior_scale", prior_scale)
        x = torch.as_tensor(x)
        dtype = x.dtype if x.dtype == torch.float64 else torch.float64
        x, y = x.to(dtype), torch.as_tensor(y).to(dtype)
        if x.ndim != 2 or y.shape != x.shape[:1]:
            raise ValueError(
                f"x must have shape (n, d) and y shape (n,), got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        eye = torch.eye(x.shape[1], dtype=dtype)
        precision = x.T @ x / noise**2 + eye / prior_scale**2
        chol = torch.linalg.cholesky(precision)
        cov = torch.cholesky_inverse(chol)
        cov = (cov + cov.T) / 2
        mean = torch.cholesky_solve((x.T @ y / noise**2).unsqueeze(-1), chol).squeeze(-1)
        return cls(x, y, noise, prior_scale, mean, cov, precision, true_weights)

    @property
    def meanfield_mean(self) -> Tensor:
        """Mean of the optimal mean-field Gaussian: the posterior mean."""
        return self.posterior_mean

    @property
    def meanfield_std(self) -> Tensor:
        """Std of the optimal mean-field Gaussian, ``1 / sqrt(diag Lambda)``."""
        return self.precision.diagonal().rsqrt()

    @property
    def exact_std(self) -> Tensor:
        """Exact posterior marginal std, ``sqrt(diag Sigma)``."""
        return self.posterior_cov.diagonal().sqrt()

    @property
    def std_ratio(self) -> Tensor:
        """``meanfield_std / exact_std = 1 / sqrt(Lambda_ii Sigma_ii) <= 1``."""
        return self.meanfield_std / self.exact_std


def conjugate_linear_regression(
    source: str = "synthetic",
    *,
    n: int = 50,
    d: int = 3,
    noise: float | None = 0.5,
    prior_scale: float = 1.0,
    seed: int = 0,
    correlation: float = 0.0,
    dtype: torch.dtype = torch.float64,
) -> ConjugateLinearRegression:
    r"""Bayesian linear regression data with its exact posterior.

    ``source="synthetic"``: rows of ``X`` are drawn from ``N(0, C)`` with
    ``C_ii = 1`` and ``C_ij = correlation`` (so that mean-field VI has
    correlations to miss; ``correlation=0.8`` gives std ratios well below 1),
    ``w ~ N(0, prior_scale^2 I)`` from the prior, and
    ``y = X w + noise * eps`` with ``eps ~ N(0, I)``; draws come from a private
    ``torch.Generator`` seeded with ``seed``.

    ``source="diabetes"``: scikit-learn's diabetes data (n=442, d=10; ``n`` and
    ``d`` are ignored), features and target standardized (``ddof=0``) over all
    rows. With ``noise=None`` the noise std is the OLS residual std of the
    standardized target, ``sqrt(||y - X b||^2 / (n - d))`` with ``b`` the
    least-squares fit, which is then treated as *known*.

    The posterior is that of :class:`ConjugateLinearRegression`:
    :math:`\Lambda = X^\top X/\sigma^2 + I/s^2`, :math:`\Sigma = \Lambda^{-1}`,
    :math:`m = \Sigma X^\top y/\sigma^2`; the mean-field optimum has std
    :math:`1/\sqrt{\Lambda_{ii}}`.

    Parameters
    ----------
    source : {"synthetic", "diabetes"}
    n, d : int, default 50, 3
        Number of rows and features (synthetic only).
    noise : float or None, default 0.5
        Observation noise std; None is allowed for ``"diabetes"`` only.
    prior_scale : float, default 1.0
    seed : int, default 0
    correlation : float, default 0.0
        Off-diagonal of ``C``, in ``(-1 / (d - 1), 1)`` (synthetic only).
    dtype : torch.dtype, default torch.float64

    Returns
    -------
    ConjugateLinearRegression

    Examples
    --------
    >>> ref = conjugate_linear_regression(correlation=0.8)
    >>> bool((ref.std_ratio < 0.8).all())
    True
    >>> conjugate_linear_regression("diabetes", noise=None).x.shape
    torch.Size([442, 10])
    """
    prior_scale = positive_float("prior_scale", prior_scale)
    if source == "synthetic":
        n, d = positive_int("n", n), positive_int("d", d)
        if noise is None:
            raise ValueError("noise=None (estimate it) is only allowed with source='diabetes'")
        noise = positive_float("noise", noise)
        lower = -1.0 / (d - 1) if d > 1 else -math.inf
        if not (lower < correlation < 1):
            raise ValueError(
                f"correlation must lie in ({lower:.4g}, 1) for d={d} so that the feature "
                f"covariance is positive definite, got {correlation!r}"
            )
        gen = torch.Generator().manual_seed(int(seed))
        cov = torch.full((d, d), float(correlation), dtype=torch.float64)
        cov.fill_diagonal_(1.0)
        z = torch.randn(n, d, generator=gen, dtype=torch.float64)
        x = z @ torch.linalg.cholesky(cov).T
        w = prior_scale * torch.randn(d, generator=gen, dtype=torch.float64)
        y = x @ w + noise * torch.randn(n, generator=gen, dtype=torch.float64)
    elif source == "diabetes":
        bunch = _import_sklearn_datasets().load_diabetes()
        x_np = np.asarray(bunch.data, dtype=np.float64)
        y_np = np.asarray(bunch.target, dtype=np.float64)
        x_np = (x_np - x_np.mean(0)) / x_np.std(0)
        y_np = (y_np - y_np.mean()) / y_np.std()
        if noise is None:
            b = np.linalg.lstsq(x_np, y_np, rcond=None)[0]
            dof = x_np.shape[0] - x_np.shape[1]
            noise = float(np.sqrt(np.sum((y_np - x_np @ b) ** 2) / dof))
        noise = positive_float("noise", noise)
        x, y, w = torch.from_numpy(x_np), torch.from_numpy(y_np), None
    else:
        raise ValueError(f"source must be 'synthetic' or 'diabetes', got {source!r}")
    ref = ConjugateLinearRegression.from_data(
        x, y, noise=noise, prior_scale=prior_scale, true_weights=w
    )
    if dtype != torch.float64:
        for field in ("x", "y", "posterior_mean", "posterior_cov", "precision", "true_weights"):
            value = getattr(ref, field)
            if value is not None:
                setattr(ref, field, value.to(dtype))
    return ref


# ----------------------------------------------------------------------------
# UCI Mushroom (the contextual bandit of Blundell et al. 2015, section 5.3)
# ----------------------------------------------------------------------------

MUSHROOM_ENV = "PYRO_BBB_MUSHROOM"
MUSHROOM_ATTRIBUTES = (
    "cap-shape", "cap-surface", "cap-color", "bruises", "odor", "gill-attachment",
    "gill-spacing", "gill-size", "gill-color", "stalk-shape", "stalk-root",
    "stalk-surface-above-ring", "stalk-surface-below-ring", "stalk-color-above-ring",
    "stalk-color-below-ring", "veil-type", "veil-color", "ring-number", "ring-type",
    "spore-print-color", "population", "habitat",
)
"""The 22 attributes of ``agaricus-lepiota.data`` in file order (column 0 is the class)."""


def load_mushroom(
    path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    return_feature_names: bool = False,
):
    """Load UCI Mushroom (``agaricus-lepiota.data``) as one-hot features and labels.

    Each of the 22 categorical attributes (:data:`MUSHROOM_ATTRIBUTES`) is one-hot
    encoded over the categories that occur in the file, sorted, with the missing
    value ``?`` (2,480 rows of ``stalk-root``) as a category of its own; the constant
    attribute ``veil-type`` is kept as one all-ones column. That gives 117 binary
    features, attribute by attribute in file order: exactly one 1 per attribute
    and row.

    Parameters
    ----------
    path : str or PathLike, optional
        The data file (8,124 rows of 23 comma-separated letters, class first, no
        header).  Default: the environment variable ``PYRO_BBB_MUSHROOM``.
    dtype : torch.dtype
        Floating dtype of the features.
    return_feature_names : bool
        Also return the 117 names ``"attribute=category"``.

    Returns
    -------
    x : Tensor, shape (8124, 117)
        One-hot features (0.0 / 1.0).
    edible : Tensor, shape (8124,), int64
        1 for edible (``e``, 4,208 rows), 0 for poisonous (``p``, 3,916 rows).
    feature_names : list of str
        Only with ``return_feature_names=True``.

    Raises
    ------
    ValueError
        No path given and ``PYRO_BBB_MUSHROOM`` unset, or a malformed file.
    FileNotFoundError
        The file does not exist.

    Examples
    --------
    >>> x, edible = load_mushroom("../shared/data/mushroom/agaricus-lepiota.data")  # doctest: +SKIP
    >>> x.shape, int(edible.sum())  # doctest: +SKIP
    (torch.Size([8124, 117]), 4208)
    """
    if path is None:
        path = os.environ.get(MUSHROOM_ENV)
        if not path:
            raise ValueError(
                f"no Mushroom data: pass path=<.../agaricus-lepiota.data> or set the "
                f"environment variable {MUSHROOM_ENV}"
            )
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "agaricus-lepiota.data"
    if not path.is_file():
        raise FileNotFoundError(
            f"Mushroom data file {str(path)!r} not found (pass path= or set {MUSHROOM_ENV} "
            f"to the UCI file agaricus-lepiota.data)"
        )
    rows = [line.strip().split(",") for line in path.read_text().splitlines() if line.strip()]
    width = 1 + len(MUSHROOM_ATTRIBUTES)
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(f"{str(path)!r} line {i + 1}: {len(row)} columns, expected {width}")
        if row[0] not in ("e", "p"):
            raise ValueError(f"{str(path)!r} line {i + 1}: class {row[0]!r}, expected 'e' or 'p'")
    table = np.array(rows, dtype=object)
    blocks, names = [], []
    for j, attribute in enumerate(MUSHROOM_ATTRIBUTES, start=1):
        column = table[:, j]
        categories = sorted(set(column))
        blocks.append(column[:, None] == np.array(categories, dtype=object)[None, :])
        names += [f"{attribute}={c}" for c in categories]
    x = _to_tensor(np.concatenate(blocks, axis=1).astype(np.float64), dtype)
    edible = torch.as_tensor(table[:, 0] == "e", dtype=torch.int64)
    return (x, edible, names) if return_feature_names else (x, edible)
