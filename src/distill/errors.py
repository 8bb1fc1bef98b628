"""The one exception type for mistakes a user can make (bad recipe, bad path, bad data).

The CLI turns it into one line on stderr and exit status 2; the Python API lets it propagate.
Messages name the field or file at fault and say how to fix it.
"""


class UserError(ValueError):
    """A problem in what the user gave us, with a message that says how to fix it."""


class NonFiniteError(UserError):
    """NaN or inf where training needs finite numbers (a teacher's logits); the loop adds the step it happened at."""
