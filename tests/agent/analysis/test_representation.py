"""Rank and collapse statistics of feature batches, against known answers and plain references."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest

from agent.analysis.representation import (
    effective_rank,
    numerical_rank,
    paired_stats,
    representation_stats,
    singular_values,
)

STAT_KEYS = {
    "effective_rank",
    "effective_rank_ratio",
    "numerical_rank",
    "centered_effective_rank",
    "centered_effective_rank_ratio",
    "normalized_std",
    "collapse_ratio",
    "feature_norm_mean",
    "feature_norm_std",
    "mean_pairwise_cosine",
    "rows",
    "dim",
    "nonfinite_rows",
}


def gaussian(rows: int, dim: int, seed: int = 0) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)


def reference_erank(matrix: npt.NDArray[np.float64]) -> float:
    """RankMe from a full SVD."""
    s = np.linalg.svd(matrix, compute_uv=False)
    if s.sum() == 0:
        return 0.0
    p = s / s.sum() + 1e-7
    return math.exp(-sum(pk * math.log(pk) for pk in p))


def reference_stats(features: npt.NDArray[np.floating]) -> dict[str, float]:
    """The same statistics the slow, obvious way: full SVD, matrix_rank, explicit loops."""
    z = features.astype(np.float64)
    rows, dim = z.shape
    erank = reference_erank(z)
    centred_erank = reference_erank(z - z.mean(axis=0))
    norms = [math.sqrt(sum(v * v for v in row)) for row in z]
    unit = [row / n if n > 0 else np.zeros(dim) for row, n in zip(z, norms, strict=True)]
    stds = []
    for j in range(dim):
        column = [u[j] for u in unit]
        mean = sum(column) / rows
        stds.append(math.sqrt(sum((c - mean) ** 2 for c in column) / rows))
    cosines = [float(unit[i] @ unit[j]) for i in range(rows) for j in range(rows) if i != j]
    norm_mean = sum(norms) / rows
    return {
        "effective_rank": erank,
        "effective_rank_ratio": erank / min(rows, dim),
        "numerical_rank": float(np.linalg.matrix_rank(features.astype(np.float32))),
        "centered_effective_rank": centred_erank,
        "centered_effective_rank_ratio": centred_erank / min(rows - 1, dim),
        "normalized_std": sum(stds) / dim,
        "collapse_ratio": sum(stds) / dim * math.sqrt(dim),
        "feature_norm_mean": norm_mean,
        "feature_norm_std": math.sqrt(sum((n - norm_mean) ** 2 for n in norms) / rows),
        "mean_pairwise_cosine": sum(cosines) / len(cosines),
        "rows": float(rows),
        "dim": float(dim),
        "nonfinite_rows": 0.0,
    }


def test_keys_are_exactly_the_metric_names() -> None:
    """The stats dict has exactly the documented keys, all plain floats."""
    stats = representation_stats(gaussian(64, 16))
    assert set(stats) == STAT_KEYS
    assert all(type(value) is float for value in stats.values())


def test_isotropic_gaussian_is_full_rank_and_spread() -> None:
    """Isotropic rows (4,096 x 32): erank within 3% of dim, full numerical rank, ratio ~1."""
    stats = representation_stats(gaussian(4096, 32))
    assert stats["effective_rank"] == pytest.approx(32, rel=0.03)
    assert stats["effective_rank"] <= 32
    assert stats["effective_rank_ratio"] == pytest.approx(1, rel=0.03)
    assert stats["numerical_rank"] == 32
    assert stats["collapse_ratio"] == pytest.approx(1, abs=0.03)
    assert abs(stats["mean_pairwise_cosine"]) < 0.01
    assert stats["rows"] == 4096
    assert stats["dim"] == 32


def test_exact_rank_k_matrix() -> None:
    """A product of (n x k) and (k x d) factors has numerical rank k and erank below k."""
    rng = np.random.default_rng(1)
    k = 5
    features = (rng.standard_normal((300, k)) @ rng.standard_normal((k, 48))).astype(np.float32)
    stats = representation_stats(features)
    assert stats["numerical_rank"] == k
    assert np.linalg.matrix_rank(features) == k
    assert 1 < stats["effective_rank"] < k


def test_collapsed_features() -> None:
    """All rows one vector plus tiny noise: erank ~1, collapse_ratio ~0, pairwise cosine ~1."""
    rng = np.random.default_rng(2)
    anchor = rng.standard_normal(64)
    features = (anchor + 1e-4 * rng.standard_normal((512, 64))).astype(np.float32)
    stats = representation_stats(features)
    assert stats["effective_rank"] == pytest.approx(1, abs=0.05)
    assert stats["collapse_ratio"] < 1e-3
    assert stats["mean_pairwise_cosine"] == pytest.approx(1, abs=1e-6)


# -- centred measures: a shared offset is not collapse -------------------------------------------
def orthonormal_rank_k(rows: int, dim: int, k: int, seed: int) -> npt.NDArray[np.float64]:
    """Rows spread evenly over k orthonormal directions of R^dim (equal centred spectrum)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, k)))
    return rng.standard_normal((rows, k)) @ basis.T  # type: ignore[no-any-return]


