"""Gather FHIR resources for a request: from its prefetch, or fetched from its FHIR server."""
