"""The HTTP layer: the app factory, endpoints, JWT checks, headers and the OpenAPI document."""
