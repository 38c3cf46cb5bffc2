"""Several servers behind one role: a `base_url` list names replicas of one model.

`LLMHub.model()` builds a `ReplicaRouter` for such a spec: one ordinary backend per URL, behind the backend
interface, so the hub's cache, validation, re-asks and accounting never know there are several. Each request goes
to the live replica with the fewest requests in flight that has a free slot (`max_concurrency` is per replica), or
waits for the first slot to free. A replica that cannot be reached (after the client's own retries) or whose
circuit breaker trips is taken out for the rest of the run and the others carry on; a request that met a timeout,
a 429 or a 5xx there is tried once on each other live replica. Only when every replica is out does the endpoint
fail, with `CircuitOpenError`. The URL is in no cache key (`ModelSpec.answer_key()`), so answers are shared
whichever replica gave them. Design notes: docs/design/llm-layer.md, "Several endpoints per role".
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from orforge.core.config import ModelSpec
from orforge.llm.backends import Outcome, each_as_done
from orforge.llm.types import BackendError, CircuitOpenError, Prepared, RawCompletion

DOWN, BUSY = "down", "busy"


@dataclass(eq=False)
class Replica:
    """One URL of a replicated model. The hub keeps one per (backend, URL, model), shared by every spec that lists
    it, so its cap, in-flight count, breaker and out state are the same whichever role sends."""

    url: str
    model: str
    cap: int
    breaker: Any  # the hub's CircuitBreaker for this URL
    in_flight: int = 0
    peak_in_flight: int = 0
    requests: int = 0  # requests this replica answered or failed (after the client's retries)
    failures: int = 0
    out: str | None = None  # why it was taken out; None while it is live

    def summary(self) -> dict[str, Any]:
        return {"model": self.model, "url": self.url, "requests": self.requests, "failures": self.failures,
                "peak_in_flight": self.peak_in_flight, "taken_out": self.out is not None, "why": self.out}


class ReplicaSlots:
    """Hands replica slots to requests, least in flight first. One per hub (loop thread only), so every router that
    lists a URL sees the same count. A request that finds no free slot waits in arrival order; each freed slot goes
    to the first waiter that can use it, so nothing polls and no wake-up is lost."""

    def __init__(self) -> None:
        self._waiters: collections.deque[tuple[tuple[Replica, ...], asyncio.Future]] = collections.deque()

    @staticmethod
    def _least_busy(candidates: tuple[Replica, ...]) -> Replica | None:
        best = None
        for r in candidates:
            if r.out is None and r.in_flight < r.cap and (best is None or r.in_flight < best.in_flight):
                best = r
        return best

    @staticmethod
    def _take(replica: Replica) -> Replica:
        replica.in_flight += 1
        replica.peak_in_flight = max(replica.peak_in_flight, replica.in_flight)
        return replica

    async def acquire(self, candidates: tuple[Replica, ...]) -> Replica | None:
        """A slot on the least busy live candidate, once one is free; None when every candidate is out."""
        if (best := self._least_busy(candidates)) is not None:
            return self._take(best)
        if all(r.out is not None for r in candidates):
            return None
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((candidates, fut))
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.result() is not None:
                self.release(fut.result())  # handed a slot just as it was cancelled: give it on
            raise

    def release(self, replica: Replica) -> None:
        replica.in_flight -= 1
        i = 0
        while replica.out is None and replica.in_flight < replica.cap and i < len(self._waiters):
            candidates, fut = self._waiters[i]
            if fut.done():  # cancelled while waiting
                del self._waiters[i]
                continue
            if replica in candidates and (best := self._least_busy(candidates)) is not None:
                del self._waiters[i]
                fut.set_result(self._take(best))
                continue
            i += 1

    def take_out(self, replica: Replica, why: str) -> None:
        if replica.out is None:
            replica.out = why
        # Waiters with no live candidate left are told at once; the others keep waiting for a live one.
        for entry in list(self._waiters):
            candidates, fut = entry
            if fut.done() or all(r.out is not None for r in candidates):
                self._waiters.remove(entry)
                if not fut.done():
                    fut.set_result(None)


def replica_fault(error: BackendError) -> str | None:
    """Whether an error belongs to the replica rather than to the request, read from the exceptions the backend
    turned into the `BackendError` (its cause or context chain, whatever the client's transport).

    `DOWN`: no connection could be made (refused, no route, unknown host), even after the client's retries: the
    replica is taken out at once. `BUSY`: a timeout, a dropped connection, 408/409/429 or 5xx after retries: counted
    by its breaker, and the request tried on another replica. None: anything else (a 4xx, a malformed response),
    which the request would meet on every replica.
    """
    import openai

    chain: list[BaseException] = []
    node = error.__cause__ or error.__context__
    while node is not None and len(chain) < 32:
        chain.append(node)
        node = node.__cause__ or node.__context__
    status = next((e for e in chain if isinstance(e, openai.APIStatusError)), None)
    if status is not None:
        return BUSY if status.status_code >= 500 or status.status_code in (408, 409, 429) else None
    if any(isinstance(e, _connect_failures()) for e in chain):
        return DOWN
    return BUSY if any(isinstance(e, openai.APIConnectionError) for e in chain) else None


def _connect_failures() -> tuple[type[BaseException], ...]:
    """Errors meaning "no connection could be opened" in the transports the openai client runs on."""
    kinds: list[type[BaseException]] = [ConnectionRefusedError]
    try:
        import aiohttp

        kinds.append(aiohttp.ClientConnectorError)
    except ImportError:
        pass
    import httpx

    return (*kinds, httpx.ConnectError)


class ReplicaRouter:
    """A backend over one backend per replica URL; see the module docstring."""

    def __init__(self, spec: ModelSpec, members: list[tuple[Replica, Any]], slots: ReplicaSlots):
        self.spec = spec
        self.replicas = tuple(r for r, _ in members)
        self._backends = {r: b for r, b in members}
        self._slots = slots

    def endpoint(self) -> str:
        return f"{len(self.replicas)} replicas of {self.spec.model}: {', '.join(r.url for r in self.replicas)}"

    def response_format(self, schema: dict, name: str) -> dict | None:
        return self._backends[self.replicas[0]].response_format(schema, name)

    def complete(self, batch: list[Prepared]) -> AsyncIterator[Outcome]:
        return each_as_done(batch, self._route)

    async def _route(self, req: Prepared) -> Outcome:
        tried: tuple[Replica, ...] = ()
        last: BackendError | None = None
        while True:
            candidates = tuple(r for r in self.replicas if r not in tried)
            replica = await self._slots.acquire(candidates) if candidates else None
            if replica is None:
                if all(r.out is not None for r in self.replicas):
                    raise CircuitOpenError(f"stopping: every replica of {self.spec.model} is out: "
                                           + "; ".join(f"{r.url}: {r.out}" for r in self.replicas))
                return req, last  # every live replica met a replica-side error: the last one stands
            try:
                out = await self._send(self._backends[replica], req)
                fault = self._account(replica, out)
            finally:
                self._slots.release(replica)  # after a take-out, so the freed slot cannot go to a dead replica
            if not isinstance(out, BackendError) or fault is None:
                return req, out
            tried, last = tried + (replica,), out

    def _account(self, replica: Replica, out: RawCompletion | BackendError) -> str | None:
        """Count the outcome on the replica and its breaker, take it out when it is dead; the error's fault."""
        replica.requests += 1
        if not isinstance(out, BackendError):
            replica.breaker.record(True)
            return None
        replica.failures += 1
        replica.breaker.record(False, out.reason)
        fault = replica_fault(out)
        if fault == DOWN:
            self._slots.take_out(replica, out.reason)
        elif replica.breaker.tripped:
            n = len(replica.breaker.outcomes)
            self._slots.take_out(replica, f"{replica.breaker.outcomes.count(False)} of its last {n} requests failed; "
                                          f"last error: {out.reason}")
        return fault

    @staticmethod
    async def _send(backend: Any, req: Prepared) -> RawCompletion | BackendError:
        # Through the backend's public batch interface, one request at a time: the replica is chosen per request.
        result: RawCompletion | BackendError | None = None
        async for _, out in backend.complete([req]):
            result = out
        assert result is not None
        return result

    async def aclose(self) -> None:
        await asyncio.gather(*(b.aclose() for b in self._backends.values()), return_exceptions=True)
