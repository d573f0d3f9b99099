"""Per-example gradients in factored form, and the algebra TracIn needs on them.

For the layers TracIn meets most, the gradient of one row's loss with respect to a weight is a
sum of outer products, ``Σ_t v_t u_tᵀ``: ``u_t`` is what went into the layer at position ``t``
(an activation, an unfolded convolution patch, a one-hot token) and ``v_t`` the gradient of the
loss with respect to the layer's output there. TracIn only needs squared norms and dot products
of such gradients, which follow from the factors without building the gradient itself::

    ‖Σ_t v_t u_tᵀ‖²                 = Σ_{t,s} (u_t·u_s)(v_t·v_s)          (Gram form)
    ⟨Σ_t v_t u_tᵀ, Σ_s v'_s u'_sᵀ⟩  = Σ_{t,s} (u_t·u'_s)(v_t·v'_s)

For a single position this is the ‖g‖²‖a‖² identity. When positions are many and the layer is
small, building the gradient (``materialise``) is cheaper; :func:`choose_form` picks per layer.

Everything here is private tensor code: no I/O, no settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Upper bound on the elements of one intermediate tensor before work is split into chunks.
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class OuterFactor:
    """Per-example gradient ``Σ_t v[b,k,t] u[b,k,t]ᵀ`` for each of ``K`` independent blocks.

    Attributes:
        u: ``(B, K, T, p)`` input-side factors, or ``(B, T)`` integer indices when ``index_size``
            is set (an embedding: ``u_t`` is the one-hot vector of the token, ``-1`` = no token).
        v: ``(B, K, T, q)`` output-gradient factors.
        index_size: number of rows of the embedding table when ``u`` holds indices.
    """

    u: torch.Tensor
    v: torch.Tensor
    index_size: int | None = None

    @property
    def batch(self) -> int:
        return self.v.shape[0]

    @property
    def positions(self) -> int:
        return self.v.shape[2]

    @property
    def dims(self) -> tuple[int, int, int]:
        """(K, p, q)."""
        p = self.index_size if self.index_size is not None else self.u.shape[-1]
        return self.v.shape[1], p, self.v.shape[-1]


@dataclass
class DenseFactor:
    """Per-example gradients stored as they are: ``g`` is ``(B, D)``."""

    g: torch.Tensor

    @property
    def batch(self) -> int:
        return self.g.shape[0]


Factor = OuterFactor | DenseFactor


def choose_form(factor: Factor, positions_other: int | None = None) -> str:
    """Return ``"gram"`` or ``"materialise"``, whichever costs fewer multiply-adds.

    ``positions_other`` is the number of positions of the other side of a dot product
    (``None`` for a squared norm, where both sides are the same rows).
    """
    if isinstance(factor, DenseFactor):
        return "dense"
    if factor.index_size is not None:
        return "gram"  # a per-row embedding gradient has num_embeddings × dim entries
    k, p, q = factor.dims
    t1 = factor.positions
    t2 = t1 if positions_other is None else positions_other
    gram = t1 * t2 * (p + q)
    # materialising: build each row's gradient (t·p·q), then one p·q product per pair
    materialise = (t1 + t2) * p * q / 2 + p * q
    return "gram" if gram <= materialise else "materialise"


def materialise(factor: Factor) -> torch.Tensor:
    """Per-example gradients as a ``(B, D)`` tensor."""
    if isinstance(factor, DenseFactor):
        return factor.g
    if factor.index_size is not None:
        b, t = factor.u.shape
        dim = factor.v.shape[-1]
        out = factor.v.new_zeros(b, factor.index_size, dim)
        idx = factor.u.clamp_min(0)
        v = factor.v[:, 0] * (factor.u >= 0).unsqueeze(-1).to(factor.v.dtype)
        out.scatter_add_(1, idx.unsqueeze(-1).expand(b, t, dim), v)
        return out.reshape(b, -1)
    # v is usually a transposed view of the layer's output gradient, so vᵀ is contiguous
    w = torch.matmul(factor.v.transpose(-1, -2), factor.u)  # (B, K, q, p)
    return w.reshape(w.shape[0], -1)


def batch_sum(factor: Factor) -> torch.Tensor:
    """Σ over rows of the per-example gradients, flattened (to check against autograd)."""
    if isinstance(factor, DenseFactor):
        return factor.g.sum(0)
    if factor.index_size is not None:
        dim = factor.v.shape[-1]
        mask = factor.u >= 0
        out = factor.v.new_zeros(factor.index_size, dim)
        out.index_add_(0, factor.u[mask], factor.v[:, 0][mask])
        return out.reshape(-1)
    return torch.einsum("bktq,bktp->kqp", factor.v, factor.u).reshape(-1)


def _row_chunks(n: int, per_row: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, per_row))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def squared_norms(factor: Factor, form: str | None = None) -> torch.Tensor:
    """‖per-example gradient‖² for every row: shape ``(B,)``."""
    if isinstance(factor, DenseFactor):
        return factor.g.pow(2).sum(1)
    form = form or choose_form(factor)
    if form == "materialise":
        k, p, q = factor.dims
        parts = [materialise(_slice(factor, s)).pow(2).sum(1) for s in _row_chunks(factor.batch, k * p * q)]
        return torch.cat(parts)
    t = factor.positions
    if factor.index_size is not None:
        # u_t·u_s is 1 where two positions hold the same (real) token, else 0
        out = []
        for s in _row_chunks(factor.batch, t * t):
            idx, v = factor.u[s], factor.v[s, 0]
            same = (idx.unsqueeze(2) == idx.unsqueeze(1)) & (idx >= 0).unsqueeze(2)
            gram_v = v @ v.transpose(1, 2)
            out.append((gram_v * same.to(gram_v.dtype)).sum((1, 2)))
        return torch.cat(out)
    if t == 1:
        return (factor.u.pow(2).sum(-1) * factor.v.pow(2).sum(-1)).sum((1, 2))
    k = factor.v.shape[1]
    out = []
    for s in _row_chunks(factor.batch, k * t * t):
        u, v = factor.u[s], factor.v[s]
        out.append(((u @ u.transpose(-1, -2)) * (v @ v.transpose(-1, -2))).sum((1, 2, 3)))
    return torch.cat(out)


def _slice(factor: Factor, s: slice) -> Factor:
    if isinstance(factor, DenseFactor):
        return DenseFactor(factor.g[s])
    return OuterFactor(factor.u[s], factor.v[s], factor.index_size)


def dots(a: Factor, b: Factor, form: str | None = None) -> torch.Tensor:
    """Dot products of per-example gradients: ``out[i, j] = ⟨grad a_i, grad b_j⟩``, ``(Ba, Bb)``."""
    if isinstance(a, DenseFactor) and isinstance(b, DenseFactor):
        return a.g @ b.g.T
    if isinstance(a, DenseFactor) or isinstance(b, DenseFactor):
        return materialise(a) @ materialise(b).T
    form = form or choose_form(a, b.positions)
    if form == "materialise":
        return materialise(a) @ materialise(b).T
    ta, tb = a.positions, b.positions
    if a.index_size is not None:
        va, vb = a.v[:, 0], b.v[:, 0]  # (Ba, Ta, q), (Bb, Tb, q)
        out = []
        for s in _row_chunks(a.batch, b.batch * ta * tb):
            ia = a.u[s]
            same = (ia[:, None, :, None] == b.u[None, :, None, :]) & (ia >= 0)[:, None, :, None]
            gv = torch.einsum("atq,bsq->abts", va[s], vb)
            out.append((gv * same.to(gv.dtype)).sum((2, 3)))
        return torch.cat(out)
    if ta == 1 and tb == 1:
        ua, va = a.u[:, :, 0], a.v[:, :, 0]  # (Ba, K, p)
        ub, vb = b.u[:, :, 0], b.v[:, :, 0]
        # (K, Ba, Bb) products, multiplied block by block, summed over blocks
        gu = torch.bmm(ua.transpose(0, 1), ub.transpose(0, 1).transpose(1, 2))
        gv = torch.bmm(va.transpose(0, 1), vb.transpose(0, 1).transpose(1, 2))
        return (gu * gv).sum(0)
    k = a.v.shape[1]
    out = []
    for s in _row_chunks(a.batch, b.batch * k * ta * tb):
        gu = torch.einsum("aktp,bksp->abkts", a.u[s], b.u)
        gv = torch.einsum("aktq,bksq->abkts", a.v[s], b.v)
        out.append((gu * gv).sum((2, 3, 4)))
    return torch.cat(out)


class Projector:
    """A seeded random projection of per-example gradients, one per parameter.

    Outer-product gradients are projected with a Kronecker-structured Gaussian matrix
    ``R_v ⊗ R_u``, i.e. ``Σ_t (R_vᵀ v_t)(R_uᵀ u_t)ᵀ``, so the full gradient is never built; dot
    products of projected gradients are unbiased estimates of the exact ones. A gradient that
    already fits in ``dim`` numbers is kept exact.
    """

    def __init__(self, dim: int, seed: int):
        self.dim = int(dim)
        self.seed = int(seed)
        self._matrices: dict[tuple[int, str], torch.Tensor] = {}

    def _gaussian(self, key: int, side: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        cached = self._matrices.get((key, side))
        if cached is None or cached.shape != (rows, cols):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + key * 2 + (side == "v"))
            cached = torch.randn(rows, cols, generator=gen, dtype=torch.float64) / math.sqrt(cols)
            self._matrices[(key, side)] = cached
        return cached.to(device=like.device, dtype=like.dtype)

    def project(self, key: int, factor: Factor) -> torch.Tensor:
        """Project the per-example gradients of parameter number ``key``: ``(B, ≤dim)``."""
        if isinstance(factor, DenseFactor):
            d = factor.g.shape[1]
            if d <= self.dim:
                return factor.g
            return factor.g @ self._gaussian(key, "u", d, self.dim, factor.g)
        k, p, q = factor.dims
        if p * q <= self.dim:
            return materialise(factor)
        r = max(1, math.isqrt(self.dim))
        kp = min(p, r)
        kq = min(q, max(1, self.dim // kp))
        v = factor.v if kq == q else factor.v @ self._gaussian(key, "v", q, kq, factor.v)
        if factor.index_size is not None:
            ru = self._gaussian(key, "u", p, kp, factor.v)
            mask = (factor.u >= 0).unsqueeze(-1).to(v.dtype)
            u = (ru[factor.u.clamp_min(0)] * mask).unsqueeze(1)  # (B, 1, T, kp)
        else:
            u = factor.u if kp == p else factor.u @ self._gaussian(key, "u", p, kp, factor.u)
        return torch.einsum("bktq,bktp->bkqp", v, u).reshape(v.shape[0], -1)
