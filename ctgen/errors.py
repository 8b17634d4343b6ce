"""Errors a user can act on. The CLI prints these as one clear line (no traceback), exit code 2."""


class UserError(ValueError):
    """Bad input, config, file or environment; the message says what and where."""
