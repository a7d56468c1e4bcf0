"""Domain errors and exit codes. The CLI maps each error to one readable line and a code.

Rules: library code raises these (never ``sys.exit``); the message is a complete
sentence a user can act on, naming the file, field or endpoint at fault.
"""

EXIT_FAILURE = 1  # a failure at run time
EXIT_BAD_INPUT = 2  # bad input or configuration (as typer's usage errors)
EXIT_FAILED_REQUESTS = 3  # serve: the run ended, but some requests failed or were rejected
EXIT_INTERRUPTED = 130  # Ctrl-C


class QlmError(Exception):
    """Base class of every error qlmctl reports to the user."""

    exit_code = EXIT_FAILURE


class BadInput(QlmError):
    """Bad input or configuration (malformed file, unknown name): exit code 2."""

    exit_code = EXIT_BAD_INPUT


class EngineError(QlmError):
    """A serving engine failed at run time (unreachable, died, refused): exit code 1."""

    exit_code = EXIT_FAILURE


class EngineUnreachable(EngineError):
    """Nothing accepted the connection to an engine (refused): its server is gone."""


class FetchError(QlmError):
    """Downloading a dataset failed at run time (network, HTTP status): exit code 1."""

    exit_code = EXIT_FAILURE
