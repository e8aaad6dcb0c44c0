"""Convergence diagnostics on the network output f(x*): the one place they are computed.

A BNN's weights are not identifiable (hidden units permute, signs flip), so an HMC
reference is judged on the marginals of ``f(x*)`` at test inputs: rank-normalised split
R-hat and bulk / tail ESS (Vehtari, Gelman, Simpson, Carpenter & Burkner 2021, as
computed by ArviZ), nested R-hat over superchains (Margossian et al. 2024,
:func:`nested_rhat`), summarised by :func:`f_diagnostics` and judged by
:func:`reference_converged` against :data:`RHAT_MAX` (read as printed,
:func:`rhat_passes`) and :data:`ESS_MIN`.  :func:`~pyro_bbb.hmc.run_hmc`,
:func:`pyro_bbb.compare` and the benchmarks all read these.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal

import numpy as np

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # arviz 0.23's refactor notice
    import arviz as az

__all__ = ["ESS_MIN", "RHAT_MAX", "RHAT_PRINT_DIGITS", "convergence_problems", "f_diagnostics",
           "nested_rhat", "reference_converged", "rhat_passes"]

#: Convergence thresholds for the reference (Vehtari et al. 2021): R-hat on f(x*),
#: read as printed (see rhat_passes), and bulk and tail ESS at every test input.
RHAT_MAX = 1.01
ESS_MIN = 400
#: Digits R-hat is printed with in messages; the verdict rounds that printed value.
RHAT_PRINT_DIGITS = 4


def rhat_passes(rhat: float) -> bool:
    """Whether an R-hat passes :data:`RHAT_MAX` as it is read: the value printed with
    :data:`RHAT_PRINT_DIGITS` decimals, rounded half up to the threshold's 2 decimals
    (decimal arithmetic, so 1.0150 reads 1.02 although the binary float 1.015 lies
    just below it).  A value shown as 1.01 passes; NaN (too few draws) fails.

    >>> rhat_passes(1.0101), rhat_passes(1.0149), rhat_passes(1.0150), rhat_passes(float("nan"))
    (True, True, False, False)
    """
    rhat = float(rhat)
    if not math.isfinite(rhat):
        return False
    printed = Decimal(f"{rhat:.{RHAT_PRINT_DIGITS}f}")
    return printed.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP) <= Decimal(str(RHAT_MAX))


def nested_rhat(draws: np.ndarray, num_superchains: int) -> np.ndarray:
    """Nested R-hat (Margossian, Hoffman, Sountsov, Riou-Durand, Vehtari & Gelman 2024).

    ``draws`` has shape ``(chains, draws, ...)``; consecutive chains form
    ``num_superchains`` superchains of equal size.  ``nR = sqrt(1 + B / W)`` with ``B``
    the variance of the superchain means and ``W`` the mean over superchains of the
    between-chain variance within the superchain plus the mean within-chain variance.
    Values near 1 (below ~1.01-1.05) mean the superchains agree.

    >>> rng = np.random.default_rng(0)
    >>> float(nested_rhat(rng.normal(size=(64, 100)), 8)) < 1.01
    True
    """
    draws = np.asarray(draws, dtype=np.float64)
    c, n = draws.shape[:2]
    k = int(num_superchains)
    if k < 2 or c % k:
        raise ValueError(f"num_superchains must be >= 2 and divide the {c} chains, got {k}")
    m = c // k
    x = draws.reshape((k, m, n) + draws.shape[2:])
    chain_mean = x.mean(2)  # (k, m, ...)
    super_mean = chain_mean.mean(1)  # (k, ...)
    b = super_mean.var(0, ddof=1)
    within_chain = x.var(2, ddof=1).mean(1) if n > 1 else 0.0
    between_chain = chain_mean.var(1, ddof=1) if m > 1 else 0.0
    w = (between_chain + within_chain).mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(1.0 + b / w)


def f_diagnostics(f: np.ndarray, num_superchains: int) -> dict:
    """R-hat, nested R-hat, bulk/tail ESS of f(x*) of shape (chains, draws, ...), and
    their summaries (NaN where a run is too short to tell).

    Keys: ``rhat_f`` (rank-normalised split R-hat), ``ess_bulk_f``, ``ess_tail_f``,
    each an array over the test points, and ``max_rhat_f``, ``min_ess_bulk_f``,
    ``min_ess_tail_f``, ``median_ess_bulk_f``; with ``num_superchains`` (>= 2, dividing
    the chains; 0 for none) also ``nested_rhat_f`` and ``max_nested_rhat_f``.

    >>> rng = np.random.default_rng(0)
    >>> d = f_diagnostics(rng.normal(size=(4, 500, 3)), 2)
    >>> d["max_rhat_f"] < 1.01, d["min_ess_bulk_f"] > 1000, reference_converged(d)
    (True, True, True)
    """
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # "More chains than draws" is ArviZ's guess at a transposed array; many short
        # chains are exactly what this sampler makes.
        warnings.simplefilter("ignore")
        data = az.convert_to_dataset({"f": f})
        out = {
            "rhat_f": np.asarray(az.rhat(data)["f"].values),
            "ess_bulk_f": np.asarray(az.ess(data, method="bulk")["f"].values),
            "ess_tail_f": np.asarray(az.ess(data, method="tail")["f"].values),
        }
        if num_superchains:
            out["nested_rhat_f"] = nested_rhat(f, num_superchains)

        def reduce(fn, a):
            a = np.asarray(a, dtype=np.float64)
            return float(fn(a)) if np.isfinite(a).any() else math.nan

        out["max_rhat_f"] = reduce(np.nanmax, out["rhat_f"])
        out["min_ess_bulk_f"] = reduce(np.nanmin, out["ess_bulk_f"])
        out["min_ess_tail_f"] = reduce(np.nanmin, out["ess_tail_f"])
        out["median_ess_bulk_f"] = reduce(np.nanmedian, out["ess_bulk_f"])
        if num_superchains:
            out["max_nested_rhat_f"] = reduce(np.nanmax, out["nested_rhat_f"])
    return out


def reference_converged(diagnostics: Mapping) -> bool:
    """The reference check on f(x*): max R-hat passes :data:`RHAT_MAX`
    as printed (:func:`rhat_passes`) and bulk and tail ESS reach
    :data:`ESS_MIN` at every test input.  Divergences are reported
    apart (``diagnostics["divergences"]``): more draws do not remove them.

    >>> reference_converged({"max_rhat_f": 1.0101, "min_ess_bulk_f": 450.0,
    ...                      "min_ess_tail_f": 410.0})
    True
    """
    return (rhat_passes(diagnostics["max_rhat_f"])
            and diagnostics["min_ess_bulk_f"] >= ESS_MIN
            and diagnostics["min_ess_tail_f"] >= ESS_MIN)


def convergence_problems(diagnostics: Mapping) -> list[str]:
    """What fails the reference check, one phrase per failure: R-hat as printed, bulk
    and tail ESS, and divergences where ``diagnostics`` counts them; ``[]`` if none.

    >>> convergence_problems({"max_rhat_f": 1.0234, "min_ess_bulk_f": 120.4,
    ...                       "min_ess_tail_f": 410.0, "divergences": 2})
    ['max R-hat 1.0234 > 1.01', 'min bulk ESS 120 < 400', '2 divergent transitions']
    """
    max_rhat, divergences = diagnostics["max_rhat_f"], diagnostics.get("divergences")
    problems = []
    if not rhat_passes(max_rhat):
        problems.append(f"max R-hat {max_rhat:.{RHAT_PRINT_DIGITS}f} > {RHAT_MAX}")
    for kind in ("bulk", "tail"):
        ess = diagnostics[f"min_ess_{kind}_f"]
        if not ess >= ESS_MIN:  # floored, so that 399.6 does not read "400 < 400"
            shown = math.floor(ess) if math.isfinite(ess) else ess
            problems.append(f"min {kind} ESS {shown} < {ESS_MIN}")
    if divergences:
        problems.append(f"{divergences} divergent transition{'s' if divergences > 1 else ''}")
    return problems
