"""The one door to every model.

`LLMHub` owns the request cache, one event loop thread, the per-endpoint concurrency caps, the circuit breakers,
the backends (and the embedded server they may start) and the token accounting. Stages get an `LLM` for one spec
and role and call `generate(requests)` with a batch; every request comes back as a result, ok or failed.

    with LLMHub(cache_path) as hub:
        results = hub.model(spec, role="moderator").generate(requests)
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import logging
import operator
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from orforge.core.config import ModelSpec
from orforge.llm.backends import backend_class
from orforge.llm.cache import FLUSH_S, Cache, cache_key
from orforge.llm.dialects import extract_json, schema_instruction
from orforge.llm.replicas import Replica, ReplicaRouter, ReplicaSlots
from orforge.llm.types import BackendError, CircuitOpenError, LLMRequest, LLMResult, Prepared, RawCompletion, Usage

log = logging.getLogger("orforge.llm")

MAX_REASKS = 2  # invalid or truncated structured replies are asked again this many times, then recorded as failed
REASK_TEMPERATURE = 0.7  # a re-ask at temperature 0 would return the same invalid reply
BREAKER_WINDOW = 50
BREAKER_MIN_SAMPLES = 10

ProgressFn = Callable[[int, Usage], None]


@functools.lru_cache(maxsize=256)
def response_schema(model: type) -> dict:
    """A response model's JSON schema, built once per class (pydantic takes ~0.1-0.2 ms per call; read-only after)."""
    return model.model_json_schema()


class CircuitBreaker:
    """Trips when more than half of the last `BREAKER_WINDOW` requests to one endpoint failed after retries."""

    def __init__(self) -> None:
        self.outcomes: collections.deque[bool] = collections.deque(maxlen=BREAKER_WINDOW)
        self.last_error = ""

    def record(self, ok: bool, error: str = "") -> None:
        self.outcomes.append(ok)
        if not ok:
            self.last_error = error

    @property
    def tripped(self) -> bool:
        n = len(self.outcomes)
        return n >= BREAKER_MIN_SAMPLES and self.outcomes.count(False) * 2 > n


class LLM:
    """One model spec in one role. Sync API: stages are plain functions, Prefect tasks run them in threads."""

    def __init__(self, hub: LLMHub, spec: ModelSpec, role: str, backend: Any, endpoint_key: tuple):
        self.hub, self.spec, self.role, self.backend, self.endpoint_key = hub, spec, role, backend, endpoint_key

    @property
    def label(self) -> str:
        return self.spec.label

    def generate(self, requests: list[LLMRequest], on_progress: ProgressFn | None = None) -> list[LLMResult]:
        """One result per request, in request order: the one-job case of `generate_together`."""
        return generate_together([(self, requests)], on_progress)[0]


def generate_together(jobs: Sequence[tuple[LLM, Sequence[LLMRequest]]], on_progress: ProgressFn | None = None
                      ) -> list[list[LLMResult]]:
    """Several (model, requests) jobs at once: each job's results in its request order, the jobs in the given order.

    Every request of every job is sent together, as far as each endpoint's cap lets it, so an endpoint serving several
    models (the moderators of a shard, the panel's members, the safety judges) never drains between one model's batch
    and the next. Caps, breakers, cache and accounting are per request as in `LLM.generate`. The models must share
    one hub. When a job raises (a tripped breaker's CircuitOpenError), the other jobs are cancelled and it is raised.
    """
    jobs = [(llm, list(requests)) for llm, requests in jobs]
    if not jobs:
        return []
    hub = jobs[0][0].hub
    if any(llm.hub is not hub for llm, _ in jobs):
        raise ValueError("generate_together: every model must come from the same LLMHub "
                         f"(got {len({id(llm.hub) for llm, _ in jobs})} hubs)")
    return hub.generate_together(jobs, on_progress)


def _fold_replica_row(rows: dict[tuple[str, str], dict[str, Any]], row: dict[str, Any],
                      combine: Callable[[int, int], int]) -> None:
    """Fold one replica summary (`Replica.summary()`) into `rows`, keyed by (model, URL): its counts combined with
    `combine`, taken out if either is, the first reason kept."""
    total = rows.setdefault((row["model"], row["url"]), {**row, "requests": 0, "failures": 0, "peak_in_flight": 0})
    for count in ("requests", "failures", "peak_in_flight"):
        total[count] = combine(total[count], row[count])
    total["taken_out"] = total["taken_out"] or row["taken_out"]
    total["why"] = total["why"] or row["why"]


