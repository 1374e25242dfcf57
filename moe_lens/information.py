"""Information measures of a contingency table (rows: attribute values A, columns: experts E), in nats.

For counts n_ve with row sums a_v, column sums b_e and N = sum n_ve:
  H(E) = -sum_e b_e/N ln(b_e/N),  H(A) likewise,  I(E; A) = sum n_ve/N ln(n_ve N / (a_v b_e))   (plug-in)
  nmi               = I / ((H(E) + H(A)) / 2)      arithmetic-mean normaliser, in [0, 1]
  uncertainty_coef  = I / H(E)                     Theil's U of E given A; rewards a collapsed router (small H(E))
  emi               = E[I] over uniformly random permutations of A against E, marginals kept (the exact
                      hypergeometric sum of Vinh, Epps & Bailey 2010, "Information theoretic measures for
                      clusterings comparison", eq. 24a), so `nmi_chance` = emi / ((H(E) + H(A)) / 2) is the
                      exact expected NMI under permutation
  ami               = (I - emi) / ((H(E) + H(A)) / 2 - emi)   (0 at chance, 1 for identical partitions)
These equal scikit-learn's `mutual_info_score`, `normalized_mutual_info_score` and
`adjusted_mutual_info_score` (average_method="arithmetic"), including their edge cases, to ~1e-12.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.special import gammaln

_EPS = np.finfo(np.float64).eps


class Scores(NamedTuple):
    rows: int  # N
    h_expert: float  # H(E)
    h_value: float  # H(A)
    mi: float  # I(E; A)
    nmi: float
    uncertainty_coef: float
    ami: float
    nmi_chance: float


def entropy(counts: np.ndarray) -> float:
    """H = -sum p ln p of the counts' distribution (0 ln 0 = 0; 0 for an empty or one-cell vector)."""
    c = np.asarray(counts, dtype=np.float64).ravel()
    c = c[c > 0]
    if c.size <= 1:
        return 0.0
    p = c / c.sum()
    return float(-(p * np.log(p)).sum())


def mutual_info(table: np.ndarray) -> float:
    """I(E; A) of a (values, experts) count table, clipped at 0 like scikit-learn."""
    c = np.asarray(table, dtype=np.float64)  # (v, e)
    n = c.sum()
    if n == 0:
        return 0.0
    a, b = c.sum(1, keepdims=True), c.sum(0, keepdims=True)  # (v, 1), (1, e)
    nz = c > 0
    return max(float((c[nz] / n * np.log(c[nz] * n / (a @ b)[nz])).sum()), 0.0)


def normalized_mutual_info(table: np.ndarray) -> float:
    """nmi alone (no expected MI): I / ((H(E) + H(A)) / 2), scikit-learn's conventions."""
    c = np.asarray(table, dtype=np.float64)  # (v, e)
    a, b = c.sum(1), c.sum(0)
    if int((a > 0).sum()) == int((b > 0).sum()) <= 1:
        return 1.0
    mi = mutual_info(c)
    return mi / ((entropy(a) + entropy(b)) / 2) if mi > 0 else 0.0


