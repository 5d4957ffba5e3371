"""The one exception type users see for bad input: the CLI prints its message, no traceback."""


class UCGMError(ValueError):
    """Bad input (file, field, flag): the message names it and says what was expected."""
