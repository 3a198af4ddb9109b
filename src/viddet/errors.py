"""The one exception type users see."""


class VidDetError(Exception):
    """A user-facing error: bad input file, wrong checkpoint, bad configuration.

    The message names the file (or option) and the problem; the CLI prints it without a traceback
    (exit status 2).
    """
