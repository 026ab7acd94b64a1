#!/usr/bin/env python3
"""Write the instruction-tuning fixture of wordloom's LoRA SFT test: short questions whose
answers all follow one fixed format the base chat model never uses on its own,

    ANSWER: <answer>
    CONFIDENCE: high

so a test can tell whether tuning taught the format. Questions come from templates
(arithmetic, capitals, opposites, plurals, next numbers) with seeded choices; held-out
questions are different from every training question.

Run by hand (standard library only):  python3 scripts/make_sft_data.py
Output: tests/fixtures/sft-format/train.jsonl and eval.jsonl, one {"messages": [...]} per line.
"""

import json
import random
from pathlib import Path

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Peru", "Lima"),
    ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Poland", "Warsaw"),
    ("Ireland", "Dublin"), ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Cuba", "Havana"),
    ("Chile", "Santiago"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Russia", "Moscow"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("old", "new"), ("early", "late"), ("up", "down"), ("open", "closed"), ("full", "empty"),
    ("rich", "poor"), ("loud", "quiet"), ("hard", "soft"), ("wet", "dry"), ("high", "low"),
]
PLURALS = [
    ("mouse", "mice"), ("child", "children"), ("foot", "feet"), ("tooth", "teeth"),
    ("woman", "women"), ("goose", "geese"), ("box", "boxes"), ("city", "cities"),
    ("knife", "knives"), ("leaf", "leaves"), ("person", "people"), ("bus", "buses"),
]


def questions(rng):
    out = []
    for country, capital in CAPITALS:
        out.append((f"What is the capital of {country}?", capital))
    for word, opposite in OPPOSITES:
        out.append((f"What is the opposite of \"{word}\"?", opposite))
    for word, plural in PLURALS:
        out.append((f"What is the plural of \"{word}\"?", plural))
    for _ in range(40):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        out.append((f"What is {a} plus {b}?", str(a + b)))
    for _ in range(20):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        out.append((f"How much is {a} times {b}?", str(a * b)))
    for _ in range(15):
        n = rng.randint(5, 500)
        out.append((f"Which number comes after {n}?", str(n + 1)))
    unique = {}
    for q, a in out:
        unique.setdefault(q, a)
    return list(unique.items())


def record(question, answer):
    return {"messages": [
        {"role": "user", "content": question},
        {"role": "assistant", "content": f"ANSWER: {answer}\nCONFIDENCE: high"},
    ]}


def main():
    rng = random.Random(7)
    items = questions(rng)
    rng.shuffle(items)
    held = items[:24]
    train = items[24:]
    out = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "sft-format"
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held)):
        with open(out / name, "w", encoding="utf-8") as f:
            for q, a in rows:
                f.write(json.dumps(record(q, a)) + "\n")
    print(f"{len(train)} training and {len(held)} held-out examples in {out}")


if __name__ == "__main__":
    main()
