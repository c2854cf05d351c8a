"""The one exception a user's mistake raises. The scripts print its message as a single line and exit non-zero,
with no traceback: the message must name the problem and the fix."""


class UserError(Exception):
    pass
