"""Evaluate one patient: facts through the rule engine to cards and FHIR results."""
