"""Weight transport from the learner to the rollout workers: the shared-memory store (`store.py`) and
the versioned sync over any transport (`sync.py`)."""
