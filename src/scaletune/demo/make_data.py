"""Generates `instructions.jsonl`, the demo's bundled Alpaca-format data (run once; output is committed).

Six small skills with exact answers, so a few minutes of LoRA on a tiny model shows a clear drop in
held-out loss: arithmetic, spelling backwards, opposites, plurals, repetition, parity.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("open", "closed"),
             ("light", "dark"), ("happy", "sad"), ("early", "late"), ("full", "empty"), ("old", "new"),
             ("hard", "soft"), ("high", "low"), ("wet", "dry"), ("rich", "poor"), ("loud", "quiet"),
             ("long", "short"), ("near", "far"), ("strong", "weak"), ("thick", "thin"), ("first", "last")]
PLURALS = [("cat", "cats"), ("box", "boxes"), ("child", "children"), ("mouse", "mice"), ("city", "cities"),
           ("leaf", "leaves"), ("tooth", "teeth"), ("bus", "buses"), ("dog", "dogs"), ("baby", "babies"),
           ("foot", "feet"), ("knife", "knives"), ("glass", "glasses"), ("man", "men"), ("tree", "trees"),
           ("wolf", "wolves"), ("goose", "geese"), ("story", "stories"), ("dish", "dishes"), ("book", "books")]
WORDS = ["apple", "river", "stone", "cloud", "table", "green", "music", "light", "paper", "train", "water",
         "tiger", "chair", "bread", "house", "plant", "smile", "storm", "night", "sugar"]


def make_records(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out: list[dict] = []
    for a in range(0, 15):
        for b in range(0, 10):
            out.append({"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)})
    for w in WORDS:
        out.append({"instruction": "Spell the word backwards.", "input": w, "output": w[::-1]})
        out.append({"instruction": f"Repeat the word {w} three times.", "input": "", "output": " ".join([w] * 3)})
    for x, y in OPPOSITES:
        out.append({"instruction": f"What is the opposite of {x}?", "input": "", "output": y})
        out.append({"instruction": f"What is the opposite of {y}?", "input": "", "output": x})
    for s, p in PLURALS:
        out.append({"instruction": "Give the plural of this noun.", "input": s, "output": p})
    for n in range(0, 100):
        out.append({"instruction": f"Is {n} even or odd?", "input": "", "output": "even" if n % 2 == 0 else "odd"})
    rng.shuffle(out)
    return out


if __name__ == "__main__":
    target = Path(__file__).with_name("instructions.jsonl")
    with open(target, "w", encoding="utf-8") as fh:
        for rec in make_records():
            fh.write(json.dumps(rec) + "\n")
    print(f"wrote {target}")
