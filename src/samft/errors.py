"""The one exception type that entry points turn into a one-line message and exit code 2."""


class UserError(Exception):
    """A problem the user can fix: bad config, bad data file, bad checkpoint. The message is one line."""


EXIT_USER_ERROR = 2
