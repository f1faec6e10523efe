from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidings import ConfigurationError, RetryPolicy


@given(
    delays=st.lists(st.floats(min_value=0, max_value=3600), min_size=1, max_size=6),
    jitter=st.floats(min_value=0, max_value=1),
    data=st.data(),
)
def test_each_delay_stays_within_its_jitter(delays: list[float], jitter: float, data: st.DataObject) -> None:
    policy = RetryPolicy(delays=tuple(delays), jitter=jitter)
    round_number = data.draw(st.integers(min_value=1, max_value=len(delays)))
    delay = policy.delay_after(round_number)
    base = delays[round_number - 1]
    assert delay is not None
    assert max(0.0, base * (1 - jitter)) - 1e-9 <= delay <= base * (1 + jitter) + 1e-9


def test_after_the_last_delay_there_is_no_further_round() -> None:
    policy = RetryPolicy(delays=(1.0, 2.0))
    assert policy.rounds == 3
    assert policy.delay_after(3) is None
    assert RetryPolicy.none().delay_after(1) is None


def test_never_retry_types_are_not_retried() -> None:
    policy = RetryPolicy(never_retry=(KeyError,))
    assert not policy.retries(KeyError("x"))
    assert policy.retries(ValueError("x"))


@pytest.mark.parametrize("kwargs", [{"immediate": -1}, {"delays": (1.0, -2.0)}, {"jitter": 1.5}])
def test_nonsense_policies_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
