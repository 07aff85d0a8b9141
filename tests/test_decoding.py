"""The trainer's decoder on its own: worker processes, forgotten batches, and workers that
cannot start. (`tests/test_trainer.py` checks that training with workers, also killed
ones, learns exactly what decoding in the trainer's thread does.)"""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest

from streaming.log import Record
from streaming.sources.synthetic import SyntheticConfig, SyntheticSource
from trainer.decoding import Decoder, decode_chunk

SOURCE = SyntheticSource(SyntheticConfig(num_sparse=4, num_dense=2, universe=100), 300)
RECORDS = [Record("t", 0, i, event.to_json()) for i, event in enumerate(SOURCE)]


def test_answers_of_forgotten_batches_are_dropped() -> None:
    """After ``clear`` (a rebalance or a rewind) the next batch taken is the next one
    submitted, not an answer still on its way for a forgotten one."""
    decoder = Decoder(SOURCE.spec, 1)
    try:
        decoder.start()
        decoder.submit(RECORDS[:100])
        decoder.submit(RECORDS[100:200])
        decoder.clear()
        assert decoder.take(None) is None and decoder.records == 0
        decoder.submit(RECORDS[200:])
        taken = decoder.take(None)
        assert taken is not None
        records, chunk = taken
        expected = decode_chunk([r.value for r in RECORDS[200:]], SOURCE.spec)
        assert records == RECORDS[200:]
        assert np.array_equal(chunk.labels, expected.labels)
        for name, field in expected.encoded.fields.items():
            assert np.array_equal(chunk.encoded.fields[name].keys, field.keys)
    finally:
        decoder.close()
    assert decoder.worker_pids() == []


def test_workers_that_cannot_start_leave_decoding_to_the_trainer(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sys, "executable", "/bin/false")  # exits at once
    decoder = Decoder(SOURCE.spec, 2)
    with caplog.at_level(logging.WARNING, logger="trainer.decoding"):
        decoder.start()
    assert decoder.workers == 0
    assert "decode workers cannot start" in caplog.text
    decoder.feed(RECORDS[:50])
    decoder.feed(RECORDS[50:100])
    decoder.submit(RECORDS[:100])
    taken = decoder.take(0.0)
    assert taken is not None and taken[1].size == 100
