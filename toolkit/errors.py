"""Errors that mean "the user gave us something wrong", as opposed to bugs.

CLIs catch :class:`UserError` and print its message as one line with exit code 2;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with input from outside (a flag, a file, a model spec) described in one line."""


class ProfileError(UserError):
    """A profile file that cannot be used: unreadable, wrong version, invalid field, other model."""
