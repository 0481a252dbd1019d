"""Curricula: which prompts are rolled out next, and which groups reach the learner.

- `ucb`: DUMP's UCB scheduler over distributions (learnability = mean |advantage|).
- `value_model`: PCL's online value model of a prompt's pass rate, and selection near a target.
- `gain`: GAIN-RL's Gaussian over prompts ranked by angle concentration, its mean moved by accuracy;
  `gain_ranking`: the ranking pass of the starting policy over the pool.
- `filtering`: balanced online difficulty filtering by pass rate.
- `sampler`: composes them into the driver's `PromptSampler`, with state that survives a restart.

The algorithms are plain functions and small classes over numbers and records; the driver feeds them.
"""
