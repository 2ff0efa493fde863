"""Errors a user can act on.

Raised for bad configuration or input anywhere in the library; the CLI prints them
as one line (``error: ...``) and exits with status 2 instead of a deep traceback.
"""


class MMPeftError(Exception):
    """Base of the errors whose message is all a user needs (the CLI prints it without a traceback)."""


class ConfigError(MMPeftError, ValueError):
    """A setting, path or name in the user's configuration is wrong. The message names it."""


class ImagesDoNotFit(ConfigError):
    """A sample's images take more tokens than ``data.max_length`` holds: a setting that cannot train (the memory
    planner's worst-case batch raises it, and its search for the largest settings skips such values)."""


class DataError(MMPeftError):
    """The data cannot be trained on as it is (e.g. too many bad samples). The message names the shard."""


class MergeError(ConfigError):
    """An adapter cannot be merged into the base weights or exported as a LoRA as asked. The message says why."""
