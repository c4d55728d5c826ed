"""Prompt sets made offline from templates the project ships: instructions, arithmetic word
problems and code requests. They feed decoding workloads (speculative decoding is scored by
equality with the target's own greedy output) and the draft's distillation corpus.
"""

from __future__ import annotations

import random

TOPICS = ("the ocean", "autumn", "a lighthouse", "trains", "the moon", "coffee", "mountains", "a library",
          "friendship", "rain", "bicycles", "the desert", "music", "a garden", "winter", "cities")
INSTRUCTIONS = (
    "Write a short poem about {topic}.",
    "Explain in three sentences why {topic} matters to people.",
    "Give me three facts about {topic}.",
    "Describe {topic} to a child.",
    "Write a friendly email inviting a colleague to talk about {topic}.",
    "List five words that remind you of {topic}.",
)
NAMES = ("Tom", "Anna", "Ravi", "Mei", "Lucas", "Sara", "Omar", "Lena")
ITEMS = ("apples", "books", "marbles", "stickers", "cookies", "pencils")
ARITHMETIC = (
    "{name} has {a} {item} and buys {b} more. How many {item} does {name} have now? Answer step by step.",
    "{name} had {a} {item} and gave {b} to a friend. How many {item} are left? Explain your reasoning.",
    "A box holds {a} {item}. How many {item} are in {b} boxes? Show your work.",
    "{name} shares {a} {item} equally among {b} children. How many does each child get, and how many are left over?",
)
CODE = (
    "Write a Python function that {task}.",
    "Write a Python function that {task}, with a docstring and one example.",
)
CODE_TASKS = ("reverses a string", "checks whether a number is prime", "returns the n-th Fibonacci number",
              "counts the vowels in a sentence", "merges two sorted lists", "computes the factorial of n",
              "removes duplicates from a list while keeping order", "converts Celsius to Fahrenheit")

PROMPT_SETS = ("instructions", "arithmetic", "code")
DECODING_TASKS = (*PROMPT_SETS, "mixed")  # mixed: the sets in turn


def make_prompts(kind: str, count: int, seed: int = 0) -> list[str]:
    """`count` distinct-as-possible prompts of one kind, the same for the same seed."""
    if kind == "mixed":
        per_set = {name: iter(make_prompts(name, -(-count // len(PROMPT_SETS)), seed)) for name in PROMPT_SETS}
        return [next(per_set[PROMPT_SETS[i % len(PROMPT_SETS)]]) for i in range(count)]
    rng = random.Random(f"{kind}/{seed}")
    prompts = []
    for _ in range(count):
        if kind == "instructions":
            prompts.append(rng.choice(INSTRUCTIONS).format(topic=rng.choice(TOPICS)))
        elif kind == "arithmetic":
            prompts.append(rng.choice(ARITHMETIC).format(
                name=rng.choice(NAMES), item=rng.choice(ITEMS), a=rng.randint(3, 60), b=rng.randint(2, 9)))
        elif kind == "code":
            prompts.append(rng.choice(CODE).format(task=rng.choice(CODE_TASKS)))
        else:
            raise KeyError(f"unknown prompt set {kind!r}; available: {', '.join(DECODING_TASKS)}")
    return prompts


def as_chat(tokenizer, prompt: str) -> str:
    """The prompt as the model's chat template renders a user turn (raw text without a template)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return prompt + "\n"