def test_identical_rows_are_total_collapse() -> None:
    """Every row the same vector: cosine 1, normalised std 0, centred rank 0, raw rank 1."""
    row = np.random.default_rng(20).standard_normal(64)
    stats = representation_stats(np.tile(row, (128, 1)).astype(np.float32))
    assert stats["mean_pairwise_cosine"] == pytest.approx(1, abs=1e-6)
    assert stats["normalized_std"] == pytest.approx(0, abs=1e-6)
    assert stats["collapse_ratio"] == pytest.approx(0, abs=1e-5)
    assert stats["centered_effective_rank"] == 0
    assert stats["centered_effective_rank_ratio"] == 0
    assert stats["effective_rank"] == pytest.approx(1, abs=1e-3)  # RankMe's eps: 64 x 1e-7


def test_isotropic_gaussian_centred_measures() -> None:
    """Isotropic 4,096 x 64: cosine ~0, normalised std ~1/sqrt(d), centred rank ~d."""
    stats = representation_stats(gaussian(4096, 64, seed=21))
    assert abs(stats["mean_pairwise_cosine"]) < 0.005
    assert stats["normalized_std"] == pytest.approx(1 / math.sqrt(64), rel=0.02)
    assert stats["collapse_ratio"] == pytest.approx(1, abs=0.02)
    assert stats["centered_effective_rank"] == pytest.approx(64, rel=0.02)
    assert stats["centered_effective_rank_ratio"] == pytest.approx(1, rel=0.02)


def test_large_mean_offset_fools_raw_measures_not_centred_ones() -> None:
    """Isotropic rows (norm ~8) plus a shared offset of norm 100: the raw measures read
    collapse (cosine > 0.99, collapse_ratio < 0.15, raw RankMe a sixth of d); the centred
    rank equals the one without the offset (centring removes exactly the shift)."""
    features = gaussian(2048, 64, seed=22)
    direction = np.random.default_rng(23).standard_normal(64)
    shifted = (features + 100.0 * direction / np.linalg.norm(direction)).astype(np.float32)
    plain, moved = representation_stats(features), representation_stats(shifted)
    assert moved["mean_pairwise_cosine"] > 0.99
    assert moved["collapse_ratio"] < 0.15
    assert moved["effective_rank"] < plain["effective_rank"] / 6
    assert moved["centered_effective_rank"] == pytest.approx(
        plain["centered_effective_rank"], rel=1e-3
    )
    assert moved["centered_effective_rank_ratio"] > 0.95


@pytest.mark.parametrize("k", [1, 10, 32])
def test_rank_k_data_has_centred_rank_k(k: int) -> None:
    """Rows spread over k directions (plus an offset): centred RankMe within 5% of k."""
    rng = np.random.default_rng(24)
    features = orthonormal_rank_k(4096, 64, k, seed=k) + 3.0 * rng.standard_normal(64)
    stats = representation_stats(features.astype(np.float32))
    assert stats["centered_effective_rank"] == pytest.approx(k, rel=0.05)
    assert stats["centered_effective_rank_ratio"] == pytest.approx(k / 64, rel=0.05)


