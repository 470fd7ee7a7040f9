"""Tiny stand-ins for the real data, in exactly the format `codistill data fetch` writes.

Unit and multi-process tests use these instead of the 22 MB download: `make_tiny_data(dir)` writes
a few KB of review text and a few hundred Adult-like rows through the same writer as fetch(), and
a task is pointed at it with `args: {data_dir: ...}` (or CODISTILL_DATA).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from codistill_trainer import datasets

WORDS = (
    "love this dress fits true to size the fabric is soft and the color is lovely i ordered "
    "a small but it runs large so i returned it great for summer comfortable cute top"
).split()
CATEGORIES = {
    "workclass": ["Private", "Self-emp-inc", "State-gov", "?"],
    "education": ["HS-grad", "Bachelors", "Masters", "11th"],
    "marital-status": ["Married-civ-spouse", "Never-married", "Divorced"],
    "occupation": ["Exec-managerial", "Sales", "Craft-repair", "Other-service"],
    "relationship": ["Husband", "Wife", "Own-child", "Not-in-family"],
    "race": ["White", "Black", "Asian-Pac-Islander"],
    "gender": ["Male", "Female"],
    "native-country": ["United-States", "Mexico", "India"],
}
ADULT_COLUMNS = (
    "age", "workclass", "fnlwgt", "education", "educational-num", "marital-status", "occupation",
    "relationship", "race", "gender", "capital-gain", "capital-loss", "hours-per-week",
    "native-country", "income",
)  # fmt: skip
TINY_REVIEWS, TINY_ROWS = 120, 400


def tiny_reviews(rng: random.Random) -> list[str]:
    """Short sentences over a small vocabulary: learnable in a few steps, about 8 KB in all."""
    lengths = [rng.randint(8, 18) for _ in range(TINY_REVIEWS)]
    return [" ".join(rng.choice(WORDS) for _ in range(n)) for n in lengths]


def tiny_adult_row(rng: random.Random) -> dict[str, Any]:
    """An Adult-like row whose label follows a simple rule, so that a model can learn it."""
    row: dict[str, Any] = {c: rng.choice(v) for c, v in CATEGORIES.items()}
    years = rng.randint(5, 16)
    gain = rng.choice([0, 0, 0, rng.randint(1000, 20000)])
    row.update(
        {
            "age": rng.randint(18, 80),
            "fnlwgt": rng.randint(20000, 500000),
            "educational-num": years,
            "capital-gain": gain,
            "capital-loss": rng.choice([0, 0, 0, rng.randint(100, 2000)]),
            "hours-per-week": rng.randint(10, 70),
        }
    )
    rich = row["relationship"] in ("Husband", "Wife") and years >= 11 or gain > 0
    row["income"] = ">50K" if rich else "<=50K"
    return {c: row[c] for c in ADULT_COLUMNS}


def make_tiny_data(dest: Path) -> Path:
    """Write a tiny data folder at `dest` (the same files fetch() writes) and return it."""
    rng = random.Random(0)
    reviews = tiny_reviews(rng)
    adult = [tiny_adult_row(rng) for _ in range(TINY_ROWS)]
    source = {"package": "tests/datafixtures.py", "version": "tiny", "sha256": None}
    datasets.write(Path(dest), reviews, adult, source)
    return Path(dest)
