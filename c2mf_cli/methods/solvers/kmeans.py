"""k-means++ seeding (Arthur and Vassilvitskii 2007): k spread-out rows of X by D^2 sampling.

Notation: X (n, c) points as rows. Used for the first dictionary of the alternating methods and to start the
k-means of the concept-clustering ablation.
"""

from __future__ import annotations

import torch

from ...errors import C2MFError


def kmeans_pp(X: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k rows of X (a copy, (k, c)) chosen by D^2 sampling with the random stream `gen` (a CPU generator).

    The first row is uniform; each next row is drawn with probability proportional to its squared distance to
    the rows chosen so far (uniform again if every point coincides with a chosen one).
    """
    n = X.shape[0]
    if n < k:
        raise C2MFError(f"only {n} rows to choose {k} from: use fewer concepts (or clusters) or more data")
    sq = (X * X).sum(1)

    def dist2(i: int) -> torch.Tensor:  # ||x - X[i]||^2 without an (n, c) temporary
        return (sq - 2 * (X @ X[i]) + sq[i]).clamp_min(0)

    first = int(torch.randint(n, (1,), generator=gen))
    chosen = [first]
    d2 = dist2(first)
    for _ in range(1, k):
        p = d2.double().cpu()
        total = float(p.sum())
        idx = int(torch.randint(n, (1,), generator=gen)) if total <= 0 else int(
            torch.multinomial(p / total, 1, generator=gen))
        chosen.append(idx)
        d2 = torch.minimum(d2, dist2(idx))
    return X[chosen].clone()
