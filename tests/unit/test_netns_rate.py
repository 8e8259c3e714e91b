"""tc-style bandwidth strings and the token-bucket size chosen for them."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idla.emulate.netns import MIN_BURST_BYTES, parse_rate, tbf_burst_bytes
from idla.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected_bit_s"),
    [
        ("10mbit", 10_000_000),
        ("1gbit", 1_000_000_000),
        ("500kbit", 500_000),
        ("100mbps", 800_000_000),
        ("1.5mbit", 1_500_000),
        ("8000", 8_000),
        ("64bit", 64),
        ("2kbps", 16_000),
        (" 10MBit ", 10_000_000),
        (".5mbit", 500_000),
    ],
)
def test_parse_rate_accepts_tc_rates(text: str, expected_bit_s: int) -> None:
    assert parse_rate(text) == expected_bit_s


@pytest.mark.parametrize(
    "text", ["10 potatoes", "", "mbit", "-5mbit", "1e6", "10mb", "nan", "inf", "1,5mbit"]
)
def test_parse_rate_rejects_what_does_not_parse(text: str) -> None:
    with pytest.raises(ConfigError, match=r"does not parse; use e\.g\. 10mbit, 500kbit, 1gbit"):
        parse_rate(text)


@pytest.mark.parametrize("text", ["0", "0mbit", "0.0kbit", "0.4bit"])
def test_parse_rate_rejects_zero(text: str) -> None:
    with pytest.raises(ConfigError, match="must be a positive rate"):
        parse_rate(text)


def test_parse_rate_message_names_the_input() -> None:
    with pytest.raises(ConfigError) as info:
        parse_rate("10 potatoes")

    assert str(info.value) == (
        "bandwidth '10 potatoes' does not parse; use e.g. 10mbit, 500kbit, 1gbit"
    )


@given(st.text())
def test_parse_rate_any_text_gives_a_positive_rate_or_config_error(text: str) -> None:
    try:
        rate_bit_s = parse_rate(text)
    except ConfigError as error:
        assert "\n" not in str(error).replace(repr(text), "")
    else:
        assert rate_bit_s > 0


def test_burst_holds_ten_ms_but_never_under_the_floor() -> None:
    assert tbf_burst_bytes(8_000_000) == MIN_BURST_BYTES
    assert tbf_burst_bytes(1_000_000_000) == 1_250_000
    assert tbf_burst_bytes(1) == MIN_BURST_BYTES
