"""Streaming, exactly mergeable per-class statistics of one layer's features.

Numerical method (why the results are exact to float64 rounding, never negative):

* Every batch is converted to float64 and *centred on its own per-class batch means* (two-pass
  inside the batch: sums by ``index_add``, then deviations). The batch's per-class sum of squared
  deviations and, when requested, its within-class scatter ``U^T U`` are therefore computed from
  small, centred numbers: no ``E[h^2] - E[h]^2`` cancellation, whatever the common offset.
* Batches, parts and processes are combined with the parallel update of Chan, Golub & LeVeque
  (1979): for groups a and b with counts n_a, n_b, means m_a, m_b and centred second moments
  Q_a, Q_b, ``n = n_a + n_b``, ``m = m_a + (m_b - m_a) n_b / n`` and
  ``Q = Q_a + Q_b + (n_a n_b / n) (m_b - m_a)(m_b - m_a)^T``. Every term is a sum of
  non-negative quantities, so variances stay >= 0, and the result does not depend on batch size,
  batch order or process count beyond float64 rounding.
* The within-class scatter is streamed shifted: per batch one product of the B rows h_i - s_{y_i}
  (s_k a per-class shift, the first batch mean of class k), then ``S_W = S_s - sum_k n_k (mu_k - s_k)
  (mu_k - s_k)^T`` restores the centred scatter and resets s_k = mu_k, at 8192 rows and every time the
  row count has doubled after, and before any result or merge. The rows are within-class deviations (small, centred
  numbers); the K-class correction costs one K x D product per doubling instead of up to K extra
  rows per batch. The products are float64, or float32 (``products="float32"``) with the error bound
  of ``docs/metrics.md``.

Groups are indexed by (label vector l, part p, class k). Label vectors share the features (e.g.
noisy and clean labels); parts split the samples of a split (e.g. the probe's fit and validation
parts). Nothing is stored per sample.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import torch
from torch import Tensor

from pnc.metrics.comm import Comm
from pnc.metrics.options import SCATTER_PRODUCTS

F64 = torch.float64

# Above this many (part, class) groups, a batch's statistics are computed for the groups present in it only.
_SPARSE_GROUPS = 64
# The first in-stream settle of the scatter once this many rows have been added, then at every doubling.
_FIRST_SETTLE_ROWS = 8192
# The scatter's products are taken in column blocks of this width, only on and above the diagonal.
_GRAM_BLOCK = 256
# Rows wait until this many (per label vector and part) enter one product: one (D x 512) x (512 x D) product is
# 1.3-1.5x faster than four of 128 rows (bench/bench_metrics.py (iv); D = 1024 and 2048, float64 and float32).
GRAM_ROWS = 512
# On CUDA, parts are separated by zeroing rows (no sync); set True to use that path on the CPU too (tests).
_DENSE_PARTS_ON_CPU = False


def chan_merge(
    n_a: Tensor, m_a: Tensor, q_a: Tensor, s_a: Tensor | None,
    n_b: Tensor, m_b: Tensor, q_b: Tensor, s_b: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Merge two sets of per-group statistics (Chan, Golub & LeVeque 1979), batched.

    ``n_*``: (..., G) int64 counts; ``m_*``: (..., G, D) float64 means; ``q_*``: (..., G) float64 sums
    of squared distances to the group mean; ``s_*``: (..., D, D) float64 scatter summed over the G
    groups (within-group scatter), or None. Returns the merged ``(n, m, q, s)``.
    """
    n = n_a + n_b
    na = n_a.to(F64)
    nb = n_b.to(F64)
    nt = n.to(F64).clamp_min(1.0)
    delta = m_b - m_a
    mean = m_a + delta * (nb / nt).unsqueeze(-1)
    c = na * nb / nt
    q = q_a + q_b + c * delta.square().sum(-1)
    s = None
    if s_a is not None and s_b is not None:
        d = delta * c.sqrt().unsqueeze(-1)
        s = s_a + s_b + d.transpose(-1, -2) @ d
    return n, mean, q, s


