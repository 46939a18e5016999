"""Patterns over the facts the service asserts (a fresh expression per call: aliasing mutates it)."""

from durable.lang import c, m


def finding(code: str):
    """Match the finding with this code."""
    return (m.t == "finding") & (m.code == code)


def muscle_involved():
    """Bind c.mu to a finding of muscle involvement: proximal weakness or a raised CK."""
    return c.mu << ((m.t == "finding") & ((m.code == "proximal-weakness") | (m.code == "ck-raised")))


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


def any_code(codes):
    """Match a fact whose code is any of these."""
    expression = m.code == codes[0]
    for code in codes[1:]:
        expression = expression | (m.code == code)
    return expression
