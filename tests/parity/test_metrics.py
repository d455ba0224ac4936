"""parity.metrics: ULP distances (float32, bfloat16, float16, float64), cosine, tolerances, compare."""

import numpy as np
import pytest

from parity.metrics import compare, cosine_similarity, round_to, tolerance, ulp_distance, ulp_of


def test_ulp_float32_neighbours_and_zero():
    one = np.float32(1.0)
    up = np.nextafter(one, np.float32(2))
    assert ulp_distance(up, one, "float32") == 1
    assert ulp_distance(np.nextafter(up, np.float32(2)), one, "float32") == 2
    assert ulp_distance(np.float32(-0.0), np.float32(0.0), "float32") == 0
    tiny = np.nextafter(np.float32(0), np.float32(1))  # smallest subnormal
    assert ulp_distance(-tiny, tiny, "float32") == 2
    # 1 ULP below 1.0 is half the size of 1 ULP above it
    assert ulp_distance(np.nextafter(one, np.float32(0)), one, "float32") == 1


def test_ulp_bfloat16_by_bits_and_ml_dtypes():
    # bfloat16 has 7 explicit mantissa bits: the neighbour of 1.0 is 1 + 2**-7
    assert ulp_distance(1.0 + 2**-7, 1.0, "bfloat16") == 1
    assert ulp_distance(1.0 + 2**-6, 1.0, "bfloat16") == 2
    assert ulp_distance(-1.0, 1.0, "bfloat16") == 2 * 0x3F80
    # values that differ below bfloat16 resolution round to the same number
    assert ulp_distance(1.0 + 2**-10, 1.0, "bfloat16") == 0
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 100
    ours = round_to(x, "bfloat16")
    theirs = x.astype(ml_dtypes.bfloat16).astype(np.float64)
    np.testing.assert_array_equal(ours, theirs)  # round-to-nearest-even, like ml_dtypes


def test_ulp_float16_and_float64():
    assert ulp_distance(np.float16(1.0) + np.float16(2**-10), 1.0, "float16") == 1
    assert ulp_distance(np.nextafter(1.0, 2.0), 1.0, "float64") == 1
    # opposite-sign float64 extremes do not overflow
    big = np.finfo(np.float64).max
    assert ulp_distance(-big, big, "float64") == 2 * np.float64(big).view(np.uint64)


def test_ulp_of():
    assert ulp_of(1.0, "float32") == 2.0**-23
    assert ulp_of(1.0, "bfloat16") == 2.0**-7
    assert ulp_of(3.0, "float16") == 2.0**-9
    assert ulp_of(0.0, "float32") == 2.0**-149


def test_cosine():
    a = np.array([1.0, 2.0, 3.0])
    assert cosine_similarity(a, 2 * a) == pytest.approx(1.0)
    assert cosine_similarity(a, -a) == pytest.approx(-1.0)
    assert cosine_similarity([1.0, 0.0], [0.0, 1.0]) == pytest.approx(0.0)
    assert cosine_similarity(np.zeros(3), np.zeros(3)) == 1.0


def test_compare_pass_fail_and_ratio():
    e = np.linspace(-1, 1, 11)
    m = compare(e + 5e-6, e, "float32", rtol=1e-4, atol=1e-5)
    assert m.passed and 0 < m.tol_ratio < 1
    assert m.max_abs == pytest.approx(5e-6)
    m = compare(e + 1e-3, e, "float32", rtol=1e-4, atol=1e-5)
    assert not m.passed and m.tol_ratio > 1
    assert m.ulp_at_scale == pytest.approx(1e-3 / 2**-23, rel=1e-6)
    with pytest.raises(ValueError, match="shapes"):
        compare(np.zeros(2), np.zeros(3), "float32", rtol=0, atol=0)
    assert not compare([np.nan], [1.0], "float32", rtol=1, atol=1).passed


def test_tolerance_defaults_and_overrides():
    assert tolerance("float32") == {"rtol": 1e-4, "atol": 1e-5}
    assert tolerance("bfloat16", "grad")["rtol"] > tolerance("bfloat16")["rtol"]
    assert tolerance("float32", overrides={"*": {"atol": 1.0}})["atol"] == 1.0
    assert tolerance("float32", overrides={"float32": {"rtol": 0.5}, "*": {"rtol": 0.1}})["rtol"] == 0.5
    assert tolerance("float64", "exact") == {"rtol": 0.0, "atol": 0.0}
    with pytest.raises(ValueError, match="dtype"):
        tolerance("int8")


# ---------------------------------------------------------------------- issue 12: no false PASS
@pytest.mark.parametrize("bad", [-1, -1e-12, float("nan"), float("inf"), "abc", None, True])
def test_negative_or_nonfinite_tolerance_is_refused(bad):
    # a negative atol/rtol made every comparison pass; NaN compared false against every error
    with pytest.raises(ValueError, match="must be"):
        compare(np.ones(3) + 1, np.ones(3), "float32", rtol=bad, atol=0.0)
    with pytest.raises(ValueError, match="must be"):
        compare(np.ones(3) + 1, np.ones(3), "float32", rtol=0.0, atol=bad)
    with pytest.raises(ValueError, match=r"tolerances\['float32'\]\['atol'\]"):
        tolerance("float32", overrides={"float32": {"atol": bad}})


def test_tolerance_overrides_are_validated():
    with pytest.raises(ValueError, match="'int8'"):
        tolerance("float32", overrides={"int8": {"atol": 1.0}})
    with pytest.raises(ValueError, match="'atl'"):
        tolerance("float32", overrides={"*": {"atl": 1.0}})


def test_nan_against_nan_is_never_zero_error():
    # the old compare counted NaN vs NaN as 0 error: max_abs=0.0, cosine=nan, PASS
    m = compare([np.nan, 1.0], [np.nan, 1.0], "float32", rtol=1e-4, atol=1e-5)
    assert not m.passed and m.nonfinite_matched == 1 and m.tol_ratio == np.inf
    assert "allow_nonfinite" in m.nonfinite_reason()
    # all NaN: nothing finite to measure, the figures are undefined (not 0 / a cosine of 1)
    m = compare(np.full(4, np.nan), np.full(4, np.nan), "float32", rtol=1, atol=1)
    assert not m.passed and np.isnan(m.max_abs) and np.isnan(m.cosine)


def test_nonfinite_actual_where_expected_is_finite_fails_on_its_own():
    e = np.linspace(-1, 1, 8)
    for bad in (np.nan, np.inf, -np.inf):
        a = e.copy()
        a[3] = bad
        for allow in (False, True):
            m = compare(a, e, "float32", rtol=1e9, atol=1e9, allow_nonfinite=allow)  # no tolerance hides it
            assert not m.passed and m.nonfinite == 1 and m.worst_index == 3
            assert m.max_abs == 0.0 and m.cosine == pytest.approx(1.0)  # the finite elements agree
            assert m.nonfinite_reason("the float64 answer") == "1 NaN/Inf element(s) where the float64 answer is finite"


def test_allow_nonfinite_compares_masks():
    e = np.array([np.nan, np.inf, -np.inf, 1.0])
    assert compare(e, e, "float32", rtol=0, atol=0, allow_nonfinite=True).passed
    assert not compare(e, e, "float32", rtol=0, atol=0).passed
    for a in ([np.inf, np.inf, -np.inf, 1.0], [np.nan, -np.inf, -np.inf, 1.0], [np.nan, np.inf, 2.0, 1.0]):
        m = compare(a, e, "float32", rtol=1e9, atol=1e9, allow_nonfinite=True)
        assert not m.passed and m.mask_mismatch == 1 and m.nonfinite == 0
