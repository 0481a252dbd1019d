"""Rollout strategies beyond plain sampling: DeepSearch's tree search (`mcts` holds its rules,
`tree_search` the search loop)."""
