"""The hint rescue: which all-fail prompts it takes and the call it makes."""

from __future__ import annotations

from orchard.config import RunConfig
from orchard.records import Completion, Group, Prompt
from orchard.services.rescue.hints import HintRescue
from orchard.services.rescue.queue import RescueQueue


def all_fail(prompt_id: str, hints: tuple[str, ...]) -> Group:
    prompt = Prompt(id=prompt_id, text="1+1=", answer="2", distribution="test", hints=hints)
    completion = Completion(text="3", token_ids=[5], logprobs=[-1.0], policy_version=0, correct=False)
    return Group(prompt=prompt, prompt_token_ids=[1, 2], completions=[completion])


class Worker:
    """Stands in for a RolloutWorker actor handle: records the remote call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Prompt]]] = []
        outer = self

        class Method:
            def remote(self, prompts):
                outer.calls.append(("rollout_with_hints", prompts))
                return "ref"

        self.rollout_with_hints = Method()


def test_it_wants_all_fail_prompts_that_have_hints():
    rescue = HintRescue(RunConfig())
    queue = RescueQueue([rescue])
    assert queue.offer([all_fail("with", ("len 1", "starts 2")), all_fail("without", ())]) == 1
    taken = queue.take(4)
    assert taken is not None and taken[0] is rescue and [p.id for p in taken[1]] == ["with"]
    worker = Worker()
    assert rescue.submit(worker, taken[1]) == "ref"
    assert worker.calls == [("rollout_with_hints", taken[1])]


def test_a_prompt_is_hinted_only_after_enough_failures():
    config = RunConfig.model_validate({"learner": {"hints": {"enabled": True, "after_failures": 3}}})
    rescue = HintRescue(config, max_tracked_prompts=2)
    hard = all_fail("hard", ("len 1",))
    assert [rescue.wants(hard) for _ in range(4)] == [False, False, True, False]  # counting starts again
    # at most two prompts are tracked: the oldest is forgotten
    rescue.wants(all_fail("a", ("h",)))
    rescue.wants(all_fail("b", ("h",)))
    assert list(rescue.failures) == ["a", "b"]
    assert rescue.wants(all_fail("a", ("h",))) is False and rescue.failures["a"] == 2
