"""The one exception type for user errors, shared by packager/ and runtimes/.

A user error is one line: what is wrong and how to fix it. The CLI prints it as
``Error: <message>`` and exits non-zero, never with a traceback.
"""


class XpackError(Exception):
    """A problem the user can fix (bad input, missing file, unsupported model)."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))  # always one line
