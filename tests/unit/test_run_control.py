"""The run state machine as a pure object: requests, the driver's side, conflicts, weight versions."""

from __future__ import annotations

import threading

import pytest

from orchard.services.control.run_control import (
    TRANSITIONS,
    ControlConflict,
    RunControl,
    RunState,
    WeightVersionConflict,
)


def test_pause_settles_only_when_the_driver_says_nothing_is_in_flight():
    control = RunControl()
    assert control.start() is RunState.RUNNING
    assert control.may_start_work()
    assert control.request_pause() is RunState.PAUSING
    assert not control.may_start_work()
    assert control.state is RunState.PAUSING
    assert control.settle_pause()
    assert control.state is RunState.PAUSED
    assert control.request_resume() is RunState.RUNNING
    assert control.may_start_work()


def test_resume_while_still_pausing_goes_straight_back_to_running():
    control = RunControl()
    control.start()
    control.request_pause()
    control.request_resume()
    assert not control.settle_pause()
    assert control.state is RunState.RUNNING


def test_a_pause_requested_before_the_start_holds_the_run():
    control = RunControl()
    control.request_pause()
    assert control.start() is RunState.PAUSING
    assert control.settle_pause()


@pytest.mark.parametrize(
    ("setup", "request_name"),
    [
        ([], "request_resume"),  # pending
        (["start"], "request_resume"),  # running
        (["start", "request_pause"], "request_pause"),  # pausing
        (["start", "request_pause", "settle_pause"], "request_pause"),  # paused
        (["start", "request_stop"], "request_stop"),  # stopping
        (["start", "request_stop"], "request_checkpoint"),
        (["start", "request_stop"], "request_pause"),
    ],
)
def test_conflicting_requests_name_the_state(setup, request_name):
    control = RunControl()
    for call in setup:
        getattr(control, call)()
    before = control.state
    with pytest.raises(ControlConflict, match=str(before)):
        getattr(control, request_name)()
    assert control.state is before


@pytest.mark.parametrize("terminal", [RunState.STOPPED, RunState.FINISHED, RunState.FAILED])
def test_nothing_but_status_is_possible_after_the_end(terminal):
    control = RunControl()
    control.start()
    if terminal is RunState.STOPPED:
        control.request_stop()
    control.finish(terminal, "because")
    for request in ("request_pause", "request_resume", "request_stop", "request_checkpoint"):
        with pytest.raises(ControlConflict):
            getattr(control, request)()
    with pytest.raises(ControlConflict):
        control.announce_weights(1, "somewhere")
    assert control.state is terminal
    assert control.finish(RunState.FAILED, "late") is terminal  # the first end wins


def test_stop_from_paused_wakes_the_waiting_driver():
    control = RunControl()
    control.start()
    control.request_pause()
    control.settle_pause()
    woke: list[RunState] = []
    waiter = threading.Thread(target=lambda: woke.append(control.wait_while_paused(10.0)))
    waiter.start()
    control.request_stop("operator")
    waiter.join(5.0)
    assert woke == [RunState.STOPPING]
    assert control.reason == "operator"
    assert control.finish(RunState.STOPPED) is RunState.STOPPED


def test_checkpoint_request_is_taken_once():
    control = RunControl()
    control.start()
    assert not control.take_checkpoint_request()
    control.request_checkpoint()
    assert control.take_checkpoint_request()
    assert not control.take_checkpoint_request()


def test_weight_versions_only_move_forward():
    control = RunControl()
    control.announce_weights(0, "ray-object:aa")
    announcement = control.announce_weights(3, "ray-object:bb")
    assert (announcement.version, announcement.location) == (3, "ray-object:bb")
    for stale in (3, 2):
        with pytest.raises(WeightVersionConflict, match="not newer than the announced version 3"):
            control.announce_weights(stale, "x")
    assert control.weights.version == 3


def test_every_state_change_is_reported_and_follows_the_table():
    seen: list[RunState] = []
    control = RunControl(on_state=seen.append)
    control.start()
    control.request_pause()
    control.settle_pause()
    control.request_resume()
    control.request_stop()
    control.finish(RunState.STOPPED)
    assert seen == [
        RunState.RUNNING,
        RunState.PAUSING,
        RunState.PAUSED,
        RunState.RUNNING,
        RunState.STOPPING,
        RunState.STOPPED,
    ]
    path = [RunState.PENDING, *seen]
    assert all(after in TRANSITIONS[before] for before, after in zip(path, path[1:], strict=False))


def test_finish_needs_a_terminal_state():
    with pytest.raises(ValueError, match="terminal"):
        RunControl().finish(RunState.RUNNING)
