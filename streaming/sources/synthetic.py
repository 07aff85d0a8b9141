"""A Criteo-like synthetic click stream with a known ground truth.

Each event has ``num_sparse`` categorical fields ``c1..cN`` and ``num_dense``
float fields ``i1..iM``. Per field, ids are drawn from a Zipf law over
``universe`` popularity ranks; a rank maps to a *slot*, and a slot to the id
that currently occupies it:

* popularity drift: the rank -> slot permutation evolves by random swaps of two
  ranks up to ``drift_span`` apart as a factor (the first rank log-uniform, so
  every octave of ranks reshuffles at the same rate: the few head ids trade
  places often, the many tail ids rarely), so ids slowly rise and fall;
* new ids: every slot is periodically handed to a never-seen id (``id = slot +
  universe * generation``), at ``new_id_rate`` of the universe per million
  events, spread evenly over time and over the popularity ranks. Ids below
  ``universe`` are the ones alive at the start; larger ids are newcomers.

Labels come from a hidden logistic model, so the task is learnable and the best
achievable AUC is known (``SyntheticSource.best_auc``)::

    logit = bias + sum_f s_f * pop(rank_f) * w_f(id_f)   # per-id main effects
                 + sum_(a,b) <v_a(id_a), v_b(id_b)>       # low-rank interactions
                 + <u, dense>                             # linear dense term
    label ~ Bernoulli(sigmoid(logit))

Per-id weights ``w`` and latent vectors ``v`` are a pure function of (seed,
field, id) through a 64-bit hash, so no tables are stored and newcomers get
weights too. ``s_f`` shrinks geometrically with the field number (as in Criteo,
a few fields carry most of the signal). ``pop(rank) = (1 + rank /
weight_head) ^ -weight_tail_decay`` makes effects strongest on popular ids: the
tail is mostly noise around the field mean, as it is for any model fit on
finite data. Without it, Zipf(1.1) over 100k ids leaves a quarter of the
traffic on ids seen too rarely to learn, and no learner gets near the "best"
AUC. Because ``pop`` reads the id's current rank, an id's effect strengthens as
it rises, and the best AUC stays level over time (about 0.80-0.83 with the
defaults) instead of decaying as drift mixes the ranks.

Generation is vectorised in chunks of ``chunk_size`` events and deterministic
for a given config (the chunk size is part of it: drift is applied between
chunks); a stream capped at ``max_events`` is a prefix of the endless one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, model_validator

from streaming.auc import roc_auc
from streaming.events import Event, SparseValue
from streaming.sources.base import EventSource, check_max_events
from streaming.spec import FeatureSpec, SparseFeature

_U64 = np.uint64
_MASK32 = np.uint64(0xFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# Salt components, so main weights, latent vectors and slot phases never share a hash.
_COMP_MAIN = 0
_COMP_PHASE = 1
_COMP_LATENT = 16


class SyntheticConfig(BaseModel):
    """Knobs of the synthetic stream. The defaults give a Criteo-shaped task with a
    best AUC around 0.80-0.83 and a mean CTR of 0.2-0.3 (it wanders with the
    weights of whichever ids are on top, so it varies by seed and over time)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(default=0, ge=0, description="Seeds the event draws and the hidden model.")
    num_sparse: int = Field(default=26, ge=1, le=1000, description="Categorical fields c1..cN.")
    num_dense: int = Field(default=13, ge=0, le=1000, description="Float fields i1..iM.")
    universe: int = Field(default=100_000, ge=2, le=2**31 - 1, description="Live ids per field.")
    zipf_exponent: float = Field(default=1.1, gt=0.0, le=5.0, description="Popularity ~ rank^-s.")
    embedding_dim: int = Field(
        default=16, ge=1, le=1024, description="dim of every field in the spec."
    )
    new_id_rate: float = Field(
        default=0.1,
        ge=0.0,
        description="Fraction of each field's live ids replaced by never-seen ids per 1M events.",
    )
    drift_rate: float = Field(
        default=1.0, ge=0.0, description="Popularity swaps per field per 1000 events."
    )
    drift_span: float = Field(
        default=4.0, ge=1.0, description="A swap exchanges ranks up to this factor apart."
    )
    events_per_second: float = Field(
        default=1000.0, gt=0.0, description="Simulated event rate (ts)."
    )
    start_ts_ms: int = Field(default=1_700_000_000_000, ge=0, description="ts of the first event.")
    chunk_size: int = Field(
        default=4096, ge=1, le=1 << 20, description="Events generated per batch."
    )
    target_ctr: float = Field(default=0.25, gt=0.0, lt=1.0, description="Approximate mean label.")
    main_effect_std: float = Field(
        default=1.5, ge=0.0, description="Std of the summed per-id terms."
    )
    field_decay: float = Field(
        default=0.8,
        gt=0.0,
        le=1.0,
        description="Field k's share of the main-effect variance ~ decay^k (few fields matter).",
    )
    weight_head: int = Field(
        default=100,
        ge=1,
        description="Ids ranked past this carry progressively weaker effects.",
    )
    weight_tail_decay: float = Field(
        default=1.0,
        ge=0.0,
        description="Per-id effect std ~ (1 + rank / weight_head) ^ -decay (0: all ids alike).",
    )
    interaction_pairs: list[tuple[int, int]] = Field(
        default_factory=lambda: [(1, 2), (3, 4)],
        description="1-based field numbers whose latent vectors interact (c1 x c2, c3 x c4).",
    )
    latent_dim: int = Field(default=8, ge=1, le=256)
    interaction_std: float = Field(
        default=0.3, ge=0.0, description="Std of the summed interactions."
    )
    dense_std: float = Field(default=0.4, ge=0.0, description="Std of the dense linear term.")

    @model_validator(mode="after")
    def _pairs_in_range(self) -> SyntheticConfig:
        for a, b in self.interaction_pairs:
            if not (1 <= a <= self.num_sparse and 1 <= b <= self.num_sparse) or a == b:
                raise ValueError(
                    f"interaction pair {(a, b)} must name two different fields in "
                    f"1..{self.num_sparse}"
                )
        return self

    @property
    def sparse_names(self) -> list[str]:
        return [f"c{k + 1}" for k in range(self.num_sparse)]

    @property
    def dense_names(self) -> list[str]:
        return [f"i{k + 1}" for k in range(self.num_dense)]

    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(
            sparse=[
                SparseFeature(name=n, kind="categorical", dim=self.embedding_dim, pooling="mean")
                for n in self.sparse_names
            ],
            dense=self.dense_names,
        )


