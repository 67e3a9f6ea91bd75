"""Test packages (a package, so that tests/server is `tests.server` and never shadows the
`server` package it tests)."""
