"""``tome-eval``: what accuracy a model loses for how much speed as r grows, on your own images.

:mod:`tome_eval.runner` evaluates one patched model over an image folder for several r,
:mod:`tome_eval.combine` stacks ToMe with ``torch.compile``, autocast and int8 quantisation, and
:mod:`tome_eval.cli` is the ``tome-eval`` command.
"""

from .errors import EvalInputError

__all__ = ["EvalInputError"]
