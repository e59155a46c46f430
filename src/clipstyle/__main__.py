"""The ``clipstyle`` command (``python -m clipstyle``, and the console script).

Signals are handled from the first line, before click and torch are imported
(see clipstyle.interrupts)."""

from clipstyle import interrupts


def main() -> None:
    interrupts.install()
    from clipstyle.cli import cli

    cli()


if __name__ == "__main__":
    main()
