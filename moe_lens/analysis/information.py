"""Information scores of a contingency table: MI, arithmetic NMI and AMI, as scikit-learn defines them.

For counts n_ab (N = sum n_ab, a_i, b_j the margins), in nats:
  I = sum n_ab/N ln(N n_ab / (a_i b_j)),  H(A) = -sum a_i/N ln(a_i/N),
  NMI = I / ((H(A) + H(B)) / 2)          (sklearn `normalized_mutual_info_score`, average_method='arithmetic')
  AMI = (I - E[I]) / ((H(A) + H(B)) / 2 - E[I])                                    (Vinh et al. 2010)
with E[I] the expected MI of two labelings with these margins under random permutation (hypergeometric):
  E[I] = sum_ij sum_{n=max(1, a_i+b_j-N)}^{min(a_i, b_j)} n/N ln(N n / (a_i b_j))
         * a_i! b_j! (N-a_i)! (N-b_j)! / (N! n! (a_i-n)! (b_j-n)! (N-a_i-b_j+n)!)
Limits as scikit-learn: both labelings with a single value (or no rows) give NMI = AMI = 1; one of them
with a single value gives AMI = 0; I - E[I] and the AMI denominator are kept at least eps from 0.
"""
from __future__ import annotations

import numpy as np
from scipy.special import gammaln


def _entropy(counts: np.ndarray, total: float) -> float:
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def expected_mi(a: np.ndarray, b: np.ndarray) -> float:
    """E[I] for margins a (r,), b (c,) (integer counts with equal sums), over distinct margin values."""
    total = int(a.sum())
    av, ac = np.unique(a[a > 0].astype(np.int64), return_counts=True)
    bv, bc = np.unique(b[b > 0].astype(np.int64), return_counts=True)
    lg_n = gammaln(total + 1)
    emi = 0.0
    for x, mx in zip(av, ac):
        lo = np.maximum(1, x + bv - total)  # (c',) per distinct b margin
        hi = np.minimum(x, bv)
        for y, my, l, h in zip(bv, bc, lo, hi):
            if l > h:
                continue
            n = np.arange(l, h + 1, dtype=np.float64)  # (m,) possible cell counts
            log_p = (gammaln(x + 1) + gammaln(y + 1) + gammaln(total - x + 1) + gammaln(total - y + 1) - lg_n
                     - gammaln(n + 1) - gammaln(x - n + 1) - gammaln(y - n + 1) - gammaln(total - x - y + n + 1))
            emi += mx * my * float((n / total * np.log(total * n / (float(x) * y)) * np.exp(log_p)).sum())
    return emi


def scores(table: np.ndarray) -> dict[str, float]:
    """{'total', 'h_a', 'h_b', 'mi', 'nmi', 'ami'} of a contingency table (r, c) of counts."""
    c = np.asarray(table, dtype=np.float64)
    total = c.sum()
    a, b = c.sum(1), c.sum(0)
    if total == 0 or ((a > 0).sum() <= 1 and (b > 0).sum() <= 1):
        return {"total": float(total), "h_a": 0.0, "h_b": 0.0, "mi": 0.0, "nmi": 1.0, "ami": 1.0}
    ha, hb = _entropy(a, total), _entropy(b, total)
    nz = c > 0
    mi = float((c[nz] / total * np.log(total * c[nz] / np.outer(a, b)[nz])).sum())
    mi = max(mi, 0.0)
    eps = np.finfo(np.float64).eps
    mean_h = (ha + hb) / 2
    nmi = mi / max(mean_h, eps)
    if (a > 0).sum() <= 1 or (b > 0).sum() <= 1:  # one side constant: no information, AMI 0
        return {"total": float(total), "h_a": ha, "h_b": hb, "mi": mi, "nmi": nmi, "ami": 0.0}
    emi = expected_mi(a, b)
    den, num = mean_h - emi, mi - emi  # both kept away from 0 with their sign, as scikit-learn does
    den = min(den, -eps) if den < 0 else max(den, eps)
    num = min(num, -eps) if num < 0 else max(num, eps)
    return {"total": float(total), "h_a": ha, "h_b": hb, "mi": mi, "nmi": nmi, "ami": num / den}


def scores_long(df, a: str, b: str, n: str = "n") -> dict[str, float]:
    """`scores` of a long table with label columns `a`, `b` and count column `n` (a pandas DataFrame)."""
    m = df.pivot_table(index=a, columns=b, values=n, fill_value=0, aggfunc="sum")
    return scores(m.to_numpy())
