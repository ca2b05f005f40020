"""Errors shared by every layer.

UserError is a mistake the user can fix (a missing file, a bad size, no
/dev/kvm): the CLI prints its message as one line on stderr and exits 2,
without a traceback.  Anything else is a bug or a guest/peer failure and is
reported as such.
"""


class UserError(Exception):
    """A problem with the user's input or environment; exit status 2."""
