"""attrs validators shared by configuration classes: every error names the option, the bad value
and what is allowed (the project's rule for bad input)."""

from __future__ import annotations


def _label(instance, attribute) -> str:
    owner = getattr(instance, "name", "") or ""
    return f"{owner} {attribute.name}" if owner else attribute.name


def check_int_at_least(low: int):
    """An int >= ``low`` (bools refused)."""
    def check(instance, attribute, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{_label(instance, attribute)} must be an int >= {low}, got {value!r}")
    return check


check_positive_int = check_int_at_least(1)


def check_choice(choices):
    """One of ``choices``."""
    choices = tuple(choices)

    def check(instance, attribute, value):
        if value not in choices:
            raise ValueError(f"{_label(instance, attribute)} must be one of {choices}, got {value!r}")
    return check
