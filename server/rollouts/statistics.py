"""The statistics behind the rollout gates, on what devices send: histograms and counts, never raw data.

Every function is pure (numpy only, no scipy at run time). What each one computes and assumes:

**Mann-Whitney U on two histograms over the same bins** (`mann_whitney_greater`). The bins are ordered
(latency buckets); every observation in bin k ranks above every observation in a lower bin and ties with the
others in bin k. With canary counts a_k, control counts b_k, n1 = sum a, n2 = sum b, N = n1 + n2:

    U = sum_k a_k * (b_<k + b_k / 2)          (b_<k: control observations in the bins below k)
    effect = U / (n1 n2) = P(canary > control) + 0.5 P(tie)      (0.5 = no difference)
    mean = n1 n2 / 2,  variance = n1 n2 / 12 * ((N + 1) - sum_k (t_k^3 - t_k) / (N (N - 1))),  t_k = a_k + b_k
    z = (U - mean - 0.5) / sqrt(variance),    p = P(Z >= z)   (one-sided: "canary slower")

the grouped-data form with the tie correction, the normal approximation and a continuity correction of 1/2;
it equals `scipy.stats.mannwhitneyu(x, y, alternative="greater", method="asymptotic")` on the expanded
samples.
Assumes independent observations: calls on one device are correlated (same scene, same hardware), so the gates
also keep a floor on the number of devices per side. With millions of calls any difference is "significant",
which is why latency is tested against a tolerance band, not against equality.

**Tolerance band** (`scale_histogram`). "The canary is more than T slower" is tested as "the canary is
stochastically slower than the control with every latency multiplied by (1 + T)": the control histogram is
rescaled to the histogram of (1 + T) x control over the same bounds, and the one-sided rank test runs against
that. The rescaled cumulative count at bound b is the control's cumulative count at b / (1 + T), interpolated
linearly inside a bucket (uniform density within a bucket; the first bucket starts at 0; mass in the open last
bucket stays there, which is exact because (1 + T) x > x). Properties the gates rely on:

- for T >= 0 the rescaled control is never faster than the control, bound by bound, so when canary and control
  come from one distribution (or the canary is faster) the false-alarm rate is at most the plain test's;
- T = 0 is the plain test;
- the band's edge is only as sharp as the buckets: a slowdown that stays inside one bucket is seen only
  through the uniform-density assumption, so "1.2x" means "about 1.2x" at the resolution of the bounds.

In simulations of log-normal latencies (sigma 0.2-1 in log space, medians 1.5-30 ms, 200,000 calls a side)
a canary exactly 1.2x slower scored an effect of 0.39-0.49 against the 1.2x band (0.5 = on the edge): the
uniform assumption errs on the side of passing near the edge. The effective edge of a 20 % band lay between
1.2x and 1.5x, the widest for the narrowest distribution (nearly all calls in one 2.5x-wide bucket), where a
1.5x slowdown is only just detectable. A log-uniform assumption was closer on average but crossed 0.5 (a false
alarm at the edge, given enough calls), so it was not taken.

**Percentiles** (`histogram_quantile`): the q-th observation by rank, interpolated linearly inside its bucket
(as Prometheus' `histogram_quantile`, and the same assumption as the band); a rank in the open last bucket
returns the last finite bound, i.e. a lower bound ("at least 1000 ms"). A percentile is known only to within
its bucket, and the agent's buckets are 2-2.5x wide: for a narrow distribution the estimate can be off by
tens of percent inside the right bucket. They are evidence for the operator; no gate decides on them alone.

**Population stability index** (`population_stability_index`): sum_i (p_i - q_i) ln(p_i / q_i) over the
proportions of two count vectors (canary p, control q). Empty bins would make it infinite, so both proportion
vectors are smoothed: (share + 1e-4) / (1 + K 1e-4) (`PSI_SMOOTHING`, about one call in 10,000). Usual bands:
< 0.1 stable, 0.1-0.25 moderate, > 0.25 a significant shift. With finite samples from one distribution its
expected value is about (K - 1)(1/n1 + 1/n2) (`expected_null_psi`).

**Jensen-Shannon distance** (`jensen_shannon_distance`): sqrt of (KL(p || m) + KL(q || m)) / 2 in bits,
m = (p + q) / 2, so it lies in [0, 1]. It is finite with empty bins, so no smoothing is applied (it equals
`scipy.spatial.distance.jensenshannon(p, q, base=2)`). Expected value from one distribution: about
sqrt((K - 1)(1/n1 + 1/n2) / (8 ln 2)) (`expected_null_js_distance`).

**Error rates** (`wilson_bounds`, `rate_increase_lower_bound`): Wilson score bounds for one proportion and
Newcombe's hybrid score bound for the difference of two (canary minus control): with l1 the canary's Wilson
lower bound and u2 the control's upper bound at the same one-sided confidence,

    lower bound of p1 - p2 = (p1 - p2) - sqrt((p1 - l1)^2 + (u2 - p2)^2)

Chosen over the two-proportion z-test because error counts are small (0.5 % of a few thousand calls): the
Wilson bounds stay inside [0, 1] and keep close to their nominal coverage with zero errors on one side, where
the z-test's variance estimate collapses. Assumes independent calls (see above).

**Rates per device-hour** (`poisson_rate_greater`): crashes and worker restarts as Poisson counts over
exposure (device-hours). Given c = c1 + c2 events, under "canary rate = R x control rate" the canary's share
is Binomial(c, R t1 / (R t1 + t2)); the one-sided p-value is P(X >= c1), computed exactly (normal
approximation with continuity correction above 100,000 events). R = 1 tests for any increase. Exact tests
on discrete counts are conservative: the false-alarm rate is at most the nominal one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]

PSI_SMOOTHING = 1e-4  # added to every share before PSI's logarithm; about one call in 10,000
EXACT_BINOMIAL_MAX_EVENTS = 100_000  # above this the Poisson comparison uses the normal approximation

_NORMAL = NormalDist()


def normal_sf(z: float) -> float:
    """P(Z >= z) for a standard normal Z, accurate in the far tail (erfc, not 1 - cdf)."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def normal_quantile(p: float) -> float:
    """The z with P(Z <= z) = p. Raises ValueError unless 0 < p < 1."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"a probability strictly between 0 and 1 is needed, not {p}")
    return _NORMAL.inv_cdf(p)


def as_counts(counts: ArrayLike, what: str = "counts") -> FloatArray:
    """A 1-D float array of finite, non-negative counts. Raises ValueError otherwise."""
    array = np.asarray(counts, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D sequence")
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError(f"{what} must be finite and non-negative")
    return array


def _same_bins(a: ArrayLike, b: ArrayLike) -> tuple[FloatArray, FloatArray]:
    first, second = as_counts(a, "canary counts"), as_counts(b, "control counts")
    if first.shape != second.shape:
        raise ValueError(f"histograms over different bins: {first.size} and {second.size} counts")
    return first, second


# --- rank test ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankTest:
    """A one-sided Mann-Whitney U test of "canary slower" (see the module docstring)."""

    u: float  # the canary's U: pairs where the canary is slower, plus half the ties
    z: float
    p_value: float
    effect: float  # U / (n1 n2) = P(canary > control) + 0.5 P(tie); 0.5 = no difference
    canary_n: float
    control_n: float


def mann_whitney_greater(canary: ArrayLike, control: ArrayLike, *, continuity: bool = True) -> RankTest:
    """Mann-Whitney U of two histograms over the same ordered bins, alternative "canary greater".

    Counts may be fractional (a rescaled histogram). Raises ValueError on mismatched bins or an empty side.
    """
    a, b = _same_bins(canary, control)
    n1, n2 = float(a.sum()), float(b.sum())
    if n1 <= 0 or n2 <= 0:
        raise ValueError("both histograms need observations")
    control_below = np.cumsum(b) - b
    u = float(np.dot(a, control_below + 0.5 * b))
    n = n1 + n2
    ties = a + b
    tie_term = float(np.sum(ties**3 - ties)) / (n * (n - 1)) if n > 1 else 0.0
    variance = n1 * n2 / 12.0 * ((n + 1) - tie_term)
    numerator = u - n1 * n2 / 2.0 - (0.5 if continuity else 0.0)
    if variance <= 1e-12 * n1 * n2:  # every observation in one bin: no evidence either way
        z, p_value = 0.0, 1.0
    else:
        z = numerator / math.sqrt(variance)
        p_value = normal_sf(z)
    return RankTest(u=u, z=z, p_value=p_value, effect=u / (n1 * n2), canary_n=n1, control_n=n2)


def _bucket_edges(counts: FloatArray, upper_bounds: ArrayLike) -> FloatArray:
    bounds = np.asarray(upper_bounds, dtype=np.float64)
    if bounds.ndim != 1 or counts.size != bounds.size + 1:
        raise ValueError(f"{counts.size} counts need {counts.size - 1} upper bounds, not {bounds.size}")
    if bounds.size and (bounds[0] <= 0 or np.any(np.diff(bounds) <= 0)):
        raise ValueError("upper bounds must be positive and increasing")
    return bounds


def scale_histogram(counts: ArrayLike, upper_bounds: ArrayLike, factor: float) -> FloatArray:
    """The histogram of factor x X over the same bounds, for X with `counts` (the last bucket is open).

    Uniform density within a bucket, the first bucket starting at 0 (module docstring, "Tolerance band").
    The total is preserved. Raises ValueError for factor < 1 (the open bucket's contents are unknown).
    """
    c = as_counts(counts)
    bounds = _bucket_edges(c, upper_bounds)
    if not factor >= 1.0:
        raise ValueError(f"only a slowdown factor >= 1 can be applied, not {factor}")
    edges = np.concatenate(([0.0], bounds))
    cumulative = np.concatenate(([0.0], np.cumsum(c[:-1])))  # count at or below each edge
    scaled_cumulative = np.interp(bounds / factor, edges, cumulative)
    return np.diff(np.concatenate(([0.0], scaled_cumulative, [float(c.sum())])))


def exceedance(counts: ArrayLike, upper_bounds: ArrayLike, threshold: float) -> float:
    """How many observations lie above `threshold`, interpolating linearly inside its bucket."""
    c = as_counts(counts)
    bounds = _bucket_edges(c, upper_bounds)
    if threshold >= bounds[-1]:
        return float(c[-1]) if threshold == bounds[-1] else math.nan
    edges = np.concatenate(([0.0], bounds))
    cumulative = np.concatenate(([0.0], np.cumsum(c[:-1])))
    return float(c.sum() - np.interp(threshold, edges, cumulative))


def histogram_quantile(counts: ArrayLike, upper_bounds: ArrayLike, q: float) -> float:
    """The q-quantile (0 <= q <= 1), linear inside its bucket; the last finite bound if it is in the open one.

    Raises ValueError on an empty histogram or q outside [0, 1].
    """
    c = as_counts(counts)
    bounds = _bucket_edges(c, upper_bounds)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} is outside [0, 1]")
    total = float(c.sum())
    if total <= 0:
        raise ValueError("an empty histogram has no quantiles")
    rank = q * total
    cumulative = np.cumsum(c)
    k = int(np.searchsorted(cumulative, rank, side="left"))
    while k < c.size - 1 and c[k] == 0:  # rank exactly at a bucket's top: skip empty buckets above
        k += 1
    if k >= bounds.size:
        return float(bounds[-1])
    low = 0.0 if k == 0 else float(bounds[k - 1])
    high = float(bounds[k])
    below = float(cumulative[k] - c[k])
    fraction = (rank - below) / float(c[k]) if c[k] > 0 else 1.0
    return low + (high - low) * min(max(fraction, 0.0), 1.0)


# --- distribution drift ---------------------------------------------------------------------------------


def _shares(counts: FloatArray) -> FloatArray:
    total = float(counts.sum())
    if total <= 0:
        raise ValueError("an empty histogram has no distribution")
    return counts / total


def population_stability_index(canary: ArrayLike, control: ArrayLike) -> float:
    """PSI of the canary's distribution against the control's, smoothed by `PSI_SMOOTHING`."""
    a, b = _same_bins(canary, control)
    k = a.size
    p = (_shares(a) + PSI_SMOOTHING) / (1.0 + k * PSI_SMOOTHING)
    q = (_shares(b) + PSI_SMOOTHING) / (1.0 + k * PSI_SMOOTHING)
    return float(np.sum((p - q) * np.log(p / q)))


def jensen_shannon_distance(canary: ArrayLike, control: ArrayLike) -> float:
    """Jensen-Shannon distance in bits (in [0, 1]); no smoothing is needed."""
    a, b = _same_bins(canary, control)
    p, q = _shares(a), _shares(b)
    m = 0.5 * (p + q)

    def kl_to_m(x: FloatArray) -> float:
        used = x > 0
        return float(np.sum(x[used] * np.log2(x[used] / m[used])))

    return math.sqrt(max(0.0, 0.5 * kl_to_m(p) + 0.5 * kl_to_m(q)))


def _used_bins(a: FloatArray, b: FloatArray) -> int:
    return int(np.count_nonzero((a + b) > 0))


def expected_null_psi(canary: ArrayLike, control: ArrayLike) -> float:
    """PSI expected from sampling noise alone if both came from one distribution: (K - 1)(1/n1 + 1/n2)."""
    a, b = _same_bins(canary, control)
    return max(_used_bins(a, b) - 1, 0) * (1.0 / float(a.sum()) + 1.0 / float(b.sum()))


def expected_null_js_distance(canary: ArrayLike, control: ArrayLike) -> float:
    """JS distance expected from sampling noise alone: sqrt((K - 1)(1/n1 + 1/n2) / (8 ln 2))."""
    a, b = _same_bins(canary, control)
    noise = max(_used_bins(a, b) - 1, 0) * (1.0 / float(a.sum()) + 1.0 / float(b.sum()))
    return math.sqrt(noise / (8.0 * math.log(2.0)))


# --- proportions ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    """One-sided confidence bounds, each holding with the stated confidence on its own."""

    lower: float
    upper: float


def wilson_bounds(successes: float, trials: float, confidence: float) -> Bounds:
    """Wilson score bounds for a proportion. Raises ValueError if trials <= 0 or successes > trials."""
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials > 0, got {successes}/{trials}")
    z = normal_quantile(confidence)
    p = successes / trials
    denominator = 1.0 + z * z / trials
    centre = (p + z * z / (2.0 * trials)) / denominator
    half = z / denominator * math.sqrt(p * (1.0 - p) / trials + z * z / (4.0 * trials * trials))
    return Bounds(lower=max(0.0, centre - half), upper=min(1.0, centre + half))


def rate_increase_lower_bound(
    canary_events: float,
    canary_trials: float,
    control_events: float,
    control_trials: float,
    confidence: float,
) -> float:
    """Newcombe's hybrid score lower bound of (canary rate - control rate) at one-sided `confidence`."""
    p1 = canary_events / canary_trials if canary_trials > 0 else math.nan
    p2 = control_events / control_trials if control_trials > 0 else math.nan
    l1 = wilson_bounds(canary_events, canary_trials, confidence).lower
    u2 = wilson_bounds(control_events, control_trials, confidence).upper
    return (p1 - p2) - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)


