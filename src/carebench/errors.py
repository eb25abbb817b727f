"""User-facing errors. Anything raised as a `UserError` subclass is printed as one line by the CLI (exit 2)."""


class UserError(Exception):
    """Bad input from the user: the message names the file, column or option and what was expected."""


class OptionError(UserError, ValueError):
    """One bad option value. `key` names the option and `problem` says what was expected, so each caller can name
    the place the option came from (a plan key, a command-line flag)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem
