"""The Ray task runner, checked end to end against a threads build, with the time each runner takes.

The OR-Bench build of tests/flows/test_task_runner.py (tests/flows/pipeline.py's scripted model on a loopback server
in this process, every role capped at 8 in flight, 20 ms per answer) is built once per runner:

- threads: Prefect's thread pool in this process (the reference);
- dask: a local Dask cluster of 2 worker processes (4 threads each, as a local `runner: dask` starts), by address;
- ray: a local Ray node of 2 CPUs started here, by address (as an existing cluster is used);
- ray-local: `runner: {kind: ray, workers: 2}` with no address, so the runner starts (and stops) its own node;
- ray-client: a head node started here by `ray start --head --block` (as on a cluster), reached through Ray Client
  at its ray:// address, the way the README says to point a build at a remote Ray cluster.

For each cluster build it checks what tests/flows/test_task_runner.py checks of a Dask build: the split files
byte-identical to the threads build's, the same requests sent, never more than the cap in flight at the server, the
manifest's tokens and shard counts and the progress bars equal to the threads build's, and (except ray-local,
whose node stops with the build) the calls made by the worker processes' own hubs. It prints the start-up times, each
build's wall time and the checks, and exits 1 if a check failed (about 4 min per three runners on a busy 2-core
machine). Ray (prefect-ray, 290 MB installed) is not in the `dev` extra; without it the Ray runners are skipped:

    .venv/bin/pip install -e '.[ray]'
    .venv/bin/python benchmarks/ray_runner.py [--kinds threads,dask,ray,ray-local,ray-client]

Workers import orforge after this process does: a source file edited in between makes their tasks refuse to run
(WorkerCodeError), as on a cluster running other code.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import footer, header, table  # noqa: E402

import orforge.flows  # noqa: E402,F401  (Prefect environment defaults)

KINDS = ("threads", "dask", "ray", "ray-local", "ray-client")
WORKERS = 2
CAP = 8  # tests/flows/pipeline.py's write_config: every endpoint at max_concurrency 8
LATENCY_S = 0.02


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _worker_hubs_after(pause_s: float) -> tuple[int, dict]:
    """In a Ray worker: this process's hubs, after a pause that keeps the worker busy so that the next of the
    tasks submitted together lands on another worker process."""
    from orforge.flows.runner import worker_hub_usage

    time.sleep(pause_s)
    return os.getpid(), worker_hub_usage()


def _import_orforge() -> int:
    import orforge.flows.recipes  # noqa: F401

    time.sleep(1.0)  # held, so the WORKERS imports run in as many processes
    return os.getpid()


def start_dask():
    from distributed import Client, LocalCluster

    from orforge.flows.runner import LOCAL_DASK_THREADS

    cluster = LocalCluster(n_workers=WORKERS, processes=True, threads_per_worker=LOCAL_DASK_THREADS,
                           dashboard_address=None, silence_logs=logging.ERROR)
    client = Client(cluster)
    client.run(_import_orforge)

    def hubs() -> list[dict]:
        return [hub for _, runs in client.run(_worker_hubs_after, 0.0).values() for hub in runs.values()]

    def stop() -> None:
        client.close()
        cluster.close()

    return cluster.scheduler_address, hubs, stop


def start_ray(client: bool = False):
    """A Ray node of WORKERS CPUs whose workers have imported orforge, joined by this process (directly, or as a
    Ray Client of a head node started by `ray start`): (address, hubs, stop, seconds until the node answered)."""
    import ray

    started = time.perf_counter()
    head = None
    if client:
        gcs_port, client_port = _free_port(), _free_port()
        head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                                 f"--port={gcs_port}", f"--ray-client-server-port={client_port}",
                                 f"--num-cpus={WORKERS}", "--include-dashboard=false", "--disable-usage-stats"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        address = f"ray://127.0.0.1:{client_port}"
        while True:  # the client server listens once the head is up
            try:
                ray.init(address=address, namespace="prefect")
                break
            except ConnectionError:
                if head.poll() is not None or time.perf_counter() - started > 300:
                    head.terminate()
                    raise
                time.sleep(1)
    else:
        ray.init(address="local", num_cpus=WORKERS, include_dashboard=False, namespace="prefect")
        address = ray.get_runtime_context().gcs_address
    node_s = time.perf_counter() - started
    remote_import = ray.remote(_import_orforge)
    pids = ray.get([remote_import.remote() for _ in range(WORKERS)])
    assert len(set(pids)) == WORKERS, pids

    def hubs() -> list[dict]:
        remote_hubs = ray.remote(_worker_hubs_after)
        found = ray.get([remote_hubs.remote(1.0) for _ in range(WORKERS)])
        return [hub for _, runs in {pid: runs for pid, runs in found}.items() for hub in runs.values()]

    def stop() -> None:
        ray.shutdown()
        if head is not None:
            head.terminate()  # `ray start --block` stops the node's processes as it exits
            head.wait(60)

    return address, hubs, stop, node_s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, from {', '.join(KINDS)}")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    if unknown := set(kinds) - set(KINDS):
        parser.error(f"--kinds: unknown {', '.join(sorted(unknown))}")
    if "threads" not in kinds:
        kinds.insert(0, "threads")
    # `make benchmarks` runs every script: without the extra, say so and measure what is installed.
    missing = {kind: package for kind in kinds
               for prefix, package in (("ray", "prefect_ray"), ("dask", "prefect_dask"))
               if kind.startswith(prefix) and importlib.util.find_spec(package) is None}
    if missing:
        print(f"not installed: {', '.join(sorted(set(missing.values())))}; skipping {', '.join(missing)} "
              "(pip install -e '.[ray]' or '.[dask]')")
        kinds = [kind for kind in kinds if kind not in missing]

    header("benchmarks/ray_runner.py: threads vs Dask vs Ray task runners, same build",
           packages=("prefect", "prefect-ray", "ray", "prefect-dask", "distributed"))
    from prefect.testing.utilities import prefect_test_harness

    import orforge.flows.recipes  # noqa: F401 - before the workers import it: both load the same sources
    from orforge.outputs.release import read_manifest
    from tests.fakeserver import FakeServer
    from tests.flows.pipeline import pipeline_responder, write_config
    from tests.flows.test_task_runner import SPLIT_FILES, _build

    tmp = Path(tempfile.mkdtemp(prefix="orforge-ray-runner-"))
    rows, failed = [], []
    try:
        with prefect_test_harness(server_startup_timeout=300), FakeServer(models=["fake-model"]) as server:
            url = server.url + "/v1"
            reference = None
            for kind in kinds:
                folder = tmp / kind
                folder.mkdir()
                start_s, hubs, stop = None, None, None
                runner: dict | None = None
                started = time.perf_counter()
                if kind == "dask":
                    address, hubs, stop = start_dask()
                    start_s = f"{time.perf_counter() - started:.1f} cluster + imports"
                    runner = {"kind": "dask", "address": address, "workers": WORKERS}
                elif kind in ("ray", "ray-client"):
                    address, hubs, stop, node_s = start_ray(client=kind == "ray-client")
                    start_s = f"{node_s:.1f} node + {time.perf_counter() - started - node_s:.1f} imports"
                    runner = {"kind": "ray", "address": address, "workers": WORKERS}
                elif kind == "ray-local":
                    start_s = "in build"
                    runner = {"kind": "ray", "workers": WORKERS}
                config = write_config(folder, url, **({"runner": runner} if runner else {}))
                server.reset()
                server.responder, server.latency_s = pipeline_responder, LATENCY_S
                try:
                    started = time.perf_counter()
                    progress = _build(config, folder / "release")
                    wall = time.perf_counter() - started
                    sent, peak = len(server.chat_requests), server.max_in_flight
                    manifest = read_manifest(folder / "release")
                    cache = str((folder / "cache.sqlite").resolve())
                    worker_hubs = [h for h in hubs() if h["cache_path"] == cache] if hubs else None
                finally:
                    if stop is not None:
                        stop()
                run = {"folder": folder, "progress": progress, "sent": sent, "manifest": manifest}
                checks: dict[str, bool] = {"peak <= cap": peak <= CAP}
                if reference is None:
                    reference = run
                else:
                    theirs, ours = reference["folder"] / "release", folder / "release"
                    checks["splits identical"] = all((theirs / name).read_bytes() == (ours / name).read_bytes()
                                                     for name in SPLIT_FILES)
                    checks["requests"] = sent == reference["sent"] > 0
                    checks["tokens"] = manifest.tokens == reference["manifest"].tokens
                    checks["shards"] = manifest.notes["shards"] == reference["manifest"].notes["shards"]
                    checks["progress"] = progress == reference["progress"]
                    if worker_hubs is not None:
                        checks[f"{WORKERS} worker hubs sent all"] = (
                            len(worker_hubs) == WORKERS
                            and all(int(h["hub"].split(":")[1]) != os.getpid() for h in worker_hubs)
                            and sum(row["requests"] for h in worker_hubs for row in h["usage"]) == sent)
                failed += [f"{kind}: {name}" for name, ok in checks.items() if not ok]
                rows.append([kind, start_s or "-", f"{wall:.1f}", sent, peak,
                             ", ".join(f"{name} {'ok' if ok else 'FAILED'}" for name, ok in checks.items()),
                             _load()])
                print(f"{kind}: build {wall:.1f} s, load {_load()}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(table(["runner", "start s", "build s", "requests", "peak in flight", "checks", "load after"], rows))
    print(f"\n{'FAILED: ' + '; '.join(failed) if failed else 'every check passed'}")
    footer()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
