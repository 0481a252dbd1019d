"""Orchard: RL post-training of language models on verifiable rewards.

One installed namespace: the core (`orchard.config`, `orchard.records`, `orchard.protocols`) and the
layers above it, `orchard.verifiers`, `orchard.rollout`, `orchard.learner` and `orchard.services`.
A wheel installs the layers inside this package (pyproject's `package-dir`); in a source checkout they
are the repository's top-level folders, found through this package's `__path__` below.
"""

from pathlib import Path

_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "services" / "driver.py").is_file():
    # a source checkout (or an editable install of one): orchard.services is ../services, and so on
    __path__.append(str(_checkout))
