"""Helpers shared by the integration tests (importable as `support`)."""
