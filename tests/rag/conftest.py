"""Shared fixtures of the knowledge-base tests: the embedding model (loaded once) and a small indexed corpus."""

import json
from pathlib import Path

import pytest

GEOMETRY = '''import math


def circle_area(radius):
    return math.pi * radius ** 2


def point_distance(p, q):
    return math.hypot(q[0] - p[0], q[1] - p[1])


def rotate_point(point, angle):
    c, s = math.cos(angle), math.sin(angle)
    return (point[0] * c - point[1] * s, point[0] * s + point[1] * c)


def triangle_perimeter(a, b, c):
    return a + b + c


def degrees_to_radians(degrees):
    return degrees * math.pi / 180
'''

TEXT = '''def count_vowels(word):
    return sum(ch in "aeiou" for ch in word.lower())


def reverse_words(sentence):
    return " ".join(reversed(sentence.split()))


def is_palindrome(word):
    cleaned = "".join(ch for ch in word.lower() if ch.isalnum())
    return cleaned == cleaned[::-1]


def slugify(title):
    return "-".join(title.lower().split())


def caesar_cipher(message, shift):
    return "".join(chr((ord(ch) - 97 + shift) % 26 + 97) if ch.islower() else ch for ch in message)
'''

GUIDE = '''# Installing

Run the installer and accept the licence. The program needs 2 GB of disk space.

# Backups

Backups are written every night at 2 am to the archive server and kept for thirty days.
'''

NOTES = "Meeting notes: the quarterly budget review moved to Thursday afternoon.\n"

# Paraphrased questions about the ten functions (none repeats a function name verbatim).
QUESTIONS = [
    ("area of a round shape from its radius", "geometry.py", "circle_area"),
    ("euclidean length between two points in the plane", "geometry.py", "point_distance"),
    ("turn a 2d point around the origin by an angle", "geometry.py", "rotate_point"),
    ("sum of the three side lengths of a triangle", "geometry.py", "triangle_perimeter"),
    ("convert an angle in degrees to radians", "geometry.py", "degrees_to_radians"),
    ("how many vowels are in a word", "text.py", "count_vowels"),
    ("put the words of a sentence in the opposite order", "text.py", "reverse_words"),
    ("check whether a word reads the same backwards", "text.py", "is_palindrome"),
    ("make a url slug from a title", "text.py", "slugify"),
    ("shift letters of a message to encrypt it", "text.py", "caesar_cipher"),
]


def write_corpus(folder: Path) -> Path:
    """The ten-function mini corpus (two .py files), a Markdown guide and a text note, under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "geometry.py").write_text(GEOMETRY)
    (folder / "text.py").write_text(TEXT)
    (folder / "guide.md").write_text(GUIDE)
    (folder / "notes.txt").write_text(NOTES)
    return folder


def write_questions(path: Path, corpus: Path) -> Path:
    rows = [{"query": q, "relevant": [{"source": str(corpus / source), "title": title}]}
            for q, source, title in QUESTIONS]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def embedder():
    from deepseek.rag.embed import Embedder

    return Embedder.load()


@pytest.fixture(scope="session")
def mini_index(tmp_path_factory, embedder):
    """``(index directory, corpus folder)``: the mini corpus indexed once for the session; read-only."""
    from deepseek.rag.index import build_index

    root = tmp_path_factory.mktemp("rag-mini")
    corpus = write_corpus(root / "corpus")
    build_index([str(corpus)], str(root / "index"), embedder=embedder, progress=False)
    return root / "index", corpus


@pytest.fixture(scope="session")
def opened_index(mini_index, embedder):
    from deepseek.rag.index import KnowledgeIndex

    return KnowledgeIndex.open(mini_index[0], embedder=embedder)
