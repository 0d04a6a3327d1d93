"""The test method table has a row for every method opendelta ships, so a new method cannot be forgotten."""

from __future__ import annotations

from support.methods import METHODS, builtin_delta_types

from opendelta.registry import known_delta_types


def test_every_registered_builtin_method_has_a_row_and_every_row_is_registered():
    # toy methods that tests register (test_adding_a_method, test_registry) live outside opendelta's
    # package, so builtin_delta_types leaves them out whichever tests ran before
    assert sorted(builtin_delta_types()) == sorted(METHODS)
    assert set(METHODS) <= set(known_delta_types())


def test_each_row_is_in_the_method_matrix_or_says_why_not():
    for method in METHODS.values():
        assert bool(method.matrix) != bool(method.not_in_matrix), method.delta_type


def test_the_matrix_ids_are_unique():
    ids = [at.id for method in METHODS.values() for at in method.matrix]
    assert len(ids) == len(set(ids))