class LLMHub:
    def __init__(self, cache_path: Path | str):
        self.cache = Cache(cache_path)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="orforge-llm", daemon=True)
        self._thread.start()
        self._lock = threading.RLock()  # backends start services while model() holds it
        self._backends: dict[tuple, Any] = {}
        self._semaphores: dict[tuple, asyncio.Semaphore] = {}
        self._breakers: dict[tuple, CircuitBreaker] = {}
        self._caps: dict[tuple, int] = {}
        self._replicas: dict[tuple, Replica] = {}  # per (backend, URL, model) of every base_url list
        self._replica_slots = ReplicaSlots()
        # Replica rows other hubs reported (a Dask/Ray worker's, flows.runner): per source, its latest totals.
        self._shipped_replicas: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
        self._services: dict[Any, Any] = {}
        self.usage: dict[tuple[str, str], Usage] = collections.defaultdict(Usage)
        self._closed = False
        self._flush_timer: asyncio.TimerHandle | None = None  # commits the cache's pending answers FLUSH_S late

    # -- construction -------------------------------------------------------------------------------------------
    def model(self, spec: ModelSpec, role: str) -> LLM:
        urls = tuple(spec.base_url) if isinstance(spec.base_url, list) else None  # replicas (llm/replicas.py)
        endpoint_key = (spec.backend, urls or spec.base_url or "", spec.model)
        backend_key = (endpoint_key, spec.api_key_env, spec.dialect, spec.timeout_s, spec.max_retries,
                       json.dumps(spec.extra, sort_keys=True))
        with self._lock:
            if endpoint_key not in self._breakers:
                self._breakers[endpoint_key] = CircuitBreaker()
            if backend_key not in self._backends:
                cls = backend_class(spec.backend)
                if urls is None:
                    self._backends[backend_key] = cls(spec, self._endpoint_semaphore(endpoint_key, spec), hub=self)
                else:
                    members = [(self._replica(spec, url),
                                cls(spec, self._endpoint_semaphore((spec.backend, url, spec.model), spec), hub=self,
                                    base_url=url)) for url in urls]
                    self._backends[backend_key] = ReplicaRouter(spec, members, self._replica_slots)
        return LLM(self, spec, role, self._backends[backend_key], endpoint_key)

    def _endpoint_semaphore(self, key: tuple, spec: ModelSpec) -> asyncio.Semaphore:
        if key not in self._semaphores:
            # The first spec naming an endpoint (or a replica URL) sets its cap; every role on it shares it.
            self._semaphores[key] = asyncio.Semaphore(spec.max_concurrency)
            self._caps[key] = spec.max_concurrency
            self._breakers.setdefault(key, CircuitBreaker())
        return self._semaphores[key]

    def _replica(self, spec: ModelSpec, url: str) -> Replica:
        key = (spec.backend, url, spec.model)
        if key not in self._replicas:
            self._endpoint_semaphore(key, spec)
            self._replicas[key] = Replica(url, spec.model, self._caps[key], self._breakers[key])
        return self._replicas[key]

    def service(self, key: Any, start: Callable[[], Any]) -> Any:
        """A process shared by backends (the embedded server), started once and stopped when the hub closes."""
        with self._lock:
            if key not in self._services:
                self._services[key] = start()
            return self._services[key]

    # -- the request path ---------------------------------------------------------------------------------------
    def generate_together(self, jobs: list[tuple[LLM, list[LLMRequest]]], on_progress: ProgressFn | None = None
                          ) -> list[list[LLMResult]]:
        """`generate_together` for models of this hub (stages call the module function, which checks that)."""
        results: list[list[LLMResult]] = [[] for _ in jobs]
        asked = [i for i, (_, requests) in enumerate(jobs) if requests]
        if not asked:
            return results
        with self._lock:  # close() flips _closed under the same lock: nothing is submitted to a stopping loop
            if self._closed:
                raise RuntimeError("the LLM hub is closed")
            fut = asyncio.run_coroutine_threadsafe(self._generate_all([jobs[i] for i in asked], on_progress),
                                                   self.loop)
        for i, job_results in zip(asked, fut.result(), strict=True):
            results[i] = job_results
        return results

    async def _generate_all(self, jobs: list[tuple[LLM, list[LLMRequest]]], on_progress: ProgressFn | None
                            ) -> list[list[LLMResult]]:
        tasks = [asyncio.ensure_future(self._generate(llm, requests, on_progress)) for llm, requests in jobs]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            # After one job raised, the others are cancelled: their caller is gone and the endpoint may be failing.
            # (Answers they already got are in the cache; a rerun asks only for the rest.)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _prepare(self, llm: LLM, req: LLMRequest, index: int, answer_keys: dict[bool, str]) -> Prepared:
        spec = llm.spec
        messages = [dict(m) for m in req.messages]
        if spec.system_prompt:
            if messages and messages[0]["role"] == "system":
                messages[0]["content"] = spec.system_prompt + "\n\n" + messages[0]["content"]
            else:
                messages.insert(0, {"role": "system", "content": spec.system_prompt})
        schema = response_schema(req.response_model) if req.response_model else None
        if schema is not None and spec.dialect == "none":
            messages[-1]["content"] += schema_instruction(schema)
        key = cache_key(answer_keys[schema is not None], messages, schema, req.sample_index)
        params = {"temperature": spec.temperature, "max_tokens": spec.max_tokens, "seed": req.sample_index}
        name = req.response_model.__name__ if req.response_model else "reply"
        return Prepared(messages, params, schema, key, index, 0, {"schema_name": name})

    def _validate(self, req: LLMRequest, raw: RawCompletion, lenient: bool) -> tuple[Any, str | None]:
        """(parsed, None) when the reply is acceptable, else (None, reason)."""
        if raw.text is None or (req.response_model and not raw.text.strip()):
            return None, "empty choices" if raw.text is None else "empty reply"
        if req.response_model is None:
            return None, None
        if raw.finish_reason == "length":
            return None, "truncated: finish_reason=length"
        try:
            data = json.loads(extract_json(raw.text, lenient))
        except json.JSONDecodeError as e:
            return None, f"invalid JSON: {e.msg} at char {e.pos}"
        try:
            return req.response_model.model_validate(data), None
        except ValidationError as e:
            first = e.errors()[0]
            return None, f"schema mismatch: {'.'.join(map(str, first['loc'])) or '<root>'}: {first['msg']}"

    async def _generate(self, llm: LLM, requests: list[LLMRequest], on_progress: ProgressFn | None) -> list[LLMResult]:
        usage = self.usage[(llm.role, llm.label)]
        batch_usage = Usage()
        lenient = llm.spec.dialect == "none"
        # Once per batch, as each hashes the spec; a request without a schema leaves the dialect out.
        answer_keys = {structured: llm.spec.answer_key(structured) for structured in (True, False)}
        prepared = [self._prepare(llm, r, i, answer_keys) for i, r in enumerate(requests)]
        results: list[LLMResult | None] = [None] * len(requests)

        def finish(i: int, result: LLMResult) -> None:
            results[i] = result
            if on_progress:
                on_progress(1, batch_usage)

        # Identical requests in one batch are sent once and fanned out.
        by_key: dict[str, list[Prepared]] = collections.defaultdict(list)
        for p in prepared:
            by_key[p.key].append(p)
        hits = self.cache.get_many(list(by_key))
        pending: list[Prepared] = []
        for key, group in by_key.items():
            if key in hits:
                raw = RawCompletion(**hits[key])
                checked = [(p, *self._validate(requests[p.index], raw, lenient)) for p in group]
                # Only validated answers are stored, so one that fails now was damaged on disk: ask again.
                if all(err is None for _, _, err in checked):
                    for p, parsed, _ in checked:
                        batch_usage.cached += 1
                        finish(p.index, LLMResult(requests[p.index], True, raw.text, parsed, None, True, 0,
                                                  raw.prompt_tokens, raw.completion_tokens, raw.finish_reason))
                    continue
            pending.append(group[0])

        breaker = self._breakers[llm.endpoint_key]
        stream = None
        try:
            for attempt in range(MAX_REASKS + 1):
                reask: list[Prepared] = []
                stream = llm.backend.complete(pending)
                async for p, out in stream:
                    batch_usage.requests += 1
                    group = by_key[p.key]
                    if isinstance(out, BackendError):
                        breaker.record(False, out.reason)
                        for g in group:
                            batch_usage.failures += 1
                            finish(g.index, LLMResult(requests[g.index], False, error=out.reason, attempts=attempt + 1))
                        if breaker.tripped:
                            n = len(breaker.outcomes)
                            raise CircuitOpenError(
                                f"stopping: {breaker.outcomes.count(False)} of the last {n} requests to "
                                f"{llm.backend.endpoint()} failed after retries; last error: {breaker.last_error}"
                            )
                        continue
                    breaker.record(True)
                    batch_usage.prompt_tokens += out.prompt_tokens
                    batch_usage.completion_tokens += out.completion_tokens
                    if (cost := llm.spec.cost(out.prompt_tokens, out.completion_tokens)) is not None:
                        batch_usage.cost = (batch_usage.cost or 0.0) + cost
                    parsed, err = self._validate(requests[p.index], out, lenient)
                    if err is None:
                        self.cache.put(p.key, llm.spec, out.text, out.finish_reason, out.prompt_tokens,
                                       out.completion_tokens)
                        if self._flush_timer is None:
                            self._flush_timer = self.loop.call_later(FLUSH_S, self._timed_flush)
                        for g in group:
                            finish(g.index, LLMResult(requests[g.index], True, out.text, parsed, None, False,
                                                      attempt + 1, out.prompt_tokens, out.completion_tokens,
                                                      out.finish_reason))
                    elif attempt < MAX_REASKS:
                        p.attempt = attempt + 1
                        p.params = {**p.params, "seed": p.params["seed"] + 1_000_003 * p.attempt,
                                    "temperature": max(p.params["temperature"], REASK_TEMPERATURE)}
                        reask.append(p)
                    else:
                        for g in group:
                            batch_usage.failures += 1
                            finish(g.index, LLMResult(requests[g.index], False, out.text, None, err, False,
                                                      attempt + 1, out.prompt_tokens, out.completion_tokens,
                                                      out.finish_reason))
                pending = reask
                if not pending:
                    break
        finally:
            usage.add(batch_usage)
            self.cache.flush()  # the end of a batch: its answers are committed before its caller sees them
            if stream is not None:
                await stream.aclose()  # left open by a raise (CircuitOpenError): what it still has in flight stops now
        return results  # type: ignore[return-value]

    def _timed_flush(self) -> None:
        self._flush_timer = None
        self.cache.flush()

    # -- accounting and lifecycle -------------------------------------------------------------------------------
    def usage_rows(self) -> list[dict[str, Any]]:
        return [{"role": role, "model": label, **u.as_dict()} for (role, label), u in sorted(self.usage.items())]

    def replica_rows(self) -> list[dict[str, Any]]:
        """What each replica of a `base_url` list did: requests, failures, peak in flight, taken out and why.
        Empty when no spec lists replicas; flows put it in the release notes as `replicas`.

        Rows other hubs reported (`add_replica_rows`) are summed in per replica (model, URL): requests and failures
        add up, `peak_in_flight` is the sum of each hub's own peak (an upper bound: the peaks need not have coincided;
        worker hubs each hold a share of the cap), and a replica any hub took out is out, with the first reason."""
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        for row in [r.summary() for r in self._replicas.values()] + [
                row for source in sorted(self._shipped_replicas)
                for _, row in sorted(self._shipped_replicas[source].items())]:
            _fold_replica_row(merged, row, operator.add)
        return list(merged.values())

    def add_replica_rows(self, source: str, rows: list[dict[str, Any]]) -> None:
        """Take another hub's `replica_rows()` (its running totals; `source` names that hub) into this hub's. Totals
        only grow but may arrive out of order, so the largest seen per source and field is kept."""
        seen = self._shipped_replicas.setdefault(source, {})
        for row in rows:
            _fold_replica_row(seen, row, max)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            async def shutdown() -> None:
                # Cancel whatever is still in flight (another task's batch when a stage failed), so no thread
                # stays blocked in generate() on a loop that is about to stop.
                pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                await asyncio.gather(*(b.aclose() for b in self._backends.values()), return_exceptions=True)

            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(30)
        finally:
            for svc in self._services.values():
                svc.stop()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.cache.close()

    def __enter__(self) -> LLMHub:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