def expected_mutual_info(a: np.ndarray, b: np.ndarray) -> float:
    """Exact E[I] under permutation for row sums `a` and column sums `b` (Vinh et al. 2010, eq. 24a).

    Vectorised over (row, column, n_ij) triples; n_ij is summed only within mean +- (12 s + 12), s the sd of the
    binomial with the same mean (>= the hypergeometric one). Outside, Bernstein's inequality (which holds for
    sampling without replacement, Hoeffding 1963), exp(-t^2 / (2 (s^2 + t / 3))) at t = 12 s + 12, bounds the
    probability by 2 e^-31, far below the 1e-9 agreement with scikit-learn's full sum that the tests check
    (the window was 30 s + 30; 12 makes bootstrap's 200 AMIs per group 2.5x faster).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a, b = a[a > 0], b[b > 0]
    n = a.sum()
    if a.size <= 1 or b.size <= 1 or n <= 1:
        return 0.0
    ai, bj = np.repeat(a, b.size), np.tile(b, a.size)  # (v e,) each pair
    mean = ai * bj / n
    sd = np.sqrt(mean * (1 - bj / n))  # binomial sd, an upper bound on the hypergeometric one
    lo = np.maximum(np.maximum(1.0, ai + bj - n), np.floor(mean - 12 * sd - 12))
    hi = np.minimum(np.minimum(ai, bj), np.ceil(mean + 12 * sd + 12))
    length = np.maximum(hi - lo + 1, 0).astype(np.int64)  # (v e,)
    # ln k! by table lookup when the counts are integers (always, for counts): gammaln on the (m,) terms was
    # most of the time; the values are the same gammaln(k + 1) either way.
    table = gammaln(np.arange(int(n) + 2, dtype=np.float64) + 1) if n == int(n) and n < 5e7 \
        and np.all(a == np.round(a)) and np.all(b == np.round(b)) else None
    lf = (lambda k: table[k.astype(np.int64)]) if table is not None else (lambda k: gammaln(k + 1))  # ln k!
    g = lf(ai) + lf(bj) + lf(n - ai) + lf(n - bj) - lf(np.float64(n))  # (v e,)
    r = np.log(n) - np.log(ai) - np.log(bj)  # (v e,) ln(N / (a b))
    pair = np.repeat(np.arange(ai.size), length)  # (m,)
    nij = lo[pair] + (np.arange(pair.size) - np.repeat(np.cumsum(length) - length, length))  # (m,)
    x, y = ai[pair], bj[pair]
    log_p = g[pair] - (lf(nij) + lf(x - nij) + lf(y - nij) + lf(n - x - y + nij))
    term = nij / n * (r[pair] + np.log(nij))  # n_ij/N ln(N n_ij / (a b))
    return float((term * np.exp(log_p)).sum())


def _signed_floor(x: float) -> float:
    """x moved away from 0 to at least machine epsilon, keeping its sign (scikit-learn's guard of AMI's 0/0)."""
    return min(x, -_EPS) if x < 0 else max(x, _EPS)


def scores(table: np.ndarray) -> Scores:
    """Every measure of the module docstring for one (values, experts) count table."""
    c = np.asarray(table, dtype=np.float64)  # (v, e)
    a, b = c.sum(1), c.sum(0)
    h_e, h_a, mi = entropy(b), entropy(a), mutual_info(c)
    used_a, used_e = int((a > 0).sum()), int((b > 0).sum())
    mean_h = (h_e + h_a) / 2
    if used_a == used_e == 1 or used_a == used_e == 0:  # scikit-learn: two trivial partitions agree perfectly
        nmi = ami = chance = 1.0
    else:
        emi = expected_mutual_info(a, b)
        nmi = normalized_mutual_info(c)
        chance = emi / mean_h
        ami = 0.0 if min(used_a, used_e) == 1 else _signed_floor(mi - emi) / _signed_floor(mean_h - emi)
    unc = mi / h_e if h_e > 0 else float("nan")
    return Scores(int(c.sum()), h_e, h_a, mi, float(nmi), float(unc), float(ami), float(chance))


# --- the same measures for a batch of tables (bootstrap replicates) ----------------------------------------------

_LNFACT = _LNK = np.zeros(2)  # ln k! and ln k for k < len, grown on demand (gammaln(k + 1) as expected_mutual_info)


def _ln_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(ln k!, ln k) for k = 0 .. at least n + 1 (ln 0 taken as 0, never used), kept between calls."""
    global _LNFACT, _LNK
    if _LNFACT.size < n + 2:
        k = np.arange(max(n + 2, 2 * _LNFACT.size), dtype=np.float64)
        _LNFACT, _LNK = gammaln(k + 1), np.log(np.maximum(k, 1.0))
    return _LNFACT, _LNK


def entropies(counts: np.ndarray) -> np.ndarray:
    """(n,) `entropy` of each row of (n, k) counts."""
    c = np.asarray(counts, dtype=np.float64)
    tot = c.sum(1, keepdims=True)
    p = c / np.where(tot > 0, tot, 1.0)
    h = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(1)
    return np.where((c > 0).sum(1) <= 1, 0.0, h)


def mutual_infos(tables: np.ndarray) -> np.ndarray:
    """(n,) `mutual_info` of each (values, experts) table of (n, v, e) counts."""
    c = np.asarray(tables, dtype=np.float64)
    n = c.sum((1, 2))[:, None, None]
    ab = c.sum(2, keepdims=True) * c.sum(1, keepdims=True)  # (n, v, e) a_v b_e
    nz = c > 0
    safe = np.where(nz, c * n / np.where(nz, ab, 1.0), 1.0)
    mi = np.where(nz, c / np.where(n > 0, n, 1.0) * np.log(safe), 0.0).sum((1, 2))
    return np.maximum(mi, 0.0)


