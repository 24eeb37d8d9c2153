"""``python -m dattri_cli`` is the same as the ``dattri`` command."""

from dattri_cli.cli import main

if __name__ == "__main__":
    main()
