"""Rank and collapse statistics of the feature batches ``probe.features`` ships.

A feature batch is a (rows, dim) float32 matrix of at most 2,048 rows. The
agent turns each batch into a handful of scalars (``features/<stream>/<key>``)
that show collapse long before the loss does. One Gram matrix (of the smaller
side) is formed per batch; the raw and the mean-centred spectra come from it,
and every rank measure is derived from those. Pure numpy: no threads of its
own, no I/O.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

RANKME_EPS = 1e-7
FLOAT32_EPS = float(np.finfo(np.float32).eps)


def _as_matrix(features: npt.ArrayLike, what: str = "features") -> FloatArray:
    matrix = np.asarray(features)
    if matrix.ndim != 2:
        raise ValueError(f"{what} must be a 2-d (rows, dim) matrix, got shape {matrix.shape}")
    if matrix.shape[1] == 0:
        raise ValueError(f"{what} has shape {matrix.shape}: dim must be at least 1")
    if not (np.issubdtype(matrix.dtype, np.floating) or np.issubdtype(matrix.dtype, np.integer)):
        raise ValueError(f"{what} must hold real numbers, got dtype {matrix.dtype}")
    return matrix.astype(np.float64, copy=False)


def singular_values(features: npt.ArrayLike, *, centered: bool = False) -> FloatArray:
    """Singular values of the feature matrix, descending; raw unless ``centered``.

    Raw (not mean-centred) by default, as in RankMe (Garrido et al. 2023), whose
    effective rank is defined on the embeddings themselves: a shared offset is a
    direction the representation really spends. ``centered=True`` subtracts each
    dimension's mean first, so only how the rows differ counts. The eigenvalues
    of the smaller Gram matrix (Z^T Z or Z Z^T) are about 5x cheaper than an SVD;
    the Gram matrix is formed in float64, which resolves singular values down to
    ~1e-8 of the largest, far below float32's rank tolerance. Returns
    min(rows, dim) values.
    """
    matrix = _as_matrix(features)
    if matrix.shape[0] == 0:
        raise ValueError("features has no rows")
    if not np.isfinite(matrix).all():
        raise ValueError("features contains NaN or Inf; drop non-finite rows first")
    if centered:
        matrix = matrix - matrix.mean(axis=0)
    rows, dim = matrix.shape
    return _root_spectrum(matrix.T @ matrix if dim <= rows else matrix @ matrix.T)


def _spectra(matrix: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Raw and centred singular values from one Gram product (of the centred rows).

    The raw Gram matrix is the centred one plus the offset's terms, added, never
    subtracted: a large shared offset cannot cancel the spread away, which a
    centred Gram formed as Z^T Z - n mu mu^T would do in floating point.
    """
    rows, dim = matrix.shape
    mean = matrix.mean(axis=0)
    centred = matrix - mean
    if dim <= rows:
        centred_gram = centred.T @ centred
        gram = centred_gram + rows * np.outer(mean, mean)
    else:
        centred_gram = centred @ centred.T
        shift = centred @ mean
        gram = centred_gram + shift[:, None] + shift[None, :] + float(mean @ mean)
    return _root_spectrum(gram), _root_spectrum(centred_gram)


def _root_spectrum(gram: FloatArray) -> FloatArray:
    eigenvalues = np.linalg.eigvalsh(gram)
    spectrum: FloatArray = np.sqrt(np.clip(eigenvalues[::-1], 0.0, None))
    return spectrum


def effective_rank(singular_values: npt.ArrayLike, eps: float = RANKME_EPS) -> float:
    """RankMe effective rank: exp of the entropy of the normalised spectrum.

    p_k = s_k / sum(s) + eps and erank = exp(-sum p_k log p_k) (Garrido et al.
    2023). It is ~dim for isotropic features and falls towards 1 as the
    representation collapses onto fewer directions; unlike the numerical rank it
    moves smoothly, so it shows collapse while it happens. An all-zero spectrum
    (every row zero) has effective rank 0.
    """
    spectrum = np.asarray(singular_values, dtype=np.float64)
    total = float(spectrum.sum())
    if spectrum.size == 0 or total <= 0.0:
        return 0.0
    p = spectrum / total + eps
    return math.exp(-float(np.sum(p * np.log(p))))


def numerical_rank(singular_values: npt.ArrayLike, rows: int, dim: int) -> int:
    """Count of singular values above numpy.linalg.matrix_rank's default tolerance.

    The tolerance is s.max() * max(rows, dim) * eps of float32, because the
    matrix the probe ships is float32: anything smaller is rounding noise. Taken
    from the spectrum already computed, not a second SVD.
    """
    spectrum = np.asarray(singular_values, dtype=np.float64)
    if spectrum.size == 0:
        return 0
    tolerance = float(spectrum.max()) * max(rows, dim) * FLOAT32_EPS
    return int(np.count_nonzero(spectrum > tolerance))


def _split_finite(matrix: FloatArray) -> tuple[FloatArray, int]:
    finite = np.isfinite(matrix).all(axis=1)
    return matrix[finite], int(matrix.shape[0] - np.count_nonzero(finite))


