"""The project's input errors: something the user gave is wrong, and the message says what and how to fix it.

Every package raises these for bad files, layouts and settings; the command-line programs print them as one
line (exit status 2). Any other exception is a bug in this code and keeps its traceback.
"""


class InputError(ValueError):
    """A file, layout, prompt or setting the user gave cannot be used (the message says why and what to do)."""


class MissingInputError(InputError, FileNotFoundError):
    """A file, folder or download the user pointed at is not there."""


class AccessError(InputError, PermissionError):
    """A file or repository the user pointed at cannot be read with the user's rights (e.g. a gated repo)."""