# --- rates per exposure ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RateComparison:
    """A one-sided Poisson comparison "canary rate > tolerance_ratio x control rate"."""

    canary_rate: float  # events per unit of exposure
    control_rate: float
    rate_ratio: float  # canary / control; inf when only the canary has events, nan when neither has
    p_value: float


def binomial_upper_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed exactly in log space (normal approximation for huge n)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    if n > EXACT_BINOMIAL_MAX_EVENTS:
        sd = math.sqrt(n * p * (1.0 - p))
        return normal_sf((k - 0.5 - n * p) / sd)
    j = np.arange(k, n + 1, dtype=np.float64)
    # log C(n, j) from log C(n, k) by the ratio C(n, j + 1) / C(n, j) = (n - j) / (j + 1)
    first = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
    steps = np.log((n - j[:-1]) / (j[:-1] + 1.0))
    log_choose = first + np.concatenate(([0.0], np.cumsum(steps)))
    log_terms = log_choose + j * math.log(p) + (n - j) * math.log1p(-p)
    peak = float(log_terms.max())
    return min(1.0, math.exp(peak) * float(np.sum(np.exp(log_terms - peak))))


def poisson_rate_greater(
    canary_events: int,
    canary_exposure: float,
    control_events: int,
    control_exposure: float,
    tolerance_ratio: float = 1.0,
) -> RateComparison:
    """Conditional (binomial) test of "canary rate > tolerance_ratio x control rate" for Poisson counts.

    Raises ValueError on non-positive exposure, negative counts or a tolerance ratio <= 0.
    """
    if canary_exposure <= 0 or control_exposure <= 0:
        raise ValueError("both sides need a positive exposure")
    if canary_events < 0 or control_events < 0:
        raise ValueError("event counts cannot be negative")
    if tolerance_ratio <= 0:
        raise ValueError("the tolerance ratio must be positive")
    canary_rate = canary_events / canary_exposure
    control_rate = control_events / control_exposure
    if control_events > 0:
        ratio = canary_rate / control_rate
    else:
        ratio = math.inf if canary_events > 0 else math.nan
    weighted = tolerance_ratio * canary_exposure
    p_value = binomial_upper_tail(
        canary_events, canary_events + control_events, weighted / (weighted + control_exposure)
    )
    return RateComparison(
        canary_rate=canary_rate, control_rate=control_rate, rate_ratio=ratio, p_value=p_value
    )
