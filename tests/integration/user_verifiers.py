"""User verifiers loaded by dotted path in the integration tests."""


def explode(prompt, completion):
    raise RuntimeError("this verifier always fails")


def digit_share(prompt, completion):
    """Share of digits in the completion: graded, so an untrained model's groups carry signal."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def first_character(prompt, completion):
    """Correct when the completion starts with the answer: rare for an untrained model, findable by search."""
    return completion.strip()[:1] == prompt.answer
