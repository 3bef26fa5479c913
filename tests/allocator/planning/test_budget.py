"""Budget strings: one parser, good and bad inputs."""

import pytest

from allocator.errors import BudgetError
from allocator.planning.budget import Budget, format_bytes


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("12MB", "bytes", 12_000_000),
        ("0.3GB", "bytes", 300_000_000),
        ("300MiB", "bytes", 300 * 2**20),
        ("12 mb", "bytes", 12_000_000),
        ("512kB", "bytes", 512_000),
        ("3.5bpw", "bpw", 3.5),
        ("4 bits", "bpw", 4.0),
        ("25%", "fraction", 0.25),
        ("100%", "fraction", 1.0),
        ("40GBOPs", "bops", 40e9),
        ("1.5 TBOPs", "bops", 1.5e12),
        ("800bops", "bops", 800),
        ("1e-3MB", "bytes", 1000),  # scientific notation is a number, not a unit
        ("2.5E9B", "bytes", 2.5e9),
        ("0.3 GB", "bytes", 300_000_000),
        ("3.5 bpw", "bpw", 3.5),
        ("1 GiB", "bytes", 2**30),
        ("4096 bytes", "bytes", 4096),
    ],
)
def test_good_budgets(text, kind, value):
    b = Budget.parse(text)
    assert b.kind == kind and b.value == pytest.approx(value) and b.text == text.strip()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty budget"),
        ("12", "has no unit"),
        ("abc", "cannot read budget"),
        ("-1MB", "cannot read budget"),
        ("0MB", "must be positive"),
        ("0bpw", "must be positive"),
        ("150%", "more than the whole fp16 model"),
        ("12 parsecs", "cannot read budget"),
        ("5e", "cannot read budget"),
        ("nanGB", "cannot read budget"),
        ("99999999999999999999999GB", "larger than any model can use"),
        ("1e999GB", "larger than any model can use"),
        ("1e30bpw", "larger than any model can use"),
        ("0.5B", "less than one byte"),
        ("0e5MB", "must be positive"),
    ],
)
def test_bad_budgets_name_the_accepted_forms(text, message):
    with pytest.raises(BudgetError, match=message) as info:
        Budget.parse(text)
    assert "\n" not in str(info.value)


def test_limits_cover_the_whole_model():
    sizes = {"fp16_bytes": 1_000_000, "fixed_bytes": 10_000, "quantizable_params": 400_000}
    assert Budget.parse("500kB").limit(**sizes) == 490_000
    assert Budget.parse("50%").limit(**sizes) == 490_000
    assert Budget.parse("4bpw").limit(**sizes) == 200_000
    assert Budget.parse("3GBOPs").limit(**sizes) == 3_000_000_000
    assert Budget.parse("4bpw").describe_minimum(150_000, **sizes) == "3.000bpw"
    assert Budget.parse("500kB").describe_minimum(150_000, **sizes) == "160.00 kB"


def test_format_bytes():
    assert format_bytes(11_994_000) == "11.99 MB"
    assert format_bytes(512) == "512 B"
