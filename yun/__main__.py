"""`python -m yun ...` is the `yun` command."""

from yun.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
