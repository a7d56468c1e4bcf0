"""Domain errors. The CLI maps each to one readable line and an exit code.

Rules: library code raises these (never ``sys.exit``); the message is a complete
sentence a user can act on, naming the file, field or endpoint at fault.
"""


class QlmError(Exception):
    """Base class of every error qlmctl reports to the user."""

    exit_code = 1


class BadInput(QlmError):
    """Bad input or configuration (malformed file, unknown name): exit code 2."""

    exit_code = 2


class NotImplementedYet(QlmError):
    """A command whose issue has not landed yet: exit code 2."""

    exit_code = 2


class EngineError(QlmError):
    """A serving engine failed at run time (unreachable, died, refused): exit code 1."""

    exit_code = 1


class FetchError(QlmError):
    """Downloading a dataset failed at run time (network, HTTP status): exit code 1."""

    exit_code = 1