@pytest.mark.parametrize("shape", [(200, 30), (30, 200)])
def test_centred_singular_values_match_svd(shape: tuple[int, int]) -> None:
    """centered=True equals numpy's SVD of the mean-centred rows, even under a 1e4 offset."""
    features = gaussian(*shape, seed=25) + np.float32(1e4)
    z = features.astype(np.float64)
    reference = np.linalg.svd(z - z.mean(axis=0), compute_uv=False)
    spectrum = singular_values(features, centered=True)
    assert spectrum.shape == (min(shape),)
    scale = reference[0]
    np.testing.assert_allclose(spectrum, reference, rtol=1e-7, atol=1e-9 * scale)
    raw = np.linalg.svd(z, compute_uv=False)
    np.testing.assert_allclose(singular_values(features), raw, rtol=1e-7, atol=1e-9 * raw[0])


@pytest.mark.parametrize("shape", [(40, 12), (12, 40), (25, 25), (2, 7)])
def test_every_statistic_matches_the_reference(shape: tuple[int, int]) -> None:
    """Each statistic equals the SVD / matrix_rank / explicit-loop reference (tall, wide, tiny)."""
    features = gaussian(*shape, seed=3) + np.float32(0.5)  # an offset: the spectrum is not centred
    stats = representation_stats(features)
    expected = reference_stats(features)
    assert set(stats) == set(expected)
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_rank_deficient_statistics_match_the_reference() -> None:
    """A rank-3 matrix with a zero row still matches the reference, key by key."""
    rng = np.random.default_rng(4)
    features = (rng.standard_normal((30, 3)) @ rng.standard_normal((3, 10))).astype(np.float32)
    features[7] = 0.0
    stats = representation_stats(features)
    expected = reference_stats(features)
    assert stats["numerical_rank"] == expected["numerical_rank"] == 3
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("shape", [(200, 30), (30, 200)])
def test_singular_values_match_svd(shape: tuple[int, int]) -> None:
    """The Gram-matrix spectrum equals numpy's SVD, descending, min(rows, dim) values."""
    features = gaussian(*shape, seed=5)
    spectrum = singular_values(features)
    reference = np.linalg.svd(features.astype(np.float64), compute_uv=False)
    assert spectrum.shape == (min(shape),)
    assert np.all(np.diff(spectrum) <= 0)
    np.testing.assert_allclose(spectrum, reference, rtol=1e-9)


def test_singular_values_are_not_centred() -> None:
    """A constant offset shows in the spectrum (RankMe uses the raw embeddings)."""
    features = gaussian(100, 8, seed=6)
    offset = singular_values(features + np.float32(10.0))
    assert offset[0] > 5 * singular_values(features)[0]


def test_effective_rank_is_rankme() -> None:
    """effective_rank follows RankMe's formula, eps included, on a hand-made spectrum."""
    spectrum = np.array([4.0, 2.0, 1.0, 1.0, 0.0])
    p = spectrum / spectrum.sum() + 1e-7
    assert effective_rank(spectrum) == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-12)
    assert effective_rank(np.ones(7)) == pytest.approx(7, rel=1e-5)
    assert effective_rank(np.zeros(4)) == 0.0


def test_numerical_rank_uses_float32_tolerance() -> None:
    """Singular values below s.max() * max(M, N) * eps(float32) do not count, as in matrix_rank."""
    rng = np.random.default_rng(7)
    u, _ = np.linalg.qr(rng.standard_normal((64, 5)))
    v, _ = np.linalg.qr(rng.standard_normal((48, 5)))
    spectrum = np.array([1.0, 1e-2, 1e-3, 1e-7, 1e-8])
    features = ((u * spectrum) @ v.T).astype(np.float32)
    # tolerance = 1.0 * 64 * 1.19e-7 = 7.6e-6: three values are above it
    assert numerical_rank(spectrum, 64, 48) == 3
    assert numerical_rank(singular_values(features), 64, 48) == 3
    assert np.linalg.matrix_rank(features) == 3
    assert numerical_rank(np.array([]), 0, 4) == 0


def test_nonfinite_rows_are_dropped_and_counted() -> None:
    """NaN and Inf rows are left out of every statistic and counted in nonfinite_rows."""
    features = gaussian(50, 10, seed=8)
    dirty = features.copy()
    dirty[3, 2] = np.nan
    dirty[17] = np.inf
    dirty[40, 0] = -np.inf
    stats = representation_stats(dirty)
    clean = representation_stats(np.delete(features, [3, 17, 40], axis=0))
    assert stats.pop("nonfinite_rows") == 3
    assert clean.pop("nonfinite_rows") == 0
    assert stats == pytest.approx(clean, rel=1e-12)
    assert stats["rows"] == 47