@dataclass(frozen=True, slots=True)
class SyntheticChunk:
    """One generated batch as arrays (the fast path: no Event objects).

    Row ``i`` is the event with stream index ``start + i``.
    """

    start: int
    ids: NDArray[np.int64]  # (n, num_sparse) feature ids
    ranks: NDArray[np.int64]  # (n, num_sparse) popularity rank each id was drawn at
    dense: NDArray[np.float64]  # (n, num_dense), rounded to 4 decimals
    labels: NDArray[np.int8]  # (n,)
    probs: NDArray[np.float64]  # (n,) true click probability
    ts: NDArray[np.int64]  # (n,) epoch ms

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _mix64(x: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """splitmix64 finaliser: a fast, well-spread bijection on uint64 (wraps on overflow)."""
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def _salt(seed: int, field: int, component: int) -> np.uint64:
    key = np.array(
        [(seed * 0x100000001B3 + field * 0x10001 + component * 0x9E37) & 0xFFFFFFFFFFFFFFFF],
        dtype=np.uint64,
    )
    return _U64(_mix64(key * _GOLDEN)[0])


def _hash_normal(ids: NDArray[np.int64], salt: NDArray[np.uint64]) -> NDArray[np.float64]:
    """N(0, 1) draws that are a pure function of (id, salt); shapes broadcast."""
    h = _mix64(ids.astype(np.uint64) * _GOLDEN + salt)
    # Box-Muller from the two 32-bit halves; +0.5 keeps u1 away from 0.
    u1 = ((h >> _U64(32)).astype(np.float64) + 0.5) * (1.0 / 4294967296.0)
    u2 = ((h & _MASK32).astype(np.float64) + 0.5) * (1.0 / 4294967296.0)
    out: NDArray[np.float64] = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)
    return out


def _hash_uniform(ids: NDArray[np.int64], salt: NDArray[np.uint64]) -> NDArray[np.float64]:
    h = _mix64(ids.astype(np.uint64) * _GOLDEN + salt)
    out: NDArray[np.float64] = (h >> _U64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)
    return out


