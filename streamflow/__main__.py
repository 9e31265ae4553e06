"""`python -m streamflow`: the same as the `streamflow` command."""

from streamflow.cli import main

if __name__ == "__main__":
    main()
