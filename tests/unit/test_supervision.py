"""Give-up rules as pure objects."""

from orchard.learner.trainer import StepResult
from orchard.services.supervision import NonFiniteGuard


def step(skip_reason: str | None = None, *, non_finite: bool = False) -> StepResult:
    return StepResult(
        loss=0.0,
        kl=0.0,
        entropy=0.0,
        clip_fraction=0.0,
        grad_norm=0.0,
        num_sequences=8,
        num_tokens=64,
        advantages_abs_mean=0.0,
        seconds=0.1,
        skipped=skip_reason is not None,
        skip_reason=skip_reason,
        non_finite=non_finite,
    )


NAN_LOSS = step("non-finite loss (nan) in micro-batch 0", non_finite=True)
INF_GRADIENT = step("non-finite gradient norm (inf)", non_finite=True)


def test_the_guard_gives_up_only_after_the_limit_in_a_row():
    guard = NonFiniteGuard(limit=3)
    outcomes = [guard.observe(result) for result in [NAN_LOSS, NAN_LOSS, step(), INF_GRADIENT, step("no signal")]]
    assert outcomes == [False, False, False, False, False]  # a finite step or a benign skip resets the count
    assert guard.total == 3 and guard.consecutive == 0
    assert [guard.observe(INF_GRADIENT) for _ in range(3)] == [False, False, True]
    assert guard.consecutive == 3 and guard.total == 6
    assert guard.reasons[-1] == "non-finite gradient norm (inf)"


def test_a_limit_of_zero_never_gives_up():
    guard = NonFiniteGuard(limit=0)
    assert not any(guard.observe(NAN_LOSS) for _ in range(100))
