"""Helpers shared by the tests (tiny models, method table, numeric bounds); not tests themselves."""
