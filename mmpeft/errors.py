"""Errors a user can act on.

Raised for bad configuration or input anywhere in the library; the CLI prints them
as one line (``error: ...``) and exits with status 2 instead of a deep traceback.
"""


class ConfigError(ValueError):
    """A setting, path or name in the user's configuration is wrong. The message names it."""
