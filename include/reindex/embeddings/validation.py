"""Vector validation before loading: dimension, finite values, half-float range for ``halfvec``
stores, unit norm when the model normalises."""

from __future__ import annotations

import numpy as np

from reindex.config import Storage
from reindex.errors import ErrorCode
from reindex.models import ModelSpec

NORM_TOLERANCE = 1e-3
HALF_MAX = float(np.finfo(np.float16).max)  # 65504


def validate_vectors(vectors: np.ndarray, spec: ModelSpec) -> list[tuple[int, ErrorCode, str] | None]:
    """One entry per row: ``None`` when the vector is loadable, else ``(row, code, message)``.

    One pass over the block (the squared norms) serves both checks: a NaN or infinite value makes its
    row's sum non-finite; only such rows are looked at again."""
    if vectors.ndim != 2:
        raise ValueError(f"expected a 2-d array of vectors, got shape {vectors.shape}")
    n, dim = vectors.shape
    if dim != spec.dim:
        msg = f"vector has dimension {dim}; model {spec.model_id} has {spec.dim}"
        return [(i, ErrorCode.DIMENSION_MISMATCH, msg) for i in range(n)]
    out: list[tuple[int, ErrorCode, str] | None] = [None] * n
    squares = np.einsum("ij,ij->i", vectors, vectors)
    finite = np.isfinite(squares)
    norms = np.sqrt(squares)
    if not finite.all():  # NaN/inf values, or finite ones whose squares overflow (a huge vector)
        odd = np.flatnonzero(~finite)
        finite[odd] = np.isfinite(vectors[odd]).all(axis=1)
        huge = odd[finite[odd]]
        norms[huge] = np.linalg.norm(vectors[huge].astype(np.float64), axis=1)
    for i in np.flatnonzero(~finite):
        out[i] = (int(i), ErrorCode.NON_FINITE, "vector contains NaN or infinite values")
    ok = finite
    if spec.storage == Storage.HALFVEC:
        # Beyond the half-float range a value would be stored as infinity (pgvector refuses the whole block).
        peak = np.abs(vectors).max(axis=1, initial=0)
        for i in np.flatnonzero(finite & (peak > HALF_MAX)):
            out[i] = (int(i), ErrorCode.NON_FINITE,
                      f"vector has a value of magnitude {peak[i]:.6g}, beyond half precision (|x| <= 65504): "
                      "it would be infinite in this halfvec store")
        ok = finite & (peak <= HALF_MAX)
    if spec.normalized:
        bad = ok & (np.abs(norms - 1.0) > NORM_TOLERANCE)
        for i in np.flatnonzero(bad):
            out[i] = (int(i), ErrorCode.NOT_NORMALIZED, f"vector norm {norms[i]:.4f} is not 1 (model normalises)")
    return out
