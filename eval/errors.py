"""The one error type for bad user input: the command line turns it into a message and exit code 2."""


class EvalInputError(ValueError):
    """The folder, weights or options cannot be evaluated as given; the message says why and what to do."""
