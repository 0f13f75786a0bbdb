"""Before/after: syncworker's numbers in two result files, side by side.

    python -m bench.compare bench/results/before.json bench/results/latest.json

Rows are matched by scenario and metric; a row only one file has is shown
with a dash on the other side.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.run import fmt


def compare(before: dict[str, Any], after: dict[str, Any]) -> str:
    old = {(r["scenario"], r["metric"]): r for r in before["rows"]}
    head = ["scenario", "metric", "unit", "before", "after", "after/before"]
    body = []
    for row in after["rows"]:
        was = old.get((row["scenario"], row["metric"]), {}).get("syncworker")
        now = row["syncworker"]
        change = (
            now / was
            if isinstance(now, int | float) and isinstance(was, int | float) and was
            else None
        )
        body.append([row["scenario"], row["metric"], row["unit"], fmt(was), fmt(now), fmt(change)])
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=False)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join(
        [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)]
    )


def main() -> None:
    before, after = (json.loads(Path(p).read_text()) for p in sys.argv[1:3])
    print(compare(before, after))


if __name__ == "__main__":
    main()
