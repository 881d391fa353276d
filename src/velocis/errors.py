"""One exception type for user mistakes.

The CLI prints a VelocisError as a single line (no traceback) and exits non-zero.
Bugs raise ordinary exceptions so that they keep their traceback.
"""


class VelocisError(Exception):
    """A problem with the user's input: the message says what was wrong and what to do."""
