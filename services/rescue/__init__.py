"""Rescue of prompts whose every sample failed: the queue and its interface (`queue.py`), hints in
context (`hints.py`), and DeepSearch's tree search (`deepsearch.py`) with its solution cache
(`solution_cache.py`)."""