def _unit_rows(matrix: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Row norms and L2-normalised rows; a zero row stays a zero vector (cosine 0), never NaN."""
    norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix))
    safe = np.where(norms > 0.0, norms, 1.0)
    return norms, matrix / safe[:, None]


def representation_stats(features: npt.ArrayLike) -> dict[str, float]:
    """Rank, spread and similarity statistics of one feature batch.

    Rows with NaN/Inf are dropped and counted in ``nonfinite_rows``; at least
    two finite rows must remain. Keys:

    - ``effective_rank`` (RankMe) and ``effective_rank_ratio`` = erank / min(rows, dim);
    - ``numerical_rank``: singular values above float32's rank tolerance;
    - ``centered_effective_rank``: RankMe of the rows minus their mean, and
      ``centered_effective_rank_ratio`` = that / min(rows - 1, dim) (the most
      centring leaves). A shared offset is one large direction of the raw
      spectrum, so raw RankMe reads a healthy stream with a large offset as
      collapsed; centred, only how the rows differ counts, and dimensional
      collapse (rows spread over fewer directions) shows whatever the offset;
    - ``normalized_std``: mean over dimensions of the per-dimension std of the
      L2-normalised rows (SimSiam's collapse monitor), ~1/sqrt(dim) when healthy;
    - ``collapse_ratio`` = normalized_std * sqrt(dim). SimSiam (Chen & He 2021,
      sec. 4.1) shows that for rows spread isotropically on the unit sphere each
      normalised dimension has std ~1/sqrt(dim), and that it drops to 0 when all
      rows collapse to one vector; scaled by sqrt(dim) this is ~1 for healthy
      features and -> 0 under collapse, comparable across widths;
    - ``feature_norm_mean`` / ``feature_norm_std``: L2 norms of the raw rows;
    - ``mean_pairwise_cosine``: mean cosine over distinct row pairs, ~0 for
      spread features and -> 1 under collapse (zero rows count as cosine 0);
    - ``rows`` (finite rows used), ``dim``, ``nonfinite_rows``.

    All values are floats. Raises ValueError for non-2-d input or fewer than two
    finite rows.
    """
    matrix = _as_matrix(features)
    if matrix.shape[0] < 2:
        raise ValueError(f"features has shape {matrix.shape}: need at least 2 rows")
    finite, nonfinite_rows = _split_finite(matrix)
    rows, dim = finite.shape
    if rows < 2:
        raise ValueError(
            f"features has {matrix.shape[0]} rows but only {rows} are finite: need at least 2"
        )

    spectrum, centred_spectrum = _spectra(finite)
    erank = effective_rank(spectrum)
    centred_erank = effective_rank(centred_spectrum)
    norms, unit = _unit_rows(finite)
    normalized_std = float(unit.std(axis=0).mean())

    # sum_{i != j} u_i . u_j = |sum_i u_i|^2 - sum_i |u_i|^2, in O(n d) instead of O(n^2 d).
    direction_sum = unit.sum(axis=0)
    self_similarity = float(np.einsum("ij,ij->", unit, unit))
    pair_similarity = float(direction_sum @ direction_sum) - self_similarity
    mean_pairwise_cosine = pair_similarity / (rows * (rows - 1))

    return {
        "effective_rank": erank,
        "effective_rank_ratio": erank / min(rows, dim),
        "numerical_rank": float(numerical_rank(spectrum, rows, dim)),
        "centered_effective_rank": centred_erank,
        "centered_effective_rank_ratio": centred_erank / min(rows - 1, dim),
        "normalized_std": normalized_std,
        "collapse_ratio": normalized_std * math.sqrt(dim),
        "feature_norm_mean": float(norms.mean()),
        "feature_norm_std": float(norms.std()),
        "mean_pairwise_cosine": mean_pairwise_cosine,
        "rows": float(rows),
        "dim": float(dim),
        "nonfinite_rows": float(nonfinite_rows),
    }


def paired_stats(student: npt.ArrayLike, teacher: npt.ArrayLike) -> dict[str, float]:
    """Row-wise cosine between the same rows of two streams (student vs teacher).

    ``probe.features`` ships the same rows for a named pair at the same step, so
    row i of both is the same sample. Rows non-finite in either stream are left
    out (each stream's ``nonfinite_rows`` already counts them); a zero row has
    cosine 0. Raises ValueError when the shapes differ or no finite pair is left.
    """
    student_matrix = _as_matrix(student, "student")
    teacher_matrix = _as_matrix(teacher, "teacher")
    if student_matrix.shape != teacher_matrix.shape:
        raise ValueError(
            f"paired streams must have the same shape: student {student_matrix.shape}, "
            f"teacher {teacher_matrix.shape}"
        )
    finite = np.isfinite(student_matrix).all(axis=1) & np.isfinite(teacher_matrix).all(axis=1)
    if not finite.any():
        raise ValueError(
            f"paired streams of shape {student_matrix.shape} have no row finite in both"
        )
    _, student_unit = _unit_rows(student_matrix[finite])
    _, teacher_unit = _unit_rows(teacher_matrix[finite])
    cosine = np.einsum("ij,ij->i", student_unit, teacher_unit)
    return {
        "pair_cosine_mean": float(cosine.mean()),
        "pair_cosine_std": float(cosine.std()),
    }
