"""User-facing errors. Anything raised as a `UserError` subclass is printed as one line by the CLI (exit 2)."""


class UserError(Exception):
    """Bad input from the user: the message names the file, column or option and what was expected."""
