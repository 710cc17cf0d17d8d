"""The error `editflow data` raises for bad input: its message is the whole report for the user."""


class DataError(Exception):
    """Input that cannot be converted or verified. The message is one paragraph naming the file, record and
    field involved and what to do; the CLI prints it without a traceback and exits 1."""
