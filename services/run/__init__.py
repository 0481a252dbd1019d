"""A run's orchestration: the admission gate, the loop and the parties it talks to."""
