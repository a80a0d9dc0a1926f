"""The ledger as a data structure: atomic reservations never overcommit."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmx.broker.ledger import Ledger
from lmx.common.errors import Code, Reason


def test_cap_is_percent_of_total():
    led = Ledger(1000, 90)
    assert led.max_bytes == 900
    assert led.try_reserve("a", 900) is None
    denial = led.try_reserve("b", 1)
    assert denial.reason == Reason.CAP
    assert (denial.ledger_max_bytes, denial.ledger_allocated_bytes, denial.requested_bytes) == \
        (900, 900, 1)
    err = denial.error("agent b")
    assert err.code == Code.VRAM_LEDGER_DENY and err.fields()["requested_bytes"] == 1


def test_unknown_total_denies_everything():
    led = Ledger(None)
    assert led.try_reserve("a", 1).reason == Reason.NO_DEVICE_TOTAL
    assert led.allocated_bytes == 0


def test_release_and_double_booking():
    led = Ledger(1000, 100)
    assert led.try_reserve("a", 400) is None
    with pytest.raises(KeyError):
        led.try_reserve("a", 1)
    assert led.release("a") == 400
    assert led.release("a") == 0
    assert led.allocated_bytes == 0


@pytest.mark.parametrize("bad", [0, -5])
def test_bad_totals_rejected(bad):
    with pytest.raises(ValueError):
        Ledger(bad)
    with pytest.raises(ValueError):
        Ledger(100, admission_percent=0 if bad == 0 else 101)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10**6), st.integers(1, 100),
       st.lists(st.tuples(st.booleans(), st.integers(0, 9), st.integers(0, 10**5)), max_size=60))
def test_invariants_hold_after_every_operation(total, percent, ops):
    led = Ledger(total, percent)
    for reserve, key, nbytes in ops:
        if reserve and led.booked(f"k{key}") is None:
            led.try_reserve(f"k{key}", nbytes)
        elif not reserve:
            led.release(f"k{key}")
        snap = led.snapshot()
        assert snap["ledger_allocated_bytes"] == sum(snap["bookings"].values())
        assert snap["ledger_allocated_bytes"] <= snap["ledger_max_bytes"]


def test_resize_grows_only_within_the_cap_and_always_shrinks():
    led = Ledger(1000, 100)
    assert led.try_reserve("a", 600) is None and led.try_reserve("b", 300) is None
    denial = led.try_resize("a", 800)                 # +200 over a 1000 cap with 900 booked
    assert denial is not None and denial.requested_bytes == 200
    assert led.booked("a") == 600 and led.allocated_bytes == 900
    assert led.try_resize("a", 700) is None and led.allocated_bytes == 1000
    assert led.try_resize("a", 100) is None and led.allocated_bytes == 400
    with pytest.raises(KeyError):
        led.try_resize("ghost", 1)
