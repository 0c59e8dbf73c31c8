"""Failure paths of commit and rollback, and the migration context's undo log."""

from __future__ import annotations

import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from swapd import patch
from tests.unit.test_patch_support import Mods


@pytest.fixture
def mods(tmp_path: Path) -> Iterator[Mods]:
    with Mods(tmp_path) as m:
        yield m


def test_migration_set_undo_removes_an_instance_attribute_it_added() -> None:
    class Job:
        retries = 0  # a class-level default, not the instance's own value

        @property
        def size(self) -> int:
            return self.__dict__.get("_size", 1)

        @size.setter
        def size(self, value: int) -> None:
            self.__dict__["_size"] = value

    job = Job()
    ctx = patch.MigrationContext(types.ModuleType("m"), "migrate", {})
    ctx.set(job, "retries", 3)
    ctx.set(job, "size", 5)  # through a data descriptor: its value is what is restored
    ctx.set(Job, "retries", 9)
    assert (job.retries, job.size, Job.retries) == (3, 5, 9)
    ctx.undo()
    assert job.__dict__ == {"_size": 1} and Job.retries == 0 and job.size == 1
