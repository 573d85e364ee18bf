"""Ray Serve request router for the engine replicas: a request goes to the replica where its prompt
prefix (with the same interventions) or its named steering vector was last sent, while that replica's
load stays within `affinity_slack` of the least loaded one; otherwise to the least loaded replica, ties
broken by fewest requests sent so far (so an idle pool alternates).

This is Ray Serve's request-router extension point (`ray.serve.request_router.RequestRouter`, set per
deployment in `RequestRouterConfig`). Ray's own prefix-aware router (`ray.serve.llm`) needs the
`ray[llm]` extra (vLLM, pyarrow), reads text prompts only and knows nothing of interventions, so the
affinity keys come from routing.py instead. The load is the requests this router has in flight on each
replica (exact for a single ingress replica), counting requests being routed to it right now (Ray routes
concurrent requests concurrently: without them a burst would all pick the same idle replica), or Ray's
cached queue length, whichever is larger."""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from actserve.server.replicas.routing import ForwardedRequest

MAX_REMEMBERED_KEYS = 200_000


class AffinityRouter(RequestRouter):
    def initialize_state(self, affinity_slack: int = 8, **kwargs: Any) -> None:
        self.affinity_slack = affinity_slack
        self._owner: OrderedDict[str, ReplicaID] = OrderedDict()
        self._in_flight: Counter[ReplicaID] = Counter()
        self._sent: Counter[ReplicaID] = Counter()
        self._requests: dict[str, ReplicaID] = {}
        self._choosing: dict[str, ReplicaID] = {}  # request being routed -> the replica ranked first

    @staticmethod
    def _keys(pending: PendingRequest | None) -> tuple[str, ...]:
        if pending is None:
            return ()
        for arg in pending.args:
            if isinstance(arg, ForwardedRequest):
                return arg.keys
        return ()

    def _loads(self, replicas: list[RunningReplica], pending: PendingRequest | None) -> dict[ReplicaID, int]:
        me = pending.metadata.internal_request_id if pending is not None else None
        choosing = Counter(rid for req, rid in self._choosing.items() if req != me)
        out = {}
        for r in replicas:
            cached = self.replica_queue_len_cache.get(r.replica_id) or 0
            out[r.replica_id] = max(self._in_flight[r.replica_id] + choosing[r.replica_id], cached)
        return out

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        """Ranks, most preferred first: the warm replica alone (when it qualifies), then every candidate
        from least to most loaded; Ray takes the first rank with a replica that accepts."""
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # all full: back off, not spin
        if not candidate_replicas:
            return []
        loads = self._loads(candidate_replicas, pending_request)
        ordered = sorted(candidate_replicas, key=lambda r: (loads[r.replica_id], self._sent[r.replica_id]))
        least = loads[ordered[0].replica_id]
        by_id = {r.replica_id: r for r in candidate_replicas}
        ranks = [[r] for r in ordered]
        for key in self._keys(pending_request):
            warm = by_id.get(self._owner.get(key))  # type: ignore[arg-type]
            if warm is not None and loads[warm.replica_id] - least <= self.affinity_slack:
                ranks = [[warm], *([r] for r in ordered if r is not warm)]
                break
        if pending_request is not None:
            self._choosing[pending_request.metadata.internal_request_id] = ranks[0][0].replica_id
        return ranks

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        request_id = pending_request.metadata.internal_request_id
        self._choosing.pop(request_id, None)
        self._in_flight[replica_id] += 1
        self._sent[replica_id] += 1
        self._requests[request_id] = replica_id
        for key in self._keys(pending_request):
            self._owner[key] = replica_id
            self._owner.move_to_end(key)
        while len(self._owner) > MAX_REMEMBERED_KEYS:
            self._owner.popitem(last=False)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if self._requests.pop(internal_request_id, None) is not None and self._in_flight[replica_id] > 0:
            self._in_flight[replica_id] -= 1

    def _forget(self, replica_id: ReplicaID) -> None:
        self._in_flight.pop(replica_id, None)
        self._sent.pop(replica_id, None)
        for key in [k for k, v in self._owner.items() if v == replica_id]:
            del self._owner[key]
        for table in (self._requests, self._choosing):
            for request_id in [k for k, v in table.items() if v == replica_id]:
                del table[request_id]

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        alive = {r.replica_id for r in replicas}
        for gone in [rid for rid in self._sent if rid not in alive]:
            self._forget(gone)
