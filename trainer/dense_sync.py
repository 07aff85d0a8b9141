"""Dense weights kept consistent across trainers by periodic model averaging.

Scale-out trainers share the sparse rows (the Redis hot tier) but each holds its own
copy of the dense network. Every ``every_s`` seconds each trainer publishes its dense
parameters to the store under its member name, reads the other members' latest
copies and replaces its own with the average of all fresh ones (those published
within ``stale_after_s``, default 3 rounds and at least 10 s, so a departed trainer
stops counting). This is periodic
model averaging (local SGD): between rounds the copies drift by at most
``every_s`` seconds of local steps, and each round pulls them back together. Adam's
moment estimates stay local; only the weights are averaged.

The member list is one JSON blob of {member: last publish time}; two members writing
it in the same instant may drop one entry, which that member restores on its next
round.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import time
import uuid

import torch
from prometheus_client import Counter, Gauge

from storage.base import EmbeddingStore

log = logging.getLogger(__name__)

ROUNDS = Counter("streamrec_trainer_dense_sync_rounds_total", "Dense averaging rounds.")
MEMBERS = Gauge(
    "streamrec_trainer_dense_sync_members", "Trainers averaged in the last dense sync round."
)
DRIFT = Gauge(
    "streamrec_trainer_dense_sync_drift",
    "Relative L2 distance of this trainer's dense weights from the average, last round.",
)


def member_name() -> str:
    """A name unique to this trainer process."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class DenseSync:
    def __init__(
        self,
        store: EmbeddingStore,
        model: torch.nn.Module,
        *,
        model_name: str,
        member: str,
        every_s: float,
        stale_after_s: float | None = None,
    ) -> None:
        self.store = store
        self.model = model
        self.member = member
        self.every_s = every_s
        self.stale_after_s = stale_after_s if stale_after_s is not None else max(3 * every_s, 10)
        self._prefix = f"trainer/{model_name}/dense-sync"
        self._next = time.monotonic() + every_s

    def _blob(self, member: str) -> str:
        return f"{self._prefix}/{member}"

    def maybe_sync(self, now: float) -> None:
        if now >= self._next:
            self.sync()
            self._next = now + self.every_s

    def sync(self) -> int:
        """One round: publish, average the fresh copies, load the average. Returns how
        many members were averaged."""
        own = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        buffer = io.BytesIO()
        torch.save(own, buffer)
        self.store.put_blob(self._blob(self.member), buffer.getvalue())
        now = time.time()
        raw = self.store.get_blob(f"{self._prefix}/members")
        members: dict[str, float] = json.loads(raw) if raw else {}
        members[self.member] = now
        fresh = {m: t for m, t in members.items() if now - t <= self.stale_after_s}
        for gone in set(members) - set(fresh):
            self.store.delete_blob(self._blob(gone))
        self.store.put_blob(f"{self._prefix}/members", json.dumps(fresh).encode())
        total = {k: v.double() for k, v in own.items() if v.is_floating_point()}
        count = 1
        for other in fresh:
            if other == self.member:
                continue
            data = self.store.get_blob(self._blob(other))
            if data is None:
                continue
            state = torch.load(io.BytesIO(data), weights_only=True)
            if state.keys() != own.keys():
                log.warning("dense sync: member %s has another architecture; skipped", other)
                continue
            for k in total:
                total[k] += state[k].double()
            count += 1
        if count > 1:
            average = {k: (v / count).to(own[k].dtype) for k, v in total.items()}
            num = sum(float((own[k].double() - average[k].double()).norm() ** 2) for k in average)
            den = sum(float(average[k].double().norm() ** 2) for k in average)
            DRIFT.set((num / den) ** 0.5 if den else 0.0)
            self.model.load_state_dict({**own, **average})
        ROUNDS.inc()
        MEMBERS.set(count)
        return count

    def leave(self) -> None:
        """Publish a last copy; the others keep averaging it until it goes stale."""
        self.sync()
