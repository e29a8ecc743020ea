"""Usage windows read from headers (addon/limits.py): subscriptions, API keys, and bad values."""

from __future__ import annotations

import pytest

from addon.state import limits
from addon.state.limits import Window

NOW = 1_800_000_000.0
U = "anthropic-ratelimit-unified-"


def test_a_subscription_response_gives_every_window_and_the_overall_status() -> None:
    reading = limits.read(
        [
            (U + "status", "allowed_warning"),
            (U + "reset", str(int(NOW + 600))),
            (U + "representative-claim", "five_hour"),
            (U + "5h-utilization", "0.83"),
            (U + "5h-reset", str(int(NOW + 600))),
            (U + "5h-status", "allowed_warning"),
            (U + "7d-utilization", "0.2"),
            (U + "7d-reset", str(int(NOW + 86400))),
            (U + "7d-status", "allowed"),
            (U + "7d-sonnet-utilization", "0.05"),
            (U + "overage-status", "rejected"),
            (U + "overage-in-use", "false"),
            (U + "overage-reset", str(int(NOW + 600))),
        ],
        now=NOW,
    )
    assert reading.windows == {
        "5h": Window(0.83, "allowed_warning", NOW + 600),
        "7d": Window(0.2, "allowed", NOW + 86400),
        "7d-sonnet": Window(0.05, None, None),
    }
    assert reading.status == "allowed_warning" and reading.resets_at == NOW + 600
    assert reading.overage_in_use is False


def test_overage_in_use_is_read() -> None:
    reading = limits.read([(U + "status", "rejected"), (U + "overage-in-use", "true")], now=NOW)
    assert reading.status == "rejected" and reading.overage_in_use


def test_api_key_headers_become_windows_with_utilization() -> None:
    reset = "2027-01-15T08:00:30Z"
    reading = limits.read(
        [
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "10"),
            ("anthropic-ratelimit-requests-reset", reset),
            ("anthropic-ratelimit-tokens-limit", "1000"),
            ("anthropic-ratelimit-tokens-remaining", "0"),
            ("anthropic-ratelimit-tokens-reset", reset),
        ],
        now=NOW,
    )
    assert reading.windows["requests"].utilization == pytest.approx(0.8)
    assert reading.windows["requests"].status == "allowed"
    # exhausted, not rejected: the request that said so was accepted
    assert reading.windows["tokens"] == Window(1.0, "exhausted", reading.windows["tokens"].resets_at)
    assert reading.status is None  # no unified status: an API key


@pytest.mark.parametrize(
    "name,value",
    [
        ("5h-utilization", "7"),
        ("5h-utilization", "-0.1"),
        ("5h-utilization", "nan"),
        ("5h-utilization", "lots"),
        ("5h-reset", "-5"),
        ("5h-reset", str(int(NOW - 60))),  # in the past
        ("5h-reset", str(int(NOW + 400 * 86400))),  # a year away
        ("5h-reset", "tomorrow"),
        ("5h-status", "exploded"),
        ("status", "maybe"),
    ],
)
def test_a_bad_value_is_left_out_of_the_reading(name: str, value: str) -> None:
    reading = limits.read([(U + name, value)], now=NOW)
    assert not reading
    assert reading.windows == {} and reading.status is None


def test_a_bad_value_does_not_spoil_the_good_ones() -> None:
    reading = limits.read(
        [(U + "5h-utilization", "7"), (U + "5h-reset", str(int(NOW + 60))), (U + "7d-utilization", "0.5")],
        now=NOW,
    )
    assert reading.windows == {"5h": Window(None, None, NOW + 60), "7d": Window(0.5, None, None)}


def test_window_names_are_bounded_in_form_and_number() -> None:
    headers = [(U + f"w{i}-utilization", "0.1") for i in range(50)]
    headers += [(U + "Weird Name!-utilization", "0.1"), (U + ("x" * 40) + "-utilization", "0.1")]
    reading = limits.read(headers, now=NOW)
    assert len(reading.windows) == limits.MAX_WINDOWS
    assert all(limits.WINDOW_NAME.fullmatch(name) for name in reading.windows)


def test_overage_headers_are_not_a_window() -> None:
    reading = limits.read(
        [(U + "overage-status", "allowed"), (U + "overage-reset", str(int(NOW + 9)))], now=NOW
    )
    assert reading.windows == {}


def test_a_window_reading_lapses_at_its_reset() -> None:
    window = Window(0.99, "rejected", NOW + 10)
    assert window.current(NOW + 9.9) and not window.current(NOW + 10)
