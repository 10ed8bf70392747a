"""Print a request's events from every process of a traced run (see sitecustomize.py here),
in time order, as milliseconds from its start at the head, up to its first token:

    python3 benchmarks/trace/timeline.py [/tmp/trace] [K ...]    # K: the K-th request (0-based)
"""

from __future__ import annotations

import sys
from pathlib import Path


def load(folder: Path) -> list[tuple[float, str, str, str]]:
    """(time, process name, event, detail) of every file in the folder, sorted by time."""
    events = []
    for path in folder.glob("*.txt"):
        name = path.stem
        for line in path.read_text().splitlines():
            if line.startswith("#"):
                if "--name" in line:  # a node: name it as the bench does (b0, b1, ...)
                    name = line.split("--name")[1].split()[0]
                continue
            t, event, *rest = line.split(" ", 2)
            events.append((float(t), name, event, rest[0] if rest else ""))
    return sorted(events)


def main(argv: list[str]) -> None:
    folder = Path(argv[0]) if argv else Path("/tmp/trace")
    events = load(folder)
    starts = [i for i, e in enumerate(events) if e[2] == "generate+"]
    for k in [int(a) for a in argv[1:]] or range(len(starts)):
        if k >= len(starts):
            continue
        t0 = events[starts[k]][0]
        print(f"--- request {k}: {events[starts[k]][3]}")
        for t, name, event, detail in events[
            starts[k] : starts[k + 1] if k + 1 < len(starts) else None
        ]:
            print(f"{1000 * (t - t0):9.2f} {name:4} {event:18} {detail[:90]}")
            if event == "first_token":
                break


if __name__ == "__main__":
    main(sys.argv[1:])
