"""rnnstream console script."""

from __future__ import annotations

from rnnstream._cli import main as _main


def main() -> None:
    raise SystemExit(_main())


if __name__ == "__main__":
    main()
