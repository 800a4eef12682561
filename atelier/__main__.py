"""``python -m atelier <command>``: command-line tools that sit beside the nodes (today: ``batch``)."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write("usage: python -m atelier batch WORKFLOW TABLE --out DIR [options]   (python -m atelier batch --help)\n")
        return 0 if argv else 2
    if argv[0] == "batch":
        from .batch.cli import main as batch_main

        return batch_main(argv[1:])
    sys.stderr.write(f"unknown command {argv[0]!r}; known: batch\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