class SyntheticSource(EventSource):
    """An endless (or ``max_events``-long) deterministic synthetic stream.

    ``iter(source)`` yields ``Event``s; ``iter_with_truth()`` pairs each with its
    true click probability; ``iter_chunks()`` is the array fast path. Every
    iteration restarts from event 0 and yields the same stream.
    """

    name = "synthetic"

    def __init__(self, config: SyntheticConfig | None = None, max_events: int | None = None):
        self.config = config if config is not None else SyntheticConfig()
        self.max_events = check_max_events(max_events)
        self.spec = self.config.feature_spec()
        cfg = self.config
        nf = cfg.num_sparse
        fields = range(nf)
        self._main_salt = np.array([_salt(cfg.seed, f, _COMP_MAIN) for f in fields], np.uint64)
        self._phase_salt = np.array([_salt(cfg.seed, f, _COMP_PHASE) for f in fields], np.uint64)
        # Field k carries decay^k of the main-effect variance (Criteo-like: few fields matter).
        shares = cfg.field_decay ** np.arange(nf, dtype=np.float64)
        self._field_std = cfg.main_effect_std * np.sqrt(shares / shares.sum())
        # Latent salts: (pair, side, latent_dim); a field in two pairs gets distinct vectors.
        npairs = len(cfg.interaction_pairs)
        self._pair_fields = np.array(cfg.interaction_pairs, dtype=np.int64).reshape(npairs, 2) - 1
        self._latent_salt = np.array(
            [
                [
                    [
                        _salt(cfg.seed, int(f), _COMP_LATENT + (2 * p + side) * cfg.latent_dim + j)
                        for j in range(cfg.latent_dim)
                    ]
                    for side, f in enumerate(self._pair_fields[p])
                ]
                for p in range(npairs)
            ],
            dtype=np.uint64,
        ).reshape(npairs, 2, cfg.latent_dim)
        # Each dot product of two N(0,1)^k vectors has variance k.
        self._pair_scale = cfg.interaction_std / math.sqrt(max(npairs, 1) * cfg.latent_dim)
        model_rng = np.random.default_rng([cfg.seed, 1])
        dense_w = model_rng.standard_normal(cfg.num_dense)
        norm = float(np.linalg.norm(dense_w))
        self._dense_w = dense_w * (cfg.dense_std / norm) if norm > 0 else dense_w
        # Probit approximation E[sigmoid(b + sZ)] ~ sigmoid(b / sqrt(1 + pi s^2 / 8)),
        # so the mean label lands near target_ctr without a calibration pass.
        var = cfg.main_effect_std**2 + (cfg.interaction_std**2 if npairs else 0.0)
        var += cfg.dense_std**2 if cfg.num_dense else 0.0
        target = math.log(cfg.target_ctr / (1.0 - cfg.target_ctr))
        self._bias = target * math.sqrt(1.0 + math.pi * var / 8.0)
        ranks = np.arange(1, cfg.universe + 1, dtype=np.float64)
        pdf = ranks ** (-cfg.zipf_exponent)
        self._cdf = np.cumsum(pdf / pdf.sum())
        self._cdf[-1] = 1.0  # guard the float sum, so searchsorted never returns universe
        # Effect strength by current popularity rank, normalised so the traffic-weighted
        # variance of the main effects stays main_effect_std^2.
        damp = (1.0 + np.arange(cfg.universe) / cfg.weight_head) ** (-cfg.weight_tail_decay)
        self._rank_scale = damp / math.sqrt(float(np.dot(self.rank_probabilities(), damp**2)))
        self._sparse_names = cfg.sparse_names
        self._dense_names = cfg.dense_names

    @property
    def total(self) -> int | None:
        return self.max_events

    @property
    def bias(self) -> float:
        return self._bias

    def rank_probabilities(self) -> NDArray[np.float64]:
        """The Zipf traffic share of each popularity rank (sums to 1)."""
        return np.diff(self._cdf, prepend=0.0)

    def true_logit(
        self, ids: NDArray[np.int64], ranks: NDArray[np.int64], dense: NDArray[np.float64]
    ) -> NDArray[np.float64]:
        """The hidden model's logit for rows of ``ids`` and their popularity ``ranks``
        (both (n, num_sparse)) and ``dense`` (n, num_dense). Pure: the same inputs
        give the same logit at any time; only ranks change as popularity drifts."""
        cfg = self.config
        logit = np.full(ids.shape[0], self._bias)
        main = _hash_normal(ids, self._main_salt[None, :]) * self._field_std
        main *= self._rank_scale[ranks]
        logit += main.sum(axis=1)
        for p in range(self._pair_fields.shape[0]):
            fa, fb = self._pair_fields[p]
            va = _hash_normal(ids[:, fa, None], self._latent_salt[p, 0][None, :])
            vb = _hash_normal(ids[:, fb, None], self._latent_salt[p, 1][None, :])
            logit += self._pair_scale * np.einsum("nk,nk->n", va, vb)
        if cfg.num_dense:
            logit += dense @ self._dense_w
        return logit

    def iter_chunks(self) -> Iterator[SyntheticChunk]:
        """The stream as array chunks of ``chunk_size`` rows (the last may be short)."""
        cfg = self.config
        nf, universe = cfg.num_sparse, cfg.universe
        rng = np.random.default_rng([cfg.seed, 0])
        # rank -> slot, per field; starts random so ids carry no popularity order.
        perm = np.stack([rng.permutation(universe) for _ in range(nf)]).astype(np.int64)
        rows = np.arange(nf)[None, :]
        renew_per_event = cfg.new_id_rate / 1_000_000.0
        log_universe = math.log(universe)
        log_span = math.log(cfg.drift_span)
        ms_per_event = 1000.0 / cfg.events_per_second
        fields = np.arange(nf)
        swaps_done = 0
        start = 0
        while self.max_events is None or start < self.max_events:
            # Always draw a full chunk (and trim below) so a capped stream is an exact
            # prefix of the endless one.
            n = cfg.chunk_size
            # Drift first: swaps due by this chunk's start from a running count, so the
            # rate is exact over time whatever the chunk size.
            due = math.floor(cfg.drift_rate * start / 1000.0)
            for _ in range(due - swaps_done):
                a = np.exp(rng.random(nf) * log_universe).astype(np.int64) - 1
                b = ((a + 1) * np.exp(rng.uniform(-log_span, log_span, nf))).astype(np.int64)
                b = np.clip(b - 1, 0, universe - 1)
                perm[fields, a], perm[fields, b] = perm[fields, b], perm[fields, a]
            swaps_done = max(due, swaps_done)
            ranks = np.searchsorted(self._cdf, rng.random((n, nf)), side="right").astype(np.int64)
            ranks = np.minimum(ranks, universe - 1)
            slots = perm[rows, ranks]
            index = np.arange(start, start + n, dtype=np.int64)
            # Each slot turns over at a hash-derived phase, so renewals are spread out.
            phase = _hash_uniform(slots, self._phase_salt[None, :])
            generation = np.floor(index[:, None] * renew_per_event + phase).astype(np.int64)
            ids = slots + universe * generation
            dense = np.round(rng.standard_normal((n, cfg.num_dense)), 4)
            probs = 1.0 / (1.0 + np.exp(-self.true_logit(ids, ranks, dense)))
            labels = (rng.random(n) < probs).astype(np.int8)
            ts = cfg.start_ts_ms + np.floor(index * ms_per_event).astype(np.int64)
            keep = n if self.max_events is None else min(n, self.max_events - start)
            yield SyntheticChunk(
                start,
                ids[:keep],
                ranks[:keep],
                dense[:keep],
                labels[:keep],
                probs[:keep],
                ts[:keep],
            )
            start += n

    def iter_with_truth(self) -> Iterator[tuple[Event, float]]:
        """Each event with the true probability its label was drawn from."""
        names, dnames, seed = self._sparse_names, self._dense_names, self.config.seed
        for chunk in self.iter_chunks():
            # One tolist() per array is far cheaper than per-element numpy scalars.
            id_rows = chunk.ids.tolist()
            dense_rows = chunk.dense.tolist()
            labels = chunk.labels.tolist()
            probs = chunk.probs.tolist()
            ts = chunk.ts.tolist()
            for i in range(len(labels)):
                features: dict[str, SparseValue] = dict(zip(names, id_rows[i], strict=True))
                event = Event(
                    event_id=f"syn{seed}-{chunk.start + i}",
                    ts=ts[i],
                    label=labels[i],
                    features=features,
                    dense=dict(zip(dnames, dense_rows[i], strict=True)),
                )
                yield event, probs[i]

    def __iter__(self) -> Iterator[Event]:
        for event, _ in self.iter_with_truth():
            yield event

    def best_auc(self, start: int = 0, stop: int | None = None) -> float:
        """AUC of the true probabilities against the drawn labels over events
        ``[start, stop)``: the best any model can score on that stretch (up to
        sampling noise). ``stop`` defaults to ``max_events``; one of them must be set.
        """
        end = stop if stop is not None else self.max_events
        if end is None:
            raise ValueError("best_auc needs stop= on an endless stream (max_events=None)")
        labels, probs = [], []
        for chunk in self.iter_chunks():
            lo, hi = max(start - chunk.start, 0), min(end - chunk.start, len(chunk))
            if hi > lo:
                labels.append(chunk.labels[lo:hi])
                probs.append(chunk.probs[lo:hi])
            if chunk.start + len(chunk) >= end:
                break
        if not labels:
            return float("nan")
        return roc_auc(np.concatenate(labels), np.concatenate(probs))
