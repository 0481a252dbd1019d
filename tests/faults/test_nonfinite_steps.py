"""Non-finite learner steps at run level: `faults.nonfinite_loss_at_steps` makes the real learner's loss
NaN at chosen steps; the run skips them with the weights unchanged, counts them, and gives up after
`supervision.max_nonfinite_steps` in a row."""

from __future__ import annotations

import pytest

from orchard.config import FAULT_INJECTION_ENV
from orchard.services.driver import Driver, DriverError
from orchard.services.run_dir import RunDirectory
from tests.integration.test_driver import conservation, small_config


@pytest.fixture
def fault_injection(monkeypatch):
    monkeypatch.setenv(FAULT_INJECTION_ENV, "1")


def test_non_finite_steps_are_skipped_and_counted(ray_local, tmp_path, warm_cache, fault_injection):
    config = small_config(
        tmp_path,
        warm_cache,
        "max_steps=6",
        "buffer.backend=memory",
        "faults.nonfinite_loss_at_steps=[2, 4, 5]",
        "supervision.max_nonfinite_steps=3",
    )
    run_dir = RunDirectory(tmp_path, "nan-skipped")
    driver = Driver(config, run_dir, show_progress=False)
    summary = driver.run()
    assert summary["state"] == "finished" and summary["steps"] == 6
    assert summary["nonfinite_steps"] == 3
    metrics = run_dir.read_metrics()
    assert [m["step"] for m in metrics if m["skipped"]] == [2, 4, 5]
    # a skipped step leaves the weights, so the policy version does not move
    versions = [m["policy_version"] for m in metrics]
    assert versions == [1, 1, 2, 2, 2, 3]
    events = (run_dir.path / "events.log").read_text()
    assert "learner step 2 skipped: non-finite loss (nan)" in events
    assert 'orchard_skipped_steps_total{reason="non_finite"} 3.0' in driver.metrics.render().decode()
    conservation(summary)


def test_the_run_fails_naming_the_rule_after_too_many_in_a_row(ray_local, tmp_path, warm_cache, fault_injection):
    config = small_config(
        tmp_path,
        warm_cache,
        "max_steps=8",
        "buffer.backend=memory",
        "faults.nonfinite_loss_at_steps=[2, 3, 4]",
        "supervision.max_nonfinite_steps=3",
    )
    run_dir = RunDirectory(tmp_path, "nan-fails")
    driver = Driver(config, run_dir, show_progress=False)
    with pytest.raises(DriverError, match=r"3 learner steps in a row .*supervision\.max_nonfinite_steps=3"):
        driver.run()
    assert driver.control.state == "failed" and "max_nonfinite_steps" in driver.control.reason
    assert [m["step"] for m in run_dir.read_metrics()] == [1, 2, 3, 4]