def test_zero_rows_produce_no_nan() -> None:
    """Zero rows count as cosine 0 and never produce NaN; an all-zero batch has rank 0."""
    features = gaussian(20, 6, seed=9)
    features[[0, 5]] = 0.0
    stats = representation_stats(features)
    assert all(math.isfinite(value) for value in stats.values())
    assert stats["mean_pairwise_cosine"] == pytest.approx(
        reference_stats(features)["mean_pairwise_cosine"], rel=1e-9
    )

    zeros = representation_stats(np.zeros((10, 4), dtype=np.float32))
    assert all(math.isfinite(value) for value in zeros.values())
    assert zeros["effective_rank"] == 0
    assert zeros["numerical_rank"] == 0
    assert zeros["mean_pairwise_cosine"] == 0
    assert zeros["collapse_ratio"] == 0


@pytest.mark.parametrize(
    ("features", "message"),
    [
        (np.zeros(8, dtype=np.float32), "2-d"),
        (np.zeros((2, 3, 4), dtype=np.float32), "2-d"),
        (np.zeros((0, 8), dtype=np.float32), "at least 2 rows"),
        (np.ones((1, 8), dtype=np.float32), "at least 2 rows"),
        (np.ones((4, 0), dtype=np.float32), "dim must be at least 1"),
        (np.array([["a", "b"], ["c", "d"]]), "real numbers"),
        (np.array([[1.0, np.nan], [np.inf, 0.0], [0.0, 1.0]]), "only 1 are finite"),
    ],
)
def test_bad_input_raises_value_error(features: npt.NDArray[np.generic], message: str) -> None:
    """Wrong ndim, too few (finite) rows, zero width or non-numbers raise a clear ValueError."""
    with pytest.raises(ValueError, match=message):
        representation_stats(features)


def test_singular_values_reject_nonfinite() -> None:
    """singular_values refuses NaN instead of returning a garbage spectrum."""
    with pytest.raises(ValueError, match="NaN or Inf"):
        singular_values(np.array([[1.0, np.nan], [0.0, 1.0]]))


def test_paired_identical_and_negated_streams() -> None:
    """The same rows give cosine 1 (std 0); negated rows give -1."""
    student = gaussian(64, 16, seed=10)
    same = paired_stats(student, student.copy())
    assert same["pair_cosine_mean"] == pytest.approx(1, abs=1e-12)
    assert same["pair_cosine_std"] == pytest.approx(0, abs=1e-7)
    negated = paired_stats(student, -student)
    assert negated["pair_cosine_mean"] == pytest.approx(-1, abs=1e-12)
    assert set(same) == {"pair_cosine_mean", "pair_cosine_std"}


def test_paired_cosine_matches_row_loop() -> None:
    """Row-wise cosine mean and std equal an explicit loop; NaN and zero rows are handled."""
    student = gaussian(30, 8, seed=11)
    teacher = gaussian(30, 8, seed=12)
    teacher[4] = 0.0
    student[9, 1] = np.nan
    cosines = []
    for i in range(30):
        if i == 9:
            continue
        s, t = student[i].astype(np.float64), teacher[i].astype(np.float64)
        denominator = np.linalg.norm(s) * np.linalg.norm(t)
        cosines.append(float(s @ t / denominator) if denominator > 0 else 0.0)
    stats = paired_stats(student, teacher)
    assert stats["pair_cosine_mean"] == pytest.approx(float(np.mean(cosines)), rel=1e-9)
    assert stats["pair_cosine_std"] == pytest.approx(float(np.std(cosines)), rel=1e-9)


def test_paired_shape_mismatch_names_both_shapes() -> None:
    """Streams of different shapes raise ValueError naming both shapes."""
    with pytest.raises(ValueError, match=r"student \(10, 4\), teacher \(10, 5\)"):
        paired_stats(np.ones((10, 4)), np.ones((10, 5)))
    with pytest.raises(ValueError, match="2-d"):
        paired_stats(np.ones(4), np.ones(4))
