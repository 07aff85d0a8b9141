"""A/A benchmark of experiments with online training: does the split make two
identical models look identical?

    python bench/experiment.py [--quick] [--seed N]

Two arms with the *same* model and settings (an A/A test) should measure the same
quality; any gap beyond noise is what the experiment's setup adds to every real A/B
result. On the synthetic Criteo-like stream (26 fields, dim 16, batch 1024, unit
``c1``, ``--share`` of the units in each arm), every model scores each event before it
trains on it (progressive validation), and over the second half of the stream the
script compares:

* ``fair``: streamrec's experiment. Each arm's model learns from its own units'
  events only (what ``streamrec train --arm`` does, batches of ~1024 of them), so both
  learn from equal shares. Its gap (control minus treatment) is noise: the arms hold
  different units.
* ``unfair``: the setup Monolith's users asked about (their issue #28): the control is
  the production model, which learns from every event, scored on the control units;
  the treatment learns from its own units only, as it would when it serves only them.

``unfair_bias_*`` is the part of the unfair gap the setup adds: on the very same
control events, the production model's score minus the control arm's (paired).

Events of one unit are correlated (and the synthetic stream's units are as skewed as
real users: its busiest unit has ~8% of the events), so standard errors are bootstrap
ones over units (``--resamples``, resampling each arm's units with replacement), not
over events. The baseline (``unfair``) runs in the same process on the same events.
The last line of stdout is one JSON object: ``{fair,unfair}_{auc,logloss}_gap`` and
``unfair_bias_{auc,logloss}``, each with its ``_se``, and the per-setup details.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from storage.memory_tier import MemoryTier
from storage.tiered import TieredStore
from streaming.auc import roc_auc
from streaming.events import Event
from streaming.log import InMemoryLog
from streaming.sources.synthetic import SyntheticConfig, SyntheticSource
from streaming.spec import FeatureSpec
from streamrec.config import Settings
from streamrec.wiring import table_configs
from trainer.encoding import EncodedBatch, encode, select_examples
from trainer.experiment import ArmSplit, ExperimentConfig, arms_of_batch
from trainer.trainer import StreamingTrainer, TrainerConfig

BATCH = 1024
Floats = npt.NDArray[np.floating[Any]]


@dataclass
class Scores:
    """Labels, predictions made before training, and unit keys of scored events."""

    parts: list[tuple[Floats, Floats, npt.NDArray[np.uint64]]] = field(default_factory=list)

    def add(self, labels: Floats, preds: Floats, units: npt.NDArray[np.uint64]) -> None:
        self.parts.append((labels, preds.astype(np.float64), units))

    def joined(self) -> tuple[Floats, Floats, npt.NDArray[np.uint64]]:
        labels, preds, units = zip(*self.parts, strict=True)
        return np.concatenate(labels), np.concatenate(preds), np.concatenate(units)


def logloss(labels: Floats, preds: Floats) -> float:
    p = np.clip(preds, 1e-7, 1 - 1e-7)
    return float(np.mean(-(labels * np.log(p) + (1 - labels) * np.log(1 - p))))


METRICS: dict[str, Callable[[Floats, Floats], float]] = {"auc": roc_auc, "logloss": logloss}


def unit_resamples(units: npt.NDArray[np.uint64], count: int, seed: int) -> list[npt.NDArray[Any]]:
    """``count`` bootstrap resamples of the events, drawing whole units with replacement."""
    _, inverse = np.unique(units, return_inverse=True)
    n_units = int(inverse.max()) + 1
    rng = np.random.default_rng(seed)
    events = np.arange(len(units))
    out = []
    for _ in range(count):
        times = np.bincount(rng.integers(0, n_units, n_units), minlength=n_units)
        out.append(np.repeat(events, times[inverse]))  # each event as often as its unit
    return out


def gap(
    control: Scores, treatment: Scores, resamples: int, *, paired: bool = False
) -> dict[str, float]:
    """Control minus treatment per metric, with its unit-bootstrap standard error;
    ``paired``: the same events scored by two models (resampled together)."""
    yc, pc, uc = control.joined()
    yt, pt, ut = treatment.joined()
    c_draws = unit_resamples(uc, resamples, seed=1)
    t_draws = c_draws if paired else unit_resamples(ut, resamples, seed=2)
    out: dict[str, float] = {"control_events": len(yc), "treatment_events": len(yt)}
    for name, metric in METRICS.items():
        c, t = metric(yc, pc), metric(yt, pt)
        diffs = [
            metric(yc[a], pc[a]) - metric(yt[b], pt[b])
            for a, b in zip(c_draws, t_draws, strict=True)
        ]
        out[f"control_{name}"] = round(c, 4)
        out[f"treatment_{name}"] = round(t, 4)
        out[f"{name}_gap"] = round(c - t, 4)
        out[f"{name}_gap_se"] = round(float(np.std(diffs, ddof=1)), 4)
    return out


class Models:
    """The production model (every event) and the two arms' (their units' events)."""

    def __init__(self, spec: FeatureSpec, split: ArmSplit, seed: int, scored_from: int) -> None:
        self.spec, self.split, self.scored_from = spec, split, scored_from
        self.production = self._trainer(seed)
        self.arms = [self._trainer(seed), self._trainer(seed)]
        self.scores = {name: Scores() for name in ("production_on_control", "control", "treatment")}

    def _trainer(self, seed: int) -> StreamingTrainer:
        store = TieredStore(table_configs(self.spec, Settings()), MemoryTier())
        consumer = InMemoryLog().consumer("unused")  # batches go to train_step directly
        config = TrainerConfig(batch_size=BATCH, decode_workers=0, seed=seed)
        return StreamingTrainer(self.spec, store, consumer, config)

    def _encode(
        self, events: list[Event], first: int
    ) -> tuple[Floats, EncodedBatch, npt.NDArray[np.int8], npt.NDArray[np.bool_], Any]:
        labels = np.array([e.label for e in events], dtype=np.float32)
        encoded = encode([e.features for e in events], [e.dense for e in events], self.spec)
        unit = encoded.fields[self.split.unit]
        late = np.arange(first, first + len(events)) >= self.scored_from
        return labels, encoded, arms_of_batch(self.split, encoded), late, unit.keys

    def train_production(self, events: list[Event], first: int) -> None:
        """One step of the production model on ``events`` (the stream's from ``first``)."""
        labels, encoded, arms, late, units = self._encode(events, first)
        preds = self.production.train_step(labels, encoded)
        on_control = late & (arms == 0)
        self.scores["production_on_control"].add(
            labels[on_control], preds[on_control], units[on_control]
        )

    def train_arms(self, events: list[Event], first: int) -> None:
        """One step of each arm's model on its units' events among ``events``."""
        labels, encoded, arms, late, units = self._encode(events, first)
        for index, name in enumerate(("control", "treatment")):
            keep = arms == index
            if keep.any():
                preds = self.arms[index].train_step(labels[keep], select_examples(encoded, keep))
                self.scores[name].add(labels[keep & late], preds[late[keep]], units[keep & late])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (CI smoke test)")
    parser.add_argument("--events", type=int, help="events in the stream (default 400k)")
    parser.add_argument("--share", type=float, default=0.1, help="each arm's share of units")
    parser.add_argument("--resamples", type=int, default=200, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="the stream's and models' seed")
    args = parser.parse_args()
    events = args.events or (40_000 if args.quick else 400_000)

    source = SyntheticSource(SyntheticConfig(seed=args.seed), events)
    experiment = ExperimentConfig(
        name=f"aa-{args.seed}",
        unit="c1",
        arms={"control": {"share": args.share}, "treatment": {"share": args.share}},
    )
    models = Models(source.spec, experiment.split(), args.seed, scored_from=events // 2)
    # An arm's trainer reads batch_size / share records per batch (~1024 of its own).
    arm_batch = math.ceil(BATCH / args.share)
    started = last = time.monotonic()
    batch: list[Event] = []
    pending: list[Event] = []
    for seen, event in enumerate(source, start=1):
        batch.append(event)
        pending.append(event)
        if len(batch) == BATCH:
            models.train_production(batch, seen - len(batch))
            batch = []
        if len(pending) == arm_batch:
            models.train_arms(pending, seen - len(pending))
            pending = []
        now = time.monotonic()
        if now - last > 5:
            rate = seen / (now - started)
            eta = (events - seen) / rate
            print(f"{seen:,}/{events:,} events, {rate:,.0f}/s, ETA {eta:.0f} s", file=sys.stderr)
            last = now
    if batch:
        models.train_production(batch, events - len(batch))
    if pending:
        models.train_arms(pending, events - len(pending))
    trained_s = time.monotonic() - started

    scores = models.scores
    fair = gap(scores["control"], scores["treatment"], args.resamples)
    unfair = gap(scores["production_on_control"], scores["treatment"], args.resamples)
    bias = gap(scores["production_on_control"], scores["control"], args.resamples, paired=True)
    result: dict[str, Any] = {"events": events, "share": args.share, "seed": args.seed}
    for setup, figures in (("fair", fair), ("unfair", unfair)):
        for name in METRICS:
            result[f"{setup}_{name}_gap"] = figures[f"{name}_gap"]
            result[f"{setup}_{name}_gap_se"] = figures[f"{name}_gap_se"]
    for name in METRICS:
        result[f"unfair_bias_{name}"] = bias[f"{name}_gap"]
        result[f"unfair_bias_{name}_se"] = bias[f"{name}_gap_se"]
    result.update(
        fair=fair,
        unfair=unfair,
        train_s=round(trained_s, 1),
        seconds=round(time.monotonic() - started, 1),
        machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
