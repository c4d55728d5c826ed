"""A broad offline corpus for the draft and its acceptance head, from text that ships with Python.

No download: the sources are the reference documentation's prose (`pydoc_data.topics`), the
standard library's module docstrings and its source code, read from the interpreter's own
`stdlib` folder in sorted order, so a seed gives the same corpus on every machine with the same
Python minor version. Two kinds of training text come out of it:
- `passages`: stretches of that prose and code as they are, which the target scores token by
  token (the draft learns the target's next-token distribution on ordinary text);
- `chat_prompts`: chat requests of many styles built around those passages (summarise, explain
  code, continue, rewrite, questions about a term ...), plus the project's shipped prompt
  templates, which the target then answers in its own words.
`UNSEEN_CHAT` holds everyday requests written apart from all of this, in styles the recipe never
uses (advice, recipes, translation, trivia, planning ...): they measure how a draft does on
prompts it was not built for, and nothing here trains on them.
"""

from __future__ import annotations

import ast
import functools
import random
import re
import sysconfig
from pathlib import Path

from paretoray.actors.prompts import EVERYDAY, PROMPT_SETS, make_prompts

# Request styles around a passage of prose ({text}) or of code ({code}), or about a term ({term}).
PROSE_STYLES = (
    "Summarize the following passage in two sentences.\n\n{text}",
    "Explain the following paragraph in simpler words.\n\n{text}",
    "Continue this text for a few more sentences:\n\n{text}",
    "What is the main point of this passage?\n\n{text}",
    "Write three questions a student might ask after reading this:\n\n{text}",
    "Rewrite the following text as a short bulleted list.\n\n{text}",
    "Give this paragraph a title and explain your choice.\n\n{text}",
)
CODE_STYLES = (
    "Explain what this Python code does.\n\n```python\n{code}\n```",
    "Is there a bug in this code? Explain.\n\n```python\n{code}\n```",
    "Add comments to this function.\n\n```python\n{code}\n```",
    "Write a unit test for this function.\n\n```python\n{code}\n```",
)
TERM_STYLES = (
    "What does '{term}' mean in Python?",
    "Give an example of using {term} in Python.",
    "When should I use {term}, and when should I avoid it?",
)

# Everyday requests in styles the recipe above never uses: for measuring, never for training.
UNSEEN_CHAT = EVERYDAY


@functools.cache
def _stdlib_files() -> tuple[Path, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "idlelib", "lib2to3", "tkinter", "turtledemo", "site-packages", "ensurepip", "__pycache__")
    return tuple(sorted(p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts)))


@functools.cache
def prose() -> tuple[str, ...]:
    """Paragraphs of English prose: the documentation topics and the stdlib's module docstrings."""
    from pydoc_data.topics import topics

    texts = [topics[key] for key in sorted(topics)]
    for path in _stdlib_files():
        try:
            docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if docstring:
            texts.append(docstring)
    paragraphs = []
    for text in texts:
        for paragraph in re.split(r"\n\s*\n", text):
            flat = " ".join(paragraph.split())
            # prose only: long enough, mostly letters, not a code listing or a table
            if 200 <= len(flat) <= 1200 and sum(c.isalpha() or c == " " for c in flat) > 0.85 * len(flat):
                paragraphs.append(flat)
    return tuple(paragraphs)


@functools.cache
def code() -> tuple[str, ...]:
    """Functions of the standard library, 4-16 lines each, as written."""
    functions = []
    for path in _stdlib_files():
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.end_lineno and 4 <= node.end_lineno - node.lineno + 1 <= 16:
                text = "\n".join(lines[node.lineno - 1 : node.end_lineno])
                indent = len(text) - len(text.lstrip(" "))
                functions.append("\n".join(line[indent:] for line in text.splitlines()))
    return tuple(functions)


@functools.cache
def terms() -> tuple[str, ...]:
    """Names the documentation explains: its topic keys, made readable."""
    from pydoc_data.topics import topics

    return tuple(sorted({key.replace("-", " ") for key in topics}))


def passages(count: int, seed: int = 0) -> list[str]:
    """`count` stretches of prose and code (two of prose for one of code), the same for the same seed."""
    rng = random.Random(f"passages/{seed}")
    return [rng.choice(code()) if i % 3 == 2 else rng.choice(prose()) for i in range(count)]


def _excerpt(text: str, limit: int = 320) -> str:
    """At most `limit` characters of `text`, cut after a sentence where one ends."""
    if len(text) <= limit:
        return text
    cut = text.rfind(". ", 0, limit)
    return text[: cut + 1] if cut > limit // 3 else text[:limit]


def chat_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` chat requests in turn: around prose, around code, about a term, and the shipped
    templates (instructions, arithmetic, code); the same for the same seed."""
    rng = random.Random(f"chat/{seed}")
    shipped = iter(make_prompts("mixed", count, seed))
    prompts = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            prompts.append(rng.choice(PROSE_STYLES).format(text=_excerpt(rng.choice(prose()))))
        elif kind == 1:
            prompts.append(rng.choice(CODE_STYLES).format(code=rng.choice(code())))
        elif kind == 2:
            prompts.append(rng.choice(TERM_STYLES).format(term=rng.choice(terms())))
        else:
            prompts.append(next(shipped))
    return prompts


__all__ = ["PROMPT_SETS", "UNSEEN_CHAT", "chat_prompts", "code", "passages", "prose", "terms"]
