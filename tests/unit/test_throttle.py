"""Login-failure throttling per address (pgtenant/identity/throttle.py), with a fake clock."""

from __future__ import annotations

from pgtenant.identity.throttle import AuthThrottle

__all__: list[str] = []


def test_attempts_up_to_the_limit_are_not_delayed_and_later_ones_are() -> None:
    t = AuthThrottle(limit=2, window=60.0, delay=1.5)
    assert t.delay_for("10.0.0.1", 0.0) == 0.0
    t.record_failure("10.0.0.1", 0.0)
    assert t.delay_for("10.0.0.1", 1.0) == 0.0
    t.record_failure("10.0.0.1", 1.0)
    assert t.delay_for("10.0.0.1", 2.0) == 1.5
    t.record_failure("10.0.0.1", 2.0)
    assert t.delay_for("10.0.0.1", 3.0) == 1.5


def test_addresses_are_counted_separately() -> None:
    t = AuthThrottle(limit=1, window=60.0, delay=2.0)
    t.record_failure("10.0.0.1", 0.0)
    assert t.delay_for("10.0.0.1", 1.0) == 2.0
    assert t.delay_for("10.0.0.2", 1.0) == 0.0


def test_failures_older_than_the_window_no_longer_count() -> None:
    t = AuthThrottle(limit=2, window=10.0, delay=1.0)
    t.record_failure("a", 0.0)
    t.record_failure("a", 5.0)
    assert t.delay_for("a", 9.0) == 1.0
    assert t.delay_for("a", 10.5) == 0.0  # the first failure left the window
    t.record_failure("a", 11.0)
    assert t.delay_for("a", 12.0) == 1.0  # 5.0 and 11.0 are both inside


def test_zero_delay_disables_throttling_and_keeps_no_state() -> None:
    t = AuthThrottle(limit=1, window=60.0, delay=0.0)
    for i in range(10):
        t.record_failure("a", float(i))
    assert t.delay_for("a", 10.0) == 0.0
    assert len(t) == 0


def test_zero_limit_delays_every_failure() -> None:
    t = AuthThrottle(limit=0, window=60.0, delay=0.5)
    assert t.delay_for("fresh", 0.0) == 0.5


def test_memory_is_bounded_and_expired_addresses_go_first() -> None:
    t = AuthThrottle(limit=3, window=10.0, delay=1.0, max_addresses=100)
    for i in range(1000):
        t.record_failure(f"10.0.{i // 256}.{i % 256}", float(i) / 100)
        assert len(t) <= 100
    t.record_failure("fresh", 45.0)
    for i in range(3):
        t.record_failure("attacker", 50.0 + i)
    # At 45 s every one-off address had expired: they were dropped, not the live ones.
    assert len(t) == 2
    assert t.delay_for("attacker", 55.0) == 1.0


def test_full_table_of_live_addresses_evicts_the_least_recent() -> None:
    t = AuthThrottle(limit=1, window=1000.0, delay=1.0, max_addresses=3)
    for i, addr in enumerate(("a", "b", "c")):
        t.record_failure(addr, float(i))
    t.record_failure("a", 3.0)  # a is now the most recent
    t.record_failure("d", 4.0)  # table full, nothing expired: b (oldest) goes
    assert len(t) == 3
    assert t.delay_for("b", 5.0) == 0.0
    assert all(t.delay_for(x, 5.0) == 1.0 for x in ("a", "c", "d"))


def test_per_address_history_is_capped_at_the_limit() -> None:
    t = AuthThrottle(limit=3, window=60.0, delay=1.0)
    for i in range(1000):
        t.record_failure("a", float(i) / 1000)
    assert len(t._failures["a"]) == 3


def test_libpq_retry_of_one_attempt_counts_once_and_waits_no_longer() -> None:
    # sslmode=prefer: every refused login comes twice, ~10 ms apart (TLS, then plaintext).
    t = AuthThrottle(limit=5, window=60.0, delay=2.0)
    now = 0.0
    for typo in ("tokn1", "tokn2", "tokn3"):  # a person's three typos, then the right token
        attempt = f"alice\0app\0{typo}"
        for _ in range(2):
            assert t.delay_for("h", now, attempt) == 0.0, (typo, now)
            t.record_failure("h", now, attempt)
            now += 0.01
        now += 5.0  # reading the error, typing again
    assert len(t._failures["h"]) == 3  # one per attempt, not one per connection


def test_the_retry_of_a_delayed_attempt_is_delayed_too() -> None:
    t = AuthThrottle(limit=1, window=60.0, delay=2.0)
    t.record_failure("h", 0.0, "a")
    assert t.delay_for("h", 10.0, "b") == 2.0  # over the limit: a new attempt waits
    t.record_failure("h", 10.0, "b")
    assert t.delay_for("h", 12.1, "b") == 2.0  # and so does its retry
    t.record_failure("h", 12.1, "b")


def test_scripts_are_still_counted_per_guess_and_per_retry_window() -> None:
    t = AuthThrottle(limit=3, window=60.0, delay=1.0)
    for i in range(3):  # three different guesses in a burst: three failures
        t.record_failure("h", i * 0.01, f"guess{i}")
    assert t.delay_for("h", 0.1, "guess3") == 1.0
    u = AuthThrottle(limit=3, window=60.0, delay=1.0, retry_window=2.0)
    for i in range(7):  # one wrong token hammered every second: counted every 2+ s
        u.record_failure("h", float(i), "same")
    assert u.delay_for("h", 7.0, "other") == 1.0


def test_same_fingerprint_after_the_retry_window_is_a_new_attempt() -> None:
    t = AuthThrottle(limit=2, window=60.0, delay=1.0, retry_window=2.0)
    t.record_failure("h", 0.0, "same")
    t.record_failure("h", 1.0, "same")  # the retry: not counted
    assert t.delay_for("h", 3.0, "x") == 0.0
    t.record_failure("h", 3.0, "same")  # typed the same typo again: counted
    assert t.delay_for("h", 4.0, "x") == 1.0
