"""The README's error table and the exception hierarchy say the same thing."""

from __future__ import annotations

import re
from pathlib import Path

from shared import errors
from shared.errors import BotlineError, RateLimited

README = Path(__file__).resolve().parents[2] / "README.md"


def _all_errors() -> dict[str, type[BotlineError]]:
    found: dict[str, type[BotlineError]] = {}
    pending: list[type[BotlineError]] = [BotlineError]
    while pending:
        cls = pending.pop()
        found.setdefault(cls.code, cls)
        pending += cls.__subclasses__()
    return found


def _rows() -> list[tuple[str, str, list[str]]]:
    text = README.read_text()
    section = text.split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("case", "---") or set(cells[0]) <= {"-"}:
            continue
        rows.append((cells[0], cells[1], re.findall(r"`([a-z_]+)`", cells[2])))
    return rows


def _instance(cls: type[BotlineError]) -> BotlineError:
    if cls is RateLimited:
        return RateLimited("over", 1500, {})
    return cls("any")


def test_every_row_of_the_readme_error_table_matches_an_error_class() -> None:
    by_code = _all_errors()
    rows = _rows()
    assert len(rows) >= 10, "the README's error table was not found"
    for case, status, codes in rows:
        assert codes, f"no code in the row {case!r}"
        for code in codes:
            assert code in by_code, f"README names {code!r}, which no error class has"
            error = _instance(by_code[code])
            if status != "(stream)":
                number = re.match(r"\d{3}", status)
                assert number is not None, f"no status in the row {case!r}"
                assert error.status == int(number.group()), (case, code)
            assert (error.retry_after is not None) == ("Retry-After" in status), (case, code)


def test_every_error_lives_in_shared_errors() -> None:
    for cls in _all_errors().values():
        assert cls.__module__ == errors.__name__, cls


def test_every_error_a_callers_key_can_cause_is_in_the_table() -> None:
    # The key's own states (invalid, disabled, expired, revoked mid-request):
    # the admin surface's token errors are documented with the admin API.
    named = {code for _, _, codes in _rows() for code in codes}
    for code, cls in _all_errors().items():
        if cls.type == "authentication_error" and not issubclass(cls, errors.AdminUnauthorized):
            assert code in named, f"the README's error table does not name {code!r}"
