"""Prompt sets made offline from templates the project ships: instructions, arithmetic word
problems and code requests. They feed decoding workloads (speculative decoding is scored by
equality with the target's own greedy output) and the draft's distillation corpus.

`everyday` is apart: twenty requests written by hand in styles neither the templates nor the
draft's recipe use (advice, recipes, translation, trivia, planning, other languages' code), to
measure how a draft does on prompts it was not built for. No recipe trains on them.
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

EVERYDAY = (
    "What should I pack for a weekend camping trip in the mountains?",
    "Translate 'Where is the train station, please?' into French and Spanish.",
    "Give me a simple recipe for banana pancakes.",
    "How can I fall asleep faster at night?",
    "Write a haiku about a cat watching the rain.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Plan a three-day itinerary for a first visit to Rome.",
    "How do I politely decline a meeting invitation? Give me a short message.",
    "List the planets of the solar system in order from the sun.",
    "Write a SQL query that returns the ten most recent orders from a table called orders.",
    "What are the pros and cons of working from home?",
    "Convert 72 degrees Fahrenheit to Celsius and show the formula.",
    "Suggest five names for a small bakery.",
    "How do I make a div fill the whole screen in CSS?",
    "Explain the difference between weather and climate to a ten-year-old.",
    "Write a short birthday message for my grandmother.",
    "What are three good exercises for lower back pain?",
    "Write a JavaScript function that shuffles an array.",
    "Why is the sky blue?",
    "Give me a packing checklist for moving to a new apartment.",
)

PROMPT_SETS = ("instructions", "arithmetic", "code")  # the shipped templates
DECODING_TASKS = (*PROMPT_SETS, "mixed", "everyday")  # mixed: the template sets in turn


def make_prompts(kind: str, count: int, seed: int = 0) -> list[str]:
    """`count` distinct-as-possible prompts of one kind, the same for the same seed."""
    if kind == "mixed":
        per_set = {name: iter(make_prompts(name, -(-count // len(PROMPT_SETS)), seed)) for name in PROMPT_SETS}
        return [next(per_set[PROMPT_SETS[i % len(PROMPT_SETS)]]) for i in range(count)]
    rng = random.Random(f"{kind}/{seed}")
    if kind == "everyday":  # a seeded order of the fixed list, repeated past its length
        order = rng.sample(EVERYDAY, len(EVERYDAY))
        return [order[i % len(order)] for i in range(count)]
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
