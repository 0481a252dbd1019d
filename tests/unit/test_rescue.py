from orchard.records import Completion, Group, Prompt
from orchard.services.rescue.queue import RescueQueue, is_all_fail


def group(prompt_id: str, correct: list[bool], distribution: str = "addition/d1") -> Group:
    prompt = Prompt(id=prompt_id, text=f"{prompt_id}=", answer="1", distribution=distribution)
    completions = [
        Completion(text="x", token_ids=[1], logprobs=[-1.0], policy_version=0, correct=c, reward=float(c))
        for c in correct
    ]
    return Group(prompt=prompt, prompt_token_ids=[1], completions=completions)


class Takes:
    def __init__(self, name: str, distribution: str | None = None):
        self.name, self.distribution = name, distribution

    def wants(self, group: Group) -> bool:
        return self.distribution is None or group.prompt.distribution == self.distribution

    def submit(self, worker, prompts):
        return (worker, self.name, list(prompts))


def test_only_all_fail_groups_are_queued_once_each():
    queue = RescueQueue([Takes("search")])
    assert is_all_fail(group("a", [False, False])) and not is_all_fail(group("b", [False, True]))
    assert not is_all_fail(group("empty", []))
    assert queue.offer([group("a", [False, False]), group("b", [False, True]), group("a", [False])]) == 1
    assert len(queue) == 1
    rescue, prompts = queue.take(8)
    assert rescue.name == "search" and [p.id for p in prompts] == ["a"]
    assert queue.take(8) is None
    assert queue.offer([group("a", [False])]) == 1  # taken prompts may come back


def test_first_rescue_that_wants_a_prompt_gets_it_and_take_serves_the_longest_queue():
    queue = RescueQueue([Takes("hint", distribution="sorting/d3"), Takes("search")])
    queue.offer([group("s1", [False], "sorting/d3"), group("a1", [False]), group("a2", [False])])
    assert {name: len(prompts) for name, prompts in queue.waiting.items()} == {"hint": 1, "search": 2}
    rescue, prompts = queue.take(1)
    assert rescue.name == "search" and [p.id for p in prompts] == ["a1"]
    rescue, prompts = queue.take(5)
    assert {p.id for p in prompts} in ({"a2"}, {"s1"})


def test_a_full_queue_drops_and_counts_new_prompts():
    queue = RescueQueue([Takes("search")], capacity=2)
    assert queue.offer([group(str(i), [False]) for i in range(5)]) == 2
    assert queue.dropped == 3 and len(queue) == 2


def test_no_rescue_configured_queues_nothing():
    queue = RescueQueue([])
    assert queue.offer([group("a", [False])]) == 0 and queue.take(4) is None
