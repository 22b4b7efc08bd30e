"""The OpenAPI document of the API, built from the request schemas."""
