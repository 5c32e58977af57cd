"""
Brute-force RINCE: per-anchor, per-key Python loops written straight from the definitions in
rince.py. Slow on purpose; the tests and tools/benchmark_loss.py check the vectorised loss
against it.
"""

import math

INF = float("inf")


def reference_rince(z, y, k, ky, rank, taus, variant, self_index=None, weights=None):
    """z, k: lists of vectors; rank: K x K lists; returns (total, per_rank list, counts list)."""
    num_classes = len(rank)
    r = len(taus)
    n, m = len(z), len(k)

    def rho(i, j):
        if ky[j] >= num_classes:  # background
            return INF
        v = rank[y[i]][ky[j]]
        return v if 1 <= v <= r else INF

    per_rank, counts = [], []
    for rk in range(1, r + 1):
        tau = taus[rk - 1]
        form = variant if variant != "out_in" else ("out" if rk == 1 else "in")
        terms = []
        for i in range(n):
            s = [sum(a * b for a, b in zip(z[i], k[j])) for j in range(m)]
            # Keys labelled < 0 are no keys at all (padding, empty queue slots).
            others = [
                j for j in range(m) if ky[j] >= 0 and (self_index is None or j != self_index[i])
            ]
            pos = [j for j in others if rho(i, j) == rk]
            if not pos:
                continue
            den = [j for j in others if rho(i, j) >= rk]
            neg = [j for j in den if j not in pos]
            if form == "in":
                num = sum(math.exp(s[j] / tau) for j in pos)
                d = sum(math.exp(s[j] / tau) for j in den)
                ell = -math.log(num / d)
            elif form == "supcon":
                d = sum(math.exp(s[j] / tau) for j in den)
                ell = -sum(math.log(math.exp(s[p] / tau) / d) for p in pos) / len(pos)
            else:
                sn = sum(math.exp(s[j] / tau) for j in neg)
                ell = -sum(
                    math.log(math.exp(s[p] / tau) / (math.exp(s[p] / tau) + sn)) for p in pos
                ) / len(pos)
            w = 1.0 if weights is None else weights[i]
            terms.append(w * ell)
        counts.append(len(terms))
        per_rank.append(sum(terms) / len(terms) if terms else 0.0)
    return sum(per_rank), per_rank, counts
