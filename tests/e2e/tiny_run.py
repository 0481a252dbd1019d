"""Overrides that shrink the demo to a run of seconds, shared by the end-to-end tests."""

from orchard.services.compare import PLAIN_GRPO

TINY = [
    *PLAIN_GRPO,  # the demo's samplers off, unless a test turns them on
    "max_steps=2",
    "warmstart.steps=10",
    "warmstart.batch_size=8",
    "rollout.group_size=4",
    "rollout.prompts_per_call=4",
    "rollout.max_new_tokens=6",
    "learner.groups_per_step=4",
    "learner.dynamic_sampling=false",
    "eval.num_prompts=8",
    "data.held_out_size=8",
    "model.tiny.hidden_size=32",
    "model.tiny.intermediate_size=64",
    "model.tiny.num_layers=2",
    "buffer.backend=memory",
    "control.port=0",
]

#: The demo's own samplers (UCB scheduler, DeepSearch) at the same size.
TINY_DEMO = [setting for setting in TINY if setting not in PLAIN_GRPO]
