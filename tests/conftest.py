"""Shared fixtures: a real MongoDB-protocol server per session, a database per test, sidecar processes."""
from __future__ import annotations

import itertools
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pymongo
import pytest

from tests.fake_upstream import FakeUpstream
from tests.harness import MongoServer, Sidecar


# The longest files first. `./dev test` runs the suite on two workers (pytest-xdist, `--dist loadfile`: a file
# stays on one worker, so its module fixtures are built once); a long file handed out last would run alone at
# the end. The order of the other files, and of the tests inside every file, is unchanged.
SLOW_FILES_FIRST = ("test_readme_commands.py", "test_bench_smoke.py", "test_store_scale.py",
                    "test_reliability_outage.py", "test_e2e_budget.py", "test_e2e_trust.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def mongo(tmp_path_factory) -> Iterator[MongoServer]:
    server = MongoServer(tmp_path_factory.mktemp("secantus") / "data").start()
    yield server
    server.stop()


@pytest.fixture
def db_name() -> str:
    return "oh_" + uuid.uuid4().hex[:12]


@pytest.fixture
def mongo_db(mongo, db_name) -> Iterator[pymongo.database.Database]:
    client = pymongo.MongoClient(mongo.uri, serverSelectionTimeoutMS=5000, tz_aware=True)
    yield client[db_name]
    client.close()


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    fake.start()
    yield fake
    fake.stop()


_counter = itertools.count()


@pytest.fixture
def sidecar_factory(tmp_path: Path, mongo, db_name, upstream) -> Iterator[Callable[..., Sidecar]]:
    started: list[Sidecar] = []

    def make(*, start: bool = True, upstream_url: str | None = None, db: str | None = None,
             mongo_uri: str | None = None, **kw) -> Sidecar:
        n = next(_counter)
        sc = Sidecar(tmp_path / f"sidecar{n}", upstream_url or upstream.url, mongo_uri or mongo.uri, db or db_name,
                     name=f"sidecar{n}", **kw)
        started.append(sc)
        if start:
            sc.start()
        return sc

    yield make
    for sc in started:
        sc.stop()


@pytest.fixture
def sidecar(sidecar_factory) -> Sidecar:
    return sidecar_factory()
