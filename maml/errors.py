"""The one error type the command line turns into a one-line message and exit status 2."""


class UsageError(Exception):
    """Bad input from the user: the message names the problem and, where there is one, the fix."""
