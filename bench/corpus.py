"""Print the report reader's accuracy on the regression corpus: features right / features read."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_report_corpus import CORPUS, expected, read

from rules import knowledge as knowledge_module


def main() -> None:
    """Count right features over every sentence, and over the features each sentence names."""
    k = knowledge_module.load()
    right, total, named_right, named = 0, 0, 0, 0
    wrong = Counter()
    sentences_right = 0
    for entry in CORPUS:
        want, got = expected(entry), read(k, entry["kind"], entry["text"])
        hits = {name for name in want if want[name] == got[name]}
        right, total = right + len(hits), total + len(want)
        named_right += len(hits & set(entry["expect"]))
        named += len(entry["expect"])
        sentences_right += hits == set(want)
        wrong.update(f"{n}:{want[n]}->{got[n]}" for n in set(want) - hits)
    print(f"features right {right}/{total} = {right / total:.1%}")
    print(f"named features right {named_right}/{named} = {named_right / named:.1%}")
    print(f"sentences wholly right {sentences_right}/{len(CORPUS)}")
    for what, n in wrong.most_common():
        print(f"  {n:3d} {what}")


if __name__ == "__main__":
    main()
