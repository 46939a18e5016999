"""Patterns over the facts the service asserts (a fresh expression per call: aliasing mutates it)."""

from durable.lang import m


def finding(code: str):
    """Match the finding with this code."""
    return (m.t == "finding") & (m.code == code)


def antibody(name: str):
    """Match the result summary of one antibody (state: positive, negative, indeterminate, not-tested)."""
    return (m.t == "antibody") & (m.name == name)


def clinical(name: str):
    """Match one clinical concept (state: present, past, unknown)."""
    return (m.t == "clinical") & (m.name == name)


def of_type(t: str):
    """Match the single fact of a type, e.g. 'ck', 'biopsy', 'patient', 'statin'."""
    return m.t == t


def any_name(names):
    """Match a fact whose name is any of these."""
    expression = m.name == names[0]
    for name in names[1:]:
        expression = expression | (m.name == name)
    return expression
