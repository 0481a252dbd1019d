"""Rollout strategies beyond plain sampling: DeepSearch's tree search (`mcts`)."""
