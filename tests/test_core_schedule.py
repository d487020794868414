"""ScaleSchedule: shapes, offsets, cumulative lengths, N_ref, token lookup, prefixes, bad input."""

import pytest
import torch

from kvpolicy import ScaleSchedule

INFINITY_1024 = [1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64]
VAR_256 = [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]


def test_var_patch_nums():
    s = ScaleSchedule(VAR_256)
    assert s.shapes[:3] == ((1, 1), (2, 2), (3, 3)) and s.num_scales == len(s) == 10
    assert s.lengths == (1, 4, 9, 16, 25, 36, 64, 100, 169, 256)
    assert s.offsets == (0, 1, 5, 14, 30, 55, 91, 155, 255, 424)
    assert s.cumulative == (1, 5, 14, 30, 55, 91, 155, 255, 424, 680)
    assert s.total == 680 and s.reference_length == 424


def test_infinity_1024_lengths():
    s = ScaleSchedule([(1, p, p) for p in INFINITY_1024])  # Infinity's (t, h, w) triples
    assert s.total == 10521 and s.reference_length == 6425
    assert s.cumulative_length(11) == 6425 and s.tokens(11) == 2304 and s.offset(12) == 6425
    assert s.shape(11) == (48, 48)
    assert str(s.prefix(3)) == "1x1 2x2 4x4 (21 tokens)"


def test_rectangular_and_single_scale():
    s = ScaleSchedule([(1, 1), (2, 3), (3, 2)])
    assert s.lengths == (1, 6, 6) and s.offsets == (0, 1, 7)
    assert ScaleSchedule([(4, 5)]).reference_length == 20  # one scale: its own length


def test_locate_every_token():
    s = ScaleSchedule([(1, 1), (2, 3), (3, 2)])
    assert s.locate(0) == (0, 0, 0)
    assert s.locate(1) == (1, 0, 0) and s.locate(3) == (1, 0, 2) and s.locate(4) == (1, 1, 0)
    assert s.locate(7) == (2, 0, 0) and s.locate(12) == (2, 2, 1)
    scale, row, col = s.locate_tensor(torch.arange(s.total))
    assert [(int(a), int(b), int(c)) for a, b, c in zip(scale, row, col)] == [s.locate(t) for t in range(s.total)]
    assert s.scale_of_positions(8).tolist() == [0, 1, 1, 1, 1, 1, 1, 2]
    with pytest.raises(IndexError, match=r"token 13 out of range 0\.\.12"):
        s.locate(13)
    with pytest.raises(IndexError, match=r"token -1 out of range"):
        s.locate(-1)
    with pytest.raises(IndexError, match=r"0\.\.12"):
        s.locate_tensor(torch.tensor([0, 13]))


def test_prefix():
    s = ScaleSchedule(VAR_256)
    assert s.prefix(10) == s and s.prefix(4).cumulative == (1, 5, 14, 30)
    for bad in (0, 11):
        with pytest.raises(ValueError, match=rf"prefix length {bad} must be in 1\.\.10"):
            s.prefix(bad)


@pytest.mark.parametrize("method", ["tokens", "shape", "offset", "cumulative_length"])
@pytest.mark.parametrize("scale", [-1, 3, True, 1.0])
def test_scale_out_of_range(method, scale):
    with pytest.raises(IndexError, match=r"scale .* out of range 0\.\.2"):
        getattr(ScaleSchedule([1, 2, 3]), method)(scale)


@pytest.mark.parametrize("shapes,pattern", [
    ([], "at least one scale"),
    ([(0, 2)], r"\(0, 2\) must be two positive integers"),
    ([(2, -1)], "positive integers"),
    ([(2.0, 2)], "positive integers"),
    ([(True, 2)], "positive integers"),
    ([(2, 1, 1)], "only t=1"),
    ([(1, 2, 3, 4)], r"must be \(h, w\), \(1, h, w\) or a side length"),
    ([0], "positive integers"),
    ([(2, True)], r"\(2, True\) must be two positive integers"),
    ([True, 2], r"schedule entry True must be \(h, w\), \(1, h, w\) or a side length"),
    ([2.5], r"schedule entry 2.5 must be \(h, w\), \(1, h, w\) or a side length"),
])
def test_bad_schedules(shapes, pattern):
    with pytest.raises(ValueError, match=pattern):
        ScaleSchedule(shapes)