def expected_mutual_infos(a: np.ndarray, b: np.ndarray, max_terms: int = 1 << 15) -> np.ndarray:
    """(n,) `expected_mutual_info` of row sums a (n, v) and column sums b (n, e), all replicates at once: the
    same terms (same window, same ln k! values), laid out as (pairs, window) blocks of about `max_terms` cells,
    pairs sorted by window length so that little is padding, each block small enough to stay in the CPU cache."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    reps = a.shape[0]
    tot = a.sum(1)  # (n,)
    ok = ((a > 0).sum(1) > 1) & ((b > 0).sum(1) > 1) & (tot > 1)
    out = np.zeros(reps)
    if not ok.any():
        return out
    if not (np.all(a == np.round(a)) and np.all(b == np.round(b)) and tot.max() < 5e7):
        for k in np.flatnonzero(ok):  # non-integer counts: gammaln, one table at a time
            out[k] = expected_mutual_info(a[k], b[k])
        return out
    lnf, lnk = _ln_tables(int(tot.max()))  # ln k!, ln k
    rep, vi, ej = np.nonzero(ok[:, None, None] & (a[:, :, None] > 0) & (b[:, None, :] > 0))  # the pairs summed
    ai, bj, n = a[rep, vi], b[rep, ej], tot[rep]  # (p,) each (row, column) pair of each replicate
    mean = ai * bj / n
    sd = np.sqrt(mean * (1 - bj / n))
    lo = np.maximum(np.maximum(1.0, ai + bj - n), np.floor(mean - 12 * sd - 12))
    hi = np.minimum(np.minimum(ai, bj), np.ceil(mean + 12 * sd + 12))
    length = np.maximum(hi - lo + 1, 0).astype(np.int64)
    ia, ib, itot, ilo, ihi = (v.astype(np.int64) for v in (ai, bj, n, lo, hi))
    g = lnf[ia] + lnf[ib] + lnf[itot - ia] + lnf[itot - ib] - lnf[itot]  # (p,)
    r = np.log(n) - np.log(ai) - np.log(bj)  # ln(N / (a b))
    rest = itot - ia - ib
    per_pair = np.zeros(ai.size)
    order = np.argsort(length, kind="stable")
    start, size = int(np.searchsorted(length[order], 1)), order.size  # windows of length 0 add nothing
    while start < size:
        rows = max(1, max_terms // int(length[order[start]]))
        while rows > 1 and rows * int(length[order[min(start + rows, size) - 1]]) > 2 * max_terms:
            rows //= 2
        idx = order[start:start + rows]
        width = int(length[idx[-1]])  # sorted: the block's longest window
        k = np.minimum(ilo[idx, None] + np.arange(width), ihi[idx, None])  # (rows, width) n_ij, padding clipped
        log_p = g[idx, None] - (lnf[k] + lnf[ia[idx, None] - k] + lnf[ib[idx, None] - k] + lnf[rest[idx, None] + k])
        term = k * (r[idx, None] + lnk[k]) * np.exp(log_p)  # N x (n_ij/N ln(N n_ij / (a b)) P(n_ij))
        term[np.arange(width) >= length[idx, None]] = 0.0  # the padding
        per_pair[idx] = term.sum(1)
        start += rows
    return np.bincount(rep, weights=per_pair / n, minlength=reps)


def scores_batch(tables: np.ndarray) -> dict[str, np.ndarray]:
    """`scores` of each (values, experts) table of (n, v, e) counts, as arrays (n,): rows, h_expert, h_value, mi,
    nmi, uncertainty_coef, ami, nmi_chance (the same edge cases; bootstrap's replicates in one call)."""
    c = np.asarray(tables, dtype=np.float64)
    a, b = c.sum(2), c.sum(1)  # (n, v), (n, e)
    h_e, h_a, mi = entropies(b), entropies(a), mutual_infos(c)
    used_a, used_e = (a > 0).sum(1), (b > 0).sum(1)
    mean_h = (h_e + h_a) / 2
    trivial = (used_a == used_e) & (used_a <= 1)
    emi = expected_mutual_infos(np.where(trivial[:, None], 0.0, a), np.where(trivial[:, None], 0.0, b))
    with np.errstate(divide="ignore", invalid="ignore"):
        nmi = np.where(mi > 0, mi / mean_h, 0.0)
        chance = emi / mean_h
        num, den = mi - emi, mean_h - emi
        num = np.where(num < 0, np.minimum(num, -_EPS), np.maximum(num, _EPS))
        den = np.where(den < 0, np.minimum(den, -_EPS), np.maximum(den, _EPS))
        ami = np.where(np.minimum(used_a, used_e) == 1, 0.0, num / den)
        unc = np.where(h_e > 0, mi / np.where(h_e > 0, h_e, 1.0), np.nan)
    nmi, ami, chance = (np.where(trivial, 1.0, v) for v in (nmi, ami, chance))
    return {"rows": c.sum((1, 2)).astype(np.int64), "h_expert": h_e, "h_value": h_a, "mi": mi, "nmi": nmi,
            "uncertainty_coef": unc, "ami": ami, "nmi_chance": chance}
