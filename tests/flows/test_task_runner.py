"""`runner:` picks where tasks run. A build on a local Dask cluster of two worker processes, started here, writes the
same split files as a threads build, its tasks make their model calls in the workers (each worker's hub says so),
and the server never sees more in flight than the endpoint's cap: each worker takes half of it."""

from __future__ import annotations

import os

import pytest
import yaml

from tests.flows.pipeline import pipeline_responder, write_config

pytestmark = pytest.mark.slow

SPLIT_FILES = ["benign.csv", "toxic.csv", "hard.csv", "benign.parquet", "toxic.parquet", "hard.parquet",
               "votes.parquet", "responses.parquet", "dedup.parquet"]
CAP = 8  # every role of write_config's build is on one endpoint with max_concurrency 8
LATENCY_S = 0.02  # long enough for requests to pile up to the cap


@pytest.fixture
def dask_cluster():
    from distributed import Client, LocalCluster

    import orforge.flows.recipes  # noqa: F401 - here and in the workers at once: both load the same sources

    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.run(_import_orforge)
        yield cluster, client


def _import_orforge() -> None:
    import orforge.flows.recipes  # noqa: F401


def _build(config_path, output):
    """A build of `config_path` with the runner its config names, as `orforge build` starts it; the progress the
    run reported, per stage."""
    from orforge.core.recipes import load_config
    from orforge.flows.progress import Reporter, use_reporter
    from orforge.flows.recipes import recipe
    from orforge.flows.runner import with_runner

    cfg = load_config(config_path)
    with use_reporter(Reporter()) as rep:
        with_runner(recipe(cfg.recipe).build, cfg)(config_path=str(config_path), output=str(output))
    return {name: (state.completed, state.tokens) for name, state in rep.stages.items()}


def test_dask_build_writes_the_threads_build_splits_within_the_cap(prefect_harness, fake_server, tmp_path,
                                                                    dask_cluster):
    from orforge.outputs.release import read_manifest

    cluster, client = dask_cluster
    url = fake_server.url + "/v1"
    threads_dir, dask_dir = tmp_path / "threads", tmp_path / "dask"
    threads_dir.mkdir()
    dask_dir.mkdir()
    threads_config = write_config(threads_dir, url)
    dask_config = write_config(dask_dir, url, runner={"kind": "dask", "address": cluster.scheduler_address,
                                                      "workers": 2})
    assert yaml.safe_load(threads_config.read_text())["moderation"]["moderators"][0]["max_concurrency"] == CAP

    fake_server.responder, fake_server.latency_s = pipeline_responder, LATENCY_S
    threads_progress = _build(threads_config, threads_dir / "release")
    threads_sent, threads_peak = len(fake_server.chat_requests), fake_server.max_in_flight
    fake_server.reset()
    fake_server.responder, fake_server.latency_s = pipeline_responder, LATENCY_S
    dask_progress = _build(dask_config, dask_dir / "release")
    dask_sent, dask_peak = len(fake_server.chat_requests), fake_server.max_in_flight

    for name in SPLIT_FILES:
        assert (threads_dir / "release" / name).read_bytes() == (dask_dir / "release" / name).read_bytes(), name
    assert dask_sent == threads_sent > 0
    assert threads_peak <= CAP and dask_peak <= CAP, (threads_peak, dask_peak)

    # The model calls were made in the two worker processes, by their own hubs on the dask build's cache.
    cache = str((dask_dir / "cache.sqlite").resolve())
    hubs = {worker: hub for worker, runs in client.run(_worker_hubs).items()
            for hub in runs.values() if hub["cache_path"] == cache}
    assert len(hubs) == 2, hubs
    assert all(int(hub["hub"].split(":")[1]) != os.getpid() for hub in hubs.values())
    worker_requests = sum(row["requests"] for hub in hubs.values() for row in hub["usage"])
    assert worker_requests == dask_sent

    # What only the workers saw reached the manifest and the progress bars as after the threads build.
    threads_manifest, dask_manifest = read_manifest(threads_dir / "release"), read_manifest(dask_dir / "release")
    assert dask_manifest.tokens == threads_manifest.tokens
    assert dask_manifest.notes["shards"] == threads_manifest.notes["shards"]
    assert dask_manifest.notes["shards"]["run"]["dedup"] == 2
    assert dask_progress == threads_progress and dask_progress["moderation"][0] > 0


def _worker_hubs():
    from orforge.flows.runner import worker_hub_usage

    return worker_hub_usage()


def test_runner_config_rules(tmp_path):
    from orforge.core.config import ConfigError, load_config

    def check(runner):
        return load_config(write_config(tmp_path, "http://127.0.0.1:9/v1", runner=runner))

    assert check({"kind": "dask", "address": "tcp://10.0.0.1:8786", "workers": 4}).runner.processes() == 4
    with pytest.raises(ConfigError, match="workers: give the number of worker processes"):
        check({"kind": "ray", "address": "ray://head:10001"})
    with pytest.raises(ConfigError, match="address needs kind dask or ray"):
        check({"kind": "threads", "address": "tcp://10.0.0.1:8786"})
    # Each of 16 workers would keep at least one request in flight: more than a cap of 8.
    with pytest.raises(ConfigError, match="16 worker processes exceed seeds 'gen' max_concurrency=8"):
        check({"kind": "dask", "workers": 16})
    # Where tasks run does not change what is built.
    assert check({"kind": "dask", "workers": 2}).config_hash() == check({}).config_hash()


def test_dask_workers_replica_rows_reach_the_manifest(prefect_harness, tmp_path, dask_cluster):
    from orforge.outputs.release import read_manifest
    from tests.fakeserver import FakeServer
    from tests.flows.pipeline import stage_of

    cluster, client = dask_cluster
    with FakeServer(pipeline_responder) as a, FakeServer(pipeline_responder) as b:
        config = write_config(tmp_path, a.url + "/v1", panel=None,
                              runner={"kind": "dask", "address": cluster.scheduler_address, "workers": 2})
        raw = yaml.safe_load(config.read_text())
        replicas = [a.url + "/v1", b.url + "/v1"]
        for moderator in raw["moderation"]["moderators"]:
            moderator.update(base_url=replicas, max_concurrency=2)
        config.write_text(yaml.safe_dump(raw))
        _build(config, tmp_path / "release")

        votes_at = {s: len([r for r in s.chat_requests if stage_of(r.body) == "ModerationVerdict"]) for s in (a, b)}
        assert votes_at[a] > 0 and votes_at[b] == len(b.chat_requests) > 0
        rows = {row["url"]: row for row in read_manifest(tmp_path / "release").notes["replicas"]}
        assert sorted(rows) == sorted(replicas)
        # The votes were sent by the workers' hubs; what each replica did adds up over them to what its server saw.
        cache = str((tmp_path / "cache.sqlite").resolve())
        by_worker = [hub["replicas"] for runs in client.run(_worker_hubs).values() for hub in runs.values()
                     if hub["cache_path"] == cache]
        assert by_worker and all(by_worker)
        # Server a also serves the other roles, whose cap (8) it took first; b has the moderators' cap (2). Each
        # worker holds half of either, and the peaks add up over the workers.
        for url, seen, cap in zip(replicas, (votes_at[a], votes_at[b]), (CAP, 2), strict=True):
            mine = [r for hub in by_worker for r in hub if r["url"] == url]
            assert rows[url]["requests"] == seen == sum(r["requests"] for r in mine)
            assert rows[url]["peak_in_flight"] == sum(r["peak_in_flight"] for r in mine) <= cap
            assert rows[url]["failures"] == 0 and not rows[url]["taken_out"]
