"""`python -m orforge ...` is the `orforge` command."""

from orforge.flows.cli import main

if __name__ == "__main__":
    main()
