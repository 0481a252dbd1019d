"""User verifiers loaded by dotted path in the integration tests."""


def explode(prompt, completion):
    raise RuntimeError("this verifier always fails")
