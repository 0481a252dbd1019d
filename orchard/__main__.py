"""`python -m orchard ...` is the `orchard` command (the form `ray job submit` entrypoints use)."""

from orchard.services.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