@dataclass(frozen=True)
class ClassSummary:
    """Exact per-class statistics of one layer's features under one label vector (float64).

    Attributes:
        count: (K,) int64, samples per class (0 for a class absent from the data).
        mean: (K, D) float64 class means (a zero row for an absent class).
        sq_dist: (K,) float64, per class the sum over its samples of ||h_i - mu_k||^2.
        scatter: (D, D) float64 pooled within-class scatter sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T,
            or None when it was not accumulated (D above the cap).
    """

    count: Tensor
    mean: Tensor
    sq_dist: Tensor
    scatter: Tensor | None = None

    @property
    def num_classes(self) -> int:
        return int(self.count.shape[0])

    @property
    def dim(self) -> int:
        return int(self.mean.shape[1])

    @property
    def total(self) -> int:
        """N, the number of samples."""
        return int(self.count.sum().item())

    def variances(self) -> Tensor:
        """(K,) float64 var_k = sq_dist_k / n_k (no Bessel correction); NaN marks absent classes."""
        n = self.count.to(F64)
        return torch.where(n > 0, self.sq_dist / n.clamp_min(1.0), torch.full_like(n, float("nan")))

    def global_mean(self) -> Tensor:
        """(D,) float64 sample mean of all N features, mu_G = sum_k n_k mu_k / N."""
        n = self.count.to(F64)
        return (n.unsqueeze(1) * self.mean).sum(0) / n.sum().clamp_min(1.0)

    def merge(self, other: ClassSummary) -> ClassSummary:
        """Exact merge of the statistics of two disjoint sample sets."""
        both = self.scatter is not None and other.scatter is not None  # a scatter only when both sides have one
        # one batch of K classes (leading dimension 1), the scatter summed over them
        n, m, q, s = chan_merge(self.count[None], self.mean[None], self.sq_dist[None], self.scatter[None] if both else None,
                                other.count[None], other.mean[None], other.sq_dist[None], other.scatter[None] if both else None)
        return ClassSummary(n[0], m[0], q[0], None if s is None else s[0])


