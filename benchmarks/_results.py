"""Write one titled section of benchmarks/RESULTS.md, replacing that section if it is already there."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nEvery number here was measured by the command shown with it.\n\n"


def write_section(title: str, section: str) -> None:
    """``section`` must start with ``title`` (a ``## `` heading); other sections are kept as they are.

    Several benchmarks run at once and each rewrites the whole file, so the read-modify-write holds an exclusive
    lock (a sibling lock file) and the new text replaces the old by rename: no section is lost to a race and a
    crash never leaves a half-written RESULTS.md.
    """
    with open(RESULTS.with_suffix(".md.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = RESULTS.read_text() if RESULTS.exists() else HEADER
        section = section.rstrip("\n") + "\n\n"
        start = text.find(title)
        if start >= 0:
            end = text.find("\n## ", start + 1)
            text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
        else:
            text = text.rstrip("\n") + "\n\n" + section
        partial = RESULTS.with_suffix(".md.partial")
        partial.write_text(text)
        os.replace(partial, RESULTS)
