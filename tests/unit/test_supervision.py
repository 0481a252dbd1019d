"""Give-up rules as pure objects."""

from services.supervision import NonFiniteGuard, is_non_finite


def test_non_finite_reasons_are_told_from_benign_skips():
    assert is_non_finite("non-finite loss (nan) in micro-batch 0")
    assert is_non_finite("non-finite gradient norm (inf)")
    assert not is_non_finite("no signal")
    assert not is_non_finite(None)


def test_the_guard_gives_up_only_after_the_limit_in_a_row():
    guard = NonFiniteGuard(limit=3)
    outcomes = [
        guard.observe(reason)
        for reason in ["non-finite loss (nan)", "non-finite loss (nan)", None, "non-finite loss (inf)", "no signal"]
    ]
    assert outcomes == [False, False, False, False, False]  # a finite step or a benign skip resets the count
    assert guard.total == 3 and guard.consecutive == 0
    assert [guard.observe("non-finite gradient norm (nan)") for _ in range(3)] == [False, False, True]
    assert guard.consecutive == 3 and guard.total == 6


def test_a_limit_of_zero_never_gives_up():
    guard = NonFiniteGuard(limit=0)
    assert not any(guard.observe("non-finite loss (nan)") for _ in range(100))
