"""2-D RoPE positions of Infinity's mode 2 ("star"), checked against reference §5.3 examples."""

from __future__ import annotations

import torch

from adapters.geometry import INFINITY_TEMPLATES
from adapters.infinity.rope import apply_rope, rope_inverse_frequencies, rope_table, star_positions


def test_square_schedule_rows():
    last = (64, 64)
    rows = lambda n: star_positions((n, n), last)[0].view(n, n)[:, 0].tolist()
    assert rows(1) == [0] and rows(2) == [0, 32] and rows(4) == [0, 16, 32, 48]
    assert rows(6) == [0, 11, 21, 32, 43, 53]
    assert rows(12) == [0, 5, 11, 16, 21, 27, 32, 37, 43, 48, 53, 59]
    assert rows(20) == [0, 3, 6, 10, 13, 16, 19, 22, 26, 29, 32, 35, 38, 42, 45, 48, 51, 54, 58, 61]
    assert rows(64) == list(range(64))


def test_half_to_even_ties_of_non_square_templates():
    last = INFINITY_TEMPLATES[2.0][-1]  # (90, 45)
    rows, cols = star_positions((4, 2), last)
    assert rows.view(4, 2)[:, 0].tolist() == [0, 22, 45, 68]  # 22.5 -> 22, 67.5 -> 68
    assert cols.view(4, 2)[0].tolist() == [0, 22]
    last = INFINITY_TEMPLATES[0.8][-1]  # (56, 70)
    rows, _ = star_positions((16, 20), last)
    assert rows.view(16, 20)[[1, 3], 0].tolist() == [4, 10]  # 3.5 -> 4, 10.5 -> 10


def test_table_rotates_rows_then_columns_with_interleaved_pairs():
    head_dim = 16
    template = INFINITY_TEMPLATES[1.0]
    table = rope_table(template, head_dim)
    assert table.shape == (2, 10521, head_dim // 2) and table.dtype == torch.float32
    assert torch.equal(table[0, 0], torch.ones(8)) and torch.equal(table[1, 0], torch.zeros(8))
    inv = rope_inverse_frequencies(head_dim)
    token = 5 + 1 * 4 + 3  # scale 2 (4x4 map), row 1, col 3 -> grid (16, 48)
    expected = torch.cat([16 * inv, 48 * inv])
    torch.testing.assert_close(table[0, token], torch.cos(expected), rtol=0, atol=0)
    x = torch.randn(1, 1, 1, head_dim)
    rotated = apply_rope(x, table, token)
    cos, sin = torch.cos(expected), torch.sin(expected)
    pairs = x.view(-1, 2)
    manual = torch.stack([cos * pairs[:, 0] - sin * pairs[:, 1], sin * pairs[:, 0] + cos * pairs[:, 1]], -1)
    torch.testing.assert_close(rotated.view(-1, 2), manual)
    torch.testing.assert_close(rotated.norm(), x.norm())
