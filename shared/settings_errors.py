"""Settings errors told without the values: a bad setting may be a secret."""

from __future__ import annotations

from pydantic import ValidationError


class SettingsError(ValueError):
    """The environment does not make valid settings; the message names each bad variable."""


def settings_error(exc: ValidationError, prefix: str = "BOTLINE_") -> SettingsError:
    """One line per problem, naming the environment variable; never the value given.

    pydantic's own message quotes the input, which for ``BOTLINE_ADMIN_TOKENS`` or
    a URL with a password is the secret itself.
    """
    lines = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        field = str(error["loc"][0]) if error["loc"] else ""
        variable = (prefix + field).upper() if field else "the settings"
        message = error["msg"].removeprefix("Value error, ")
        lines.append(message if message.startswith(variable) else f"{variable}: {message}")
    return SettingsError("invalid settings: " + "; ".join(lines))