class ClassStats:
    """Streaming per-class sufficient statistics of one layer's features (B x D, any float dtype).

    Args:
        num_classes: K; labels must lie in [0, K).
        dim: D, the feature dimension.
        num_labelings: L, how many label vectors are accumulated over the same features.
        num_parts: P, how many disjoint parts the samples are split into (``part`` argument of
            :meth:`update`); e.g. 2 for a probe's fit / validation parts.
        scatter: whether to accumulate the D x D within-class scatter; a bool for all label vectors
            or one bool per label vector.
        device: where the float64 state lives (default: CPU).
        products: precision of the per-batch D x D products of the scatter, "float64" (default) or
            "float32" (rows centred in float64, products in float32, accumulated in float64: error bound
            in ``docs/metrics.md``, "Scatter in float32").

    State (float64 except counts): ``count`` (L, P, K), ``mean`` (L, P, K, D), ``sq_dist`` (L, P, K),
    and for the label vectors with a scatter ``scatter`` (S, P, D, D) with its per-class ``shift``
    (S, P, K, D) and ``fed_sq`` (S, P), the sum of the squared norms of the rows that entered its products
    (T of the float32 error bound). O(L P (K D + D^2)) memory, independent of the number of samples.

    The scatter is streamed *shifted*: per batch only the B rows h_i - s_{y_i} enter one product
    (s_k: a per-class shift, the batch mean of class k in the batch that first holds it), and
    ``S_W = S_s - sum_k n_k (mu_k - s_k)(mu_k - s_k)^T`` is restored ("settled": one K x D product, then
    s_k = mu_k) when the row count reaches 8192 and at every doubling after, and before any result or merge. Only the blocks on and
    above the diagonal are accumulated (the scatter is symmetric); the others are filled when settled.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        num_labelings: int = 1,
        num_parts: int = 1,
        scatter: bool | Sequence[bool] = False,
        device: torch.device | str | None = None,
        products: str = "float64",
    ):
        if num_classes < 1 or dim < 1 or num_labelings < 1 or num_parts < 1:
            raise ValueError(
                f"ClassStats needs num_classes, dim, num_labelings, num_parts >= 1; got "
                f"{num_classes}, {dim}, {num_labelings}, {num_parts}"
            )
        if products not in SCATTER_PRODUCTS:
            raise ValueError(f"products must be one of {list(SCATTER_PRODUCTS)}; got {products!r}")
        K, D, L, P = int(num_classes), int(dim), int(num_labelings), int(num_parts)
        flags = [bool(scatter)] * L if isinstance(scatter, bool) else [bool(s) for s in scatter]
        if len(flags) != L:
            raise ValueError(f"scatter has {len(flags)} flags for {L} label vectors")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.num_classes, self.dim, self.num_labelings, self.num_parts = K, D, L, P
        self.products = products
        self.scatter_labelings: tuple[int, ...] = tuple(i for i, f in enumerate(flags) if f)
        self._scatter_slot = {l: j for j, l in enumerate(self.scatter_labelings)}
        self.count = torch.zeros(L, P, K, dtype=torch.int64, device=dev)
        self.mean = torch.zeros(L, P, K, D, dtype=F64, device=dev)
        self.sq_dist = torch.zeros(L, P, K, dtype=F64, device=dev)
        S = len(self.scatter_labelings)
        self.scatter: Tensor | None = torch.zeros(S, P, D, D, dtype=F64, device=dev) if S else None
        self.shift: Tensor | None = torch.zeros(S, P, K, D, dtype=F64, device=dev) if S else None
        # T of the float32 error bound: sum of the squared norms of every row that entered the products
        self.fed_sq: Tensor | None = torch.zeros(S, P, dtype=F64, device=dev) if S else None
        self._rows = 0  # rows added since construction (host-side: no device sync)
        self._settle_at = _FIRST_SETTLE_ROWS  # settle when _rows reaches this, then at every doubling
        self._settled = True  # scatter centred on the class means and symmetric
        # rows waiting for their product, per (scatter slot, part), in the products' dtype (see GRAM_ROWS)
        self._pending: dict[tuple[int, int], list[Tensor]] = {}

    # ------------------------------------------------------------------ streaming
    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the state tensors and the rows waiting for their product."""
        pending = [t for rows in self._pending.values() for t in rows]
        state = [t for t in (self.count, self.mean, self.sq_dist, self.scatter, self.shift, self.fed_sq) if t is not None]
        return sum(t.numel() * t.element_size() for t in pending + state)

    def update(
        self,
        features: Tensor,
        labels: Tensor,
        part: Tensor | None = None,
        mask: Tensor | None = None,
        *,
        check: bool = True,
    ) -> None:
        """Add a batch. ``features`` (B, D); ``labels`` (B,) or (B, L) integer; ``part`` (B,) integer in
        [0, P) or None (all in part 0); ``mask`` (B,) bool, False rows are ignored (padding)."""
        K, D, L, P = self.num_classes, self.dim, self.num_labelings, self.num_parts
        dev = self.device
        if features.ndim != 2 or features.shape[1] != D:
            raise ValueError(f"features must have shape (B, {D}); got {tuple(features.shape)}")
        if not torch.is_floating_point(features):
            raise TypeError(f"features must be a floating-point tensor; got {features.dtype}")
        y = labels.to(dev)
        if y.ndim == 1:
            y = y.unsqueeze(1)
        if y.ndim != 2 or y.shape[0] != features.shape[0] or y.shape[1] < L:
            raise ValueError(
                f"labels must have shape (B,) or (B, >= {L}) with B = {features.shape[0]}; got {tuple(labels.shape)}"
            )
        y = y[:, :L].long()
        x = features.to(device=dev, dtype=F64)
        p = None if part is None else part.to(dev).long()
        if mask is not None:
            keep = mask.to(dev).bool()
            x, y = x[keep], y[keep]
            p = None if p is None else p[keep]
        if x.shape[0] == 0:
            return
        if check:
            check_labels(y, K)
            if p is not None and (int(p.min()) < 0 or int(p.max()) >= P):
                raise ValueError(f"part indices must lie in [0, {P}); got [{int(p.min())}, {int(p.max())}]")
        self._update(x, y, None if P == 1 else p)

    def _update(self, x: Tensor, y: Tensor, part: Tensor | None) -> None:
        """Hot path: x (B, D) float64 on the state device, y (B, L) int64 validated, part (B,) or None."""
        K, D, L, P = self.num_classes, self.dim, self.num_labelings, self.num_parts
        G = P * K
        if part is None and P > 1:
            part = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
        rows = pmask = None
        if self.scatter is not None and P > 1:
            if x.is_cuda or _DENSE_PARTS_ON_CPU:  # zero the other parts' rows: a few more FLOPs, no host-device sync
                pmask = [(part == j).to(F64).unsqueeze(1) for j in range(P)]
            else:
                rows = [torch.nonzero(part == j).squeeze(1) for j in range(P)]
        for l in range(L):
            g = y[:, l] if P == 1 else part * K + y[:, l]
            # many classes: work on the groups present in the batch only (at most B of them)
            cls, gi = torch.unique(g, return_inverse=True) if G > _SPARSE_GROUPS else (None, g)
            Gb = G if cls is None else int(cls.shape[0])
            nb = torch.bincount(gi, minlength=Gb)
            nbf = nb.to(F64)
            mb = x.new_zeros(Gb, D).index_add_(0, gi, x).div_(nbf.clamp_min(1.0).unsqueeze(1))
            u = x - mb.index_select(0, gi)
            qb = x.new_zeros(Gb).index_add_(0, gi, u.square().sum(1))
            n_all, m_all, q_all = self.count[l].view(G), self.mean[l].view(G, D), self.sq_dist[l].view(G)
            n_a, m_a, q_a = (n_all, m_all, q_all) if cls is None else (
                n_all.index_select(0, cls), m_all.index_select(0, cls), q_all.index_select(0, cls))
            slot = self._scatter_slot.get(l)
            if slot is not None:
                assert self.scatter is not None and self.shift is not None and self.fed_sq is not None
                sh_all = self.shift[slot].view(G, D)
                sh = sh_all if cls is None else sh_all.index_select(0, cls)
                # a group seen for the first time is shifted by its batch mean (its rows are then centred)
                sh = torch.where((n_a == 0).unsqueeze(1), mb, sh)
                if cls is None:
                    sh_all.copy_(sh)
                else:
                    sh_all.index_copy_(0, cls, sh)
                r = x - sh.index_select(0, gi)
                for j in range(P):
                    if rows is not None:
                        rj = r.index_select(0, rows[j])
                    elif pmask is not None:
                        rj = r * pmask[j]
                    else:
                        rj = r
                    self._defer(slot, j, rj)
                    self.fed_sq[slot, j] += rj.square().sum()
                self._settled = False
            _, m_new, q_new, _ = chan_merge(n_a, m_a, q_a, None, nb, mb, qb, None)
            if cls is None:
                q_all.copy_(q_new)
                m_all.copy_(m_new)
                n_all.add_(nb)
            else:
                q_all.index_copy_(0, cls, q_new)
                m_all.index_copy_(0, cls, m_new)
                n_all.index_add_(0, cls, nb)
        self._rows += int(x.shape[0])
        if self.scatter is not None and self._rows >= self._settle_at:
            self.settle()
            self._settle_at = max(2 * self._rows, _FIRST_SETTLE_ROWS)

    def _defer(self, slot: int, part: int, rows: Tensor) -> None:
        """Queue ``rows`` for the scatter of (slot, part); one product once GRAM_ROWS have queued. The rows are
        h_i - s_{y_i} with shifts that change only when settled, and settle() takes the queued rows first, so
        the scatter is the same sum as with a product per batch (added in another order)."""
        if rows.shape[0] == 0:
            return
        queue = self._pending.setdefault((slot, part), [])
        queue.append(rows.to(torch.float32) if self.products == "float32" else rows)
        if sum(r.shape[0] for r in queue) >= GRAM_ROWS:
            self._flush(slot, part)

    def _flush(self, slot: int, part: int) -> None:
        queue = self._pending.pop((slot, part), [])
        if queue:
            assert self.scatter is not None
            self._gram_add(self.scatter[slot, part], queue[0] if len(queue) == 1 else torch.cat(queue))

    def _gram_add(self, s: Tensor, a: Tensor) -> None:
        """s[i-block, j-block] += a[:, i]^T a[:, j] for the column blocks i <= j (the upper block triangle); ``a`` is
        already in the products' dtype (:meth:`_defer`)."""
        if a.shape[0] == 0:
            return
        D = self.dim
        step = _GRAM_BLOCK if D > _GRAM_BLOCK else D
        for i in range(0, D, step):
            s[i:i + step, i:].add_(a[:, i:i + step].T @ a[:, i:])

    def settle(self) -> None:
        """Centre the scatter on the class means (S_W = S_s - sum_k n_k d_k d_k^T, d_k = mu_k - s_k; then
        s_k = mu_k) and fill its lower block triangle. Exact transform; idempotent."""
        if self.scatter is None or self.shift is None or self._settled:
            return
        for slot, part in list(self._pending):
            self._flush(slot, part)
        D = self.dim
        step = _GRAM_BLOCK if D > _GRAM_BLOCK else D
        for slot, l in enumerate(self.scatter_labelings):
            for j in range(self.num_parts):
                s = self.scatter[slot, j]
                for i in range(step, D, step):  # lower blocks := transposed upper ones
                    s[i:i + step, :i].copy_(s[:i, i:i + step].T)
                n = self.count[l, j].to(F64)
                d = (self.mean[l, j] - self.shift[slot, j]) * n.sqrt().unsqueeze(1)
                s.sub_(d.T @ d)
                self.shift[slot, j].copy_(self.mean[l, j])
        self._settled = True

    # ------------------------------------------------------------------ merging
    def _check_compatible(self, other: ClassStats) -> None:
        a = (self.num_classes, self.dim, self.num_labelings, self.num_parts, self.scatter_labelings)
        b = (other.num_classes, other.dim, other.num_labelings, other.num_parts, other.scatter_labelings)
        if a != b:
            raise ValueError(f"cannot merge ClassStats with different layouts: {a} vs {b}")

    def merge_(self, other: ClassStats) -> ClassStats:
        """Merge ``other`` (disjoint samples) into ``self``, exactly; returns ``self``."""
        self._check_compatible(other)
        self.settle()
        other.settle()
        o_count, o_mean, o_sq = (t.to(self.device) for t in (other.count, other.mean, other.sq_dist))
        if self.scatter is not None:
            assert other.scatter is not None and self.shift is not None
            idx = list(self.scatter_labelings)
            _, m, _, s = chan_merge(
                self.count[idx], self.mean[idx], self.sq_dist[idx], self.scatter,
                o_count[idx], o_mean[idx], o_sq[idx], other.scatter.to(self.device),
            )
            self.scatter = s
            self.shift = m.clone()
            assert self.fed_sq is not None and other.fed_sq is not None
            self.fed_sq = self.fed_sq + other.fed_sq.to(self.device)
        n, m, q, _ = chan_merge(self.count, self.mean, self.sq_dist, None, o_count, o_mean, o_sq, None)
        self.count, self.mean, self.sq_dist = n, m, q
        self._rows += other._rows
        return self

    def state_tensors(self) -> list[Tensor]:
        """count, mean, sq_dist (and the settled scatter, fed_sq): what :meth:`all_reduce` exchanges."""
        self.settle()
        return [self.count, self.mean, self.sq_dist] + (
            [self.scatter, self.fed_sq] if self.scatter is not None and self.fed_sq is not None else [])

    def empty_like(self) -> ClassStats:
        flags = [l in self._scatter_slot for l in range(self.num_labelings)]
        return ClassStats(
            self.num_classes, self.dim, num_labelings=self.num_labelings, num_parts=self.num_parts,
            scatter=flags, device=self.device, products=self.products,
        )

    def all_reduce(self, comm: Comm | None = None, *, accelerator=None) -> ClassStats:
        """Replace the state by the exact merge over all processes (rank order), in place.

        Every process must call this with a ClassStats of the same layout. Uses ``comm`` or builds one
        from ``accelerator`` / ``torch.distributed``.
        """
        comm = comm if comm is not None else Comm(accelerator)
        if comm.world_size == 1:
            return self
        gathered = [comm.all_gather(t) for t in self.state_tensors()]
        merged = self.empty_like()
        for r in range(comm.world_size):
            other = self.empty_like()
            other.count, other.mean, other.sq_dist = gathered[0][r], gathered[1][r], gathered[2][r]
            if self.scatter is not None:
                other.scatter, other.fed_sq = gathered[3][r], gathered[4][r]
            merged.merge_(other)
        self.count, self.mean, self.sq_dist, self.scatter = merged.count, merged.mean, merged.sq_dist, merged.scatter
        self.shift, self.fed_sq = merged.shift, merged.fed_sq
        return self

    # ------------------------------------------------------------------ results
    def summary(self, labeling: int = 0, part: int | None = None) -> ClassSummary:
        """The :class:`ClassSummary` of one label vector, for one part or (``part=None``) all parts merged."""
        if not 0 <= labeling < self.num_labelings:
            raise IndexError(f"labeling {labeling} out of range [0, {self.num_labelings})")
        self.settle()
        slot = self._scatter_slot.get(labeling)
        parts = [ClassSummary(
            self.count[labeling, j].clone(), self.mean[labeling, j].clone(), self.sq_dist[labeling, j].clone(),
            None if slot is None or self.scatter is None else self.scatter[slot, j].clone(),
        ) for j in (range(self.num_parts) if part is None else [part])]
        return reduce(ClassSummary.merge, parts)  # merged in part order


def check_labels(y: Tensor, num_classes: int) -> None:
    """Raise ValueError unless every label lies in [0, num_classes)."""
    if y.numel() == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"labels must lie in [0, num_classes={num_classes}); found values in [{lo}, {hi}]. "
            "Pass the right num_classes, or mask out unlabelled samples."
        )
