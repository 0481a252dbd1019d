"""Where prompts come from: procedural generators, dataset files (JSONL, Parquet, Hugging Face datasets;
`verifiers.datasets`) and reasoning-gym, pooled with a held-out split.

`PromptPool.from_config(data)` builds every source of the config, reserves `held_out_size`
prompts for evaluation (shared among sources by weight, among a source's distributions evenly) and
then draws training prompts that are never held-out ones.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from orchard.config import DataConfig, JsonlSource, ProceduralSource, ReasoningGymSource
from orchard.records import Prompt
from orchard.verifiers.datasets import SourceError, load_table_prompts
from orchard.verifiers.procedural import check_family, distribution_name, generate_prompt

__all__ = ["PromptPool", "SourceError", "load_jsonl_prompts"]

#: Fresh procedural draws tried before a distribution is declared exhausted by the held-out set.
MAX_REDRAWS = 1_000


def load_jsonl_prompts(
    path: str | Path,
    *,
    verifier: str,
    on_bad_line: str = "skip",
    max_prompt_chars: int = 32_000,
    max_answer_chars: int = 4_000,
) -> tuple[list[Prompt], list[str]]:
    """Prompts of a JSONL file in Orchard's layout (fields prompt, answer, optional distribution, id,
    solution, hints) and the problems found as `file:line: reason` (`verifiers.datasets`)."""
    source = JsonlSource(
        path=str(path),
        verifier=verifier,
        on_bad_line=on_bad_line,
        max_prompt_chars=max_prompt_chars,
        max_answer_chars=max_answer_chars,
    )
    return load_table_prompts(source)


class _Procedural:
    def __init__(self, config: ProceduralSource) -> None:
        for family in config.families:
            for difficulty in config.difficulties:
                check_family(family, difficulty)
        self.weight = config.weight
        self.cells = [(f, d) for f in config.families for d in config.difficulties]
        self.cell_of = {distribution_name(f, d): (f, d) for f, d in self.cells}
        self.held_out_texts: set[str] = set()

    @property
    def distributions(self) -> list[str]:
        return [distribution_name(f, d) for f, d in self.cells]

    def reserve(self, count: int, rng: random.Random) -> list[Prompt]:
        held_out: list[Prompt] = []
        for index in range(count):
            family, difficulty = self.cells[index % len(self.cells)]
            for _ in range(MAX_REDRAWS):
                prompt = generate_prompt(family, difficulty, rng)
                if prompt.text not in self.held_out_texts:
                    break
            else:
                raise SourceError(
                    f"{distribution_name(family, difficulty)}: too few distinct prompts to hold out {count}"
                )
            self.held_out_texts.add(prompt.text)
            held_out.append(prompt)
        return held_out

    def sample(self, rng: random.Random, distribution: str | None = None) -> Prompt:
        family, difficulty = rng.choice(self.cells) if distribution is None else self.cell_of[distribution]
        for _ in range(MAX_REDRAWS):
            prompt = generate_prompt(family, difficulty, rng)
            if prompt.text not in self.held_out_texts:
                return prompt
        raise SourceError(f"{distribution_name(family, difficulty)}: every prompt drawn is held out")


class _Listed:
    def __init__(self, prompts: Sequence[Prompt], weight: float, name: str) -> None:
        self.weight = weight
        self.name = name
        self.train = list(prompts)
        self._by_distribution: dict[str, list[Prompt]] | None = None  # built at the first draw by distribution

    @property
    def distributions(self) -> list[str]:
        return sorted({p.distribution for p in self.train})

    def reserve(self, count: int, rng: random.Random) -> list[Prompt]:
        if count >= len(self.train):
            raise SourceError(f"{self.name}: {len(self.train)} prompts cannot spare {count} for held-out evaluation")
        chosen = set(rng.sample(range(len(self.train)), count))
        held_out = [p for i, p in enumerate(self.train) if i in chosen]
        self.train = [p for i, p in enumerate(self.train) if i not in chosen]
        return held_out

    def sample(self, rng: random.Random, distribution: str | None = None) -> Prompt:
        if distribution is None:
            return rng.choice(self.train)
        if self._by_distribution is None:
            self._by_distribution = {}
            for prompt in self.train:
                self._by_distribution.setdefault(prompt.distribution, []).append(prompt)
        return rng.choice(self._by_distribution[distribution])


@dataclass
class PromptPool:
    """Training prompts by weighted source, and the held-out prompts they never include."""

    sources: list[_Procedural | _Listed]
    held_out: list[Prompt]
    problems: list[str] = field(default_factory=list)

    @classmethod
    def from_config(cls, data: DataConfig) -> PromptPool:
        sources: list[_Procedural | _Listed] = []
        problems: list[str] = []
        for source in data.sources:
            if isinstance(source, ProceduralSource):
                sources.append(_Procedural(source))
            elif isinstance(source, ReasoningGymSource):
                from orchard.verifiers.reasoning_gym import load_reasoning_gym_prompts

                names = ", ".join(dataset.name for dataset in source.datasets)
                sources.append(_Listed(load_reasoning_gym_prompts(source), source.weight, f"reasoning-gym ({names})"))
            else:
                prompts, found = load_table_prompts(source)
                problems.extend(found)
                sources.append(_Listed(prompts, source.weight, source.path))
        if not sources:
            raise SourceError("data.sources is empty: give at least one prompt source")
        rng = random.Random(data.seed)
        total = sum(s.weight for s in sources)
        shares = [round(data.held_out_size * s.weight / total) for s in sources]
        shares[-1] = data.held_out_size - sum(shares[:-1])
        held_out = [
            p for source, share in zip(sources, shares, strict=True) for p in source.reserve(max(share, 0), rng)
        ]
        return cls(sources, held_out, problems)

    @classmethod
    def from_prompts(cls, train: Sequence[Prompt], held_out: Sequence[Prompt] = ()) -> PromptPool:
        """A pool over fixed lists (held-out texts are removed from the training list)."""
        held_texts = {p.text for p in held_out}
        return cls([_Listed([p for p in train if p.text not in held_texts], 1.0, "prompts")], list(held_out))

    @property
    def distributions(self) -> list[str]:
        return sorted({d for source in self.sources for d in source.distributions})

    def distribution_probabilities(self) -> dict[str, float]:
        """The probability that `sample_train` draws a prompt of each distribution.

        A source is drawn by weight; a procedural source then draws one of its cells uniformly, a
        listed source one of its prompts uniformly (so its distributions by prompt count).
        """
        total = sum(s.weight for s in self.sources)
        probabilities: dict[str, float] = {}
        for source in self.sources:
            share = source.weight / total
            if isinstance(source, _Procedural):
                counts = Counter(source.distributions)
            else:
                counts = Counter(p.distribution for p in source.train)
            size = sum(counts.values())
            for distribution, count in counts.items():
                probabilities[distribution] = probabilities.get(distribution, 0.0) + share * count / size
        return dict(sorted(probabilities.items()))

    def sample_train(self, count: int, rng: random.Random) -> list[Prompt]:
        """`count` training prompts: a source by weight, then a prompt of it."""
        weights = [s.weight for s in self.sources]
        return [rng.choices(self.sources, weights)[0].sample(rng) for _ in range(count)]

    def sample_from(self, distribution: str, rng: random.Random) -> Prompt:
        """A training prompt of `distribution`: a source holding it by weight, then a prompt of it."""
        sources = [s for s in self.sources if distribution in s.distributions]
        if not sources:
            raise KeyError(f"no prompt source has distribution {distribution!r}; known: {self.distributions}")
        return rng.choices(sources, [s.weight for s in sources])[0].sample(rng, distribution)

    def finite_train_prompts(self) -> list[Prompt] | None:
        """Every training prompt, source by source, when each source is a list (dataset files,
        reasoning-gym); None when a procedural source draws new prompts without end."""
        listed = [source for source in self.sources if isinstance(source, _Listed)]
        if len(listed) < len(self.sources):
            return None
        return [prompt for source in listed for prompt in source.train]

    def train_examples(self, count: int, rng: random.Random) -> list[Prompt]:
        """Training prompts with their reference answers, for the supervised warm start."""
        return self.sample_train(count, rng)

    @staticmethod
    def verifier_for(prompt: Prompt) -> str:
        return str(prompt.metadata.get("verifier", "procedural"))
