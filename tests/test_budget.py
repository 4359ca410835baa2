"""Budgets: bytes, size strings and fractions; bad values explain themselves."""

import pytest

from moe_runtime.budget import format_bytes, parse_budget


@pytest.mark.parametrize(
    "budget, expected",
    [
        (1000, 1000),
        ("512MiB", 512 * 2**20),
        ("6GiB", 6 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("2048", 2048),
        (0.25, 250),
        ("0.5", 500),
        (1.0, 1000),
    ],
)
def test_parse(budget, expected):
    assert parse_budget(budget, total_bytes=1000) == expected


@pytest.mark.parametrize("budget, message", [(0, "positive"), (1.5, "fraction"), ("lots", "not a size"), ("3 parsecs", "not a size")])
def test_bad_budgets(budget, message):
    with pytest.raises(ValueError, match=message):
        parse_budget(budget, total_bytes=1000)


def test_format():
    assert format_bytes(1536) == "1.5 KiB" and format_bytes(12) == "12 B"
