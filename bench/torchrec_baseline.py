"""TorchRec-on-CPU baseline for the trainer benchmark (issue 4).

    python bench/torchrec_baseline.py [--quick] [--events N] [--batch-size B]

Prints progress to stderr and one JSON object as the last line of stdout: the dict that
``torchrec_events_per_s`` returns (``bench/train.py`` imports and calls that function).

What is measured: training events per second of TorchRec's DLRM-like model on CPU over
the same synthetic Criteo-like stream our trainer sees (``SyntheticSource`` with 26
sparse fields, 13 dense, dim 16, a 10M-id universe; newcomer ids above 10M appear as
the stream renews slots), in batches of 4096:

* sparse side: one ``MCHManagedCollisionModule`` per field (managed-collision /
  zero-collision hashing, LFU eviction policy, eviction interval 1: every batch's new ids
  get their own row before the lookup, as our store creates a row on first lookup), in
  a ``ManagedCollisionCollection``, feeding a ``FusedEmbeddingBagCollection`` (FBGEMM
  table-batched embedding bags on the host, mean pooling) whose row-wise AdaGrad
  (``torchrec.optim.RowWiseAdagrad``, lr 0.05, applied inside backward) mirrors our
  store's sparse optimizer. Composing the two by hand is what
  ``ManagedCollisionEmbeddingBagCollection`` does; that class only accepts a plain
  ``EmbeddingBagCollection`` (no fused optimizer) and its eviction hook is a no-op off
  a sharded model.
* model size: each field's table has exactly as many rows as distinct ids the run feeds
  that field, plus the managed-collision module's one miss row: the rows our store would
  hold after the same events (it keeps only the ids it has seen). The counts are in
  ``tables``; nothing is evicted.
* dense side: our own ``trainer.model.DLRM`` (bottom MLP 13-64-32-16, pairwise dot
  interactions of the 27 vectors, top MLP 367-128-64-1) on the pooled embeddings,
  ``torch.optim.Adam`` (lr 1e-3, the trainer's default), ``BCEWithLogitsLoss``.

Timing: the events are generated and turned into ``KeyedJaggedTensor`` batches before
the clock starts; a few warm-up batches run untimed; then only forward (remap +
lookup + MLPs), backward (with the fused sparse update) and the Adam step are timed.
Our trainer's figure also pays for decoding and the store, so this is the upper bound
of a TorchRec pipeline on this machine, not an end-to-end figure.

TorchRec is an optional bench dependency, never needed by ``make test``. FBGEMM's
compiled ops must match the torch they load into, and neither ``fbgemm-gpu-cpu`` 1.8.0
nor 1.9.0 loads into the project's torch 2.15, so ``bench/install_torchrec.sh`` builds a
separate virtualenv (torch 2.13.0 + ``fbgemm-gpu-cpu==1.8.0`` + ``torchrec==1.8.0``, the
last two with ``--no-deps``). When torchrec cannot be imported in-process and that
virtualenv exists (``STREAMREC_TORCHREC_PYTHON``, default
``~/.cache/streamrec/torchrec-venv/bin/python``), ``torchrec_events_per_s`` runs this
file under it and returns the child's dict; otherwise it raises ``TorchRecUnavailable``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
INSTALL_COMMAND = "bash bench/install_torchrec.sh"
DEFAULT_PYTHON = Path.home() / ".cache" / "streamrec" / "torchrec-venv" / "bin" / "python"
SPARSE_LR = 0.05  # our store's row-wise AdaGrad
DENSE_LR = 1e-3  # TrainerConfig.dense_learning_rate's default
WARMUP_BATCHES = 3
QUICK_EVENTS = 4 * 4096
# SyntheticSource draws one permutation of the universe per field up front (26 x 10M
# int64: about a minute on a busy 2-core machine), so --quick also shrinks the universe.
QUICK_UNIVERSE = 1_000_000
FULL_EVENTS = 40 * 4096


class TorchRecUnavailable(RuntimeError):
    """torchrec or fbgemm_gpu cannot be imported here, nor is the bench virtualenv set up."""


def log(msg: str) -> None:
    print(f"[bench/torchrec] {msg}", file=sys.stderr, flush=True)


def torchrec_python() -> Path:
    """The interpreter of the separate virtualenv that ``install_torchrec.sh`` builds."""
    return Path(os.environ.get("STREAMREC_TORCHREC_PYTHON", str(DEFAULT_PYTHON))).expanduser()


def _import_error() -> str | None:
    """None when torchrec and fbgemm_gpu import in this interpreter, else why not."""
    try:
        import fbgemm_gpu  # type: ignore[import-not-found]  # noqa: F401
        import torchrec  # type: ignore[import-not-found]  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: FBGEMM's ops built for another torch
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    return None


def torchrec_events_per_s(
    events: int,
    *,
    batch_size: int = 4096,
    num_sparse: int = 26,
    num_dense: int = 13,
    dim: int = 16,
    universe: int = 10_000_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Train TorchRec's DLRM-like model on CPU over `events` synthetic events; return
    ``{"events_per_s": float, "torchrec_version": str, "fbgemm_gpu_version": str,
    "tables": ..., "note": str, ...}`` (see the module docstring for what is measured).

    Runs in-process when torchrec and fbgemm_gpu import here, else under the bench
    virtualenv's interpreter (``STREAMREC_TORCHREC_PYTHON``). Raises
    ``TorchRecUnavailable`` with the install command when neither works.
    """
    if events < batch_size:
        raise ValueError(f"events ({events}) must be at least one batch ({batch_size})")
    kwargs: dict[str, int] = {
        "events": events,
        "batch_size": batch_size,
        "num_sparse": num_sparse,
        "num_dense": num_dense,
        "dim": dim,
        "universe": universe,
        "seed": seed,
    }
    error = _import_error()
    if error is None:
        return _run_in_process(**kwargs)
    python = torchrec_python()
    # Venv interpreters are symlinks to one base python: compare the prefixes instead.
    if not python.exists() or Path(sys.prefix).resolve() == python.parent.parent.resolve():
        where = "is this interpreter" if python.exists() else "does not exist"
        raise TorchRecUnavailable(
            f"torchrec/fbgemm_gpu cannot be imported in {sys.executable} ({error}) and "
            f"the bench virtualenv {python} {where}; install it with "
            f"`{INSTALL_COMMAND}` (torch 2.13.0 + fbgemm-gpu-cpu==1.8.0 + torchrec==1.8.0 "
            "in a separate venv), or point STREAMREC_TORCHREC_PYTHON at a python that has them"
        )
    return _run_in_venv(python, error, kwargs)


def _run_in_venv(python: Path, error: str, kwargs: dict[str, int]) -> dict[str, Any]:
    log(f"torchrec not importable here ({error}); running under {python}")
    cmd = [str(python), str(Path(__file__).resolve()), "--in-process"]
    for key, value in kwargs.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise TorchRecUnavailable(
            f"the torchrec bench under {python} failed (exit {proc.returncode}); rerun "
            f"`{INSTALL_COMMAND}` or see its stderr above"
        )
    result: dict[str, Any] = json.loads(lines[-1])
    result["runner"] = f"subprocess: {python}"
    return result


def _pregenerate(
    events: int,
    batch_size: int,
    num_sparse: int,
    num_dense: int,
    dim: int,
    universe: int,
    seed: int,
) -> tuple[list[tuple[Any, Any, Any]], list[int]]:
    """(KJT, dense, labels) batches of SyntheticSource events, and each field's distinct
    id count over them. Untimed."""
    import numpy as np
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # type: ignore[import-not-found]

    from streaming.sources.synthetic import SyntheticConfig, SyntheticSource

    config = SyntheticConfig(
        seed=seed,
        num_sparse=num_sparse,
        num_dense=num_dense,
        universe=universe,
        embedding_dim=dim,
        chunk_size=batch_size,
    )
    source = SyntheticSource(config, max_events=events)
    keys = config.sparse_names
    batches: list[tuple[Any, Any, Any]] = []
    seen: list[list[Any]] = [[] for _ in range(num_sparse)]
    for chunk in source.iter_chunks():
        if len(chunk) < batch_size:
            break  # whole batches only
        ids = chunk.ids  # (batch, fields): one id per field per event
        for f in range(num_sparse):
            seen[f].append(np.unique(ids[:, f]))
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=keys,
            values=torch.from_numpy(np.ascontiguousarray(ids.T).reshape(-1)),
            lengths=torch.ones(num_sparse * batch_size, dtype=torch.int32),
        )
        dense = torch.from_numpy(chunk.dense.astype(np.float32))
        labels = torch.from_numpy(chunk.labels.astype(np.float32))
        batches.append((kjt, dense, labels))
    distinct = [int(np.unique(np.concatenate(s)).shape[0]) for s in seen]
    return batches, distinct


def _run_in_process(
    *,
    events: int,
    batch_size: int,
    num_sparse: int,
    num_dense: int,
    dim: int,
    universe: int,
    seed: int,
) -> dict[str, Any]:
    import fbgemm_gpu
    import torch
    import torchrec
    from torchrec.modules.embedding_configs import (  # type: ignore[import-not-found]
        EmbeddingBagConfig,
        PoolingType,
    )
    from torchrec.modules.fused_embedding_modules import (  # type: ignore[import-not-found]
        FusedEmbeddingBagCollection,
    )
    from torchrec.modules.mc_modules import (  # type: ignore[import-not-found]
        LFU_EvictionPolicy,
        ManagedCollisionCollection,
        MCHManagedCollisionModule,
    )
    from torchrec.optim import RowWiseAdagrad  # type: ignore[import-not-found]

    from trainer.model import DLRM

    torch.manual_seed(seed)
    warmup = WARMUP_BATCHES
    total = events + warmup * batch_size
    log(f"generating {total} events ({warmup} warm-up batches of {batch_size}), untimed")
    t0 = time.perf_counter()
    batches, distinct = _pregenerate(total, batch_size, num_sparse, num_dense, dim, universe, seed)
    gen_s = time.perf_counter() - t0
    if len(batches) <= warmup:
        raise ValueError(f"events ({events}) give no timed batch of {batch_size}")
    device = torch.device("cpu")
    names = [f"c{k + 1}" for k in range(num_sparse)]
    # +1: the managed-collision module maps ids it has no slot for to its last row.
    rows = [n + 1 for n in distinct]
    tables = [
        EmbeddingBagConfig(
            name=f"t_{name}",
            embedding_dim=dim,
            num_embeddings=r,
            feature_names=[name],
            pooling=PoolingType.MEAN,
        )
        for name, r in zip(names, rows, strict=True)
    ]
    mcc = ManagedCollisionCollection(
        managed_collision_modules={
            t.name: MCHManagedCollisionModule(
                zch_size=t.num_embeddings,
                device=device,
                eviction_policy=LFU_EvictionPolicy(),
                eviction_interval=1,
            )
            for t in tables
        },
        embedding_configs=tables,
    )
    ebc = FusedEmbeddingBagCollection(
        tables=tables,
        optimizer_type=RowWiseAdagrad,
        optimizer_kwargs={"lr": SPARSE_LR},
        device=device,
    )
    dlrm = DLRM(_spec(num_sparse, num_dense, dim))
    adam = torch.optim.Adam(dlrm.parameters(), lr=DENSE_LR)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    mcc.train()
    ebc.train()
    dlrm.train()

    remap_seconds = [0.0]

    def step(kjt: Any, dense: Any, labels: Any) -> float:
        t = time.perf_counter()
        remapped = mcc(kjt)
        remap_seconds[0] += time.perf_counter() - t
        pooled = ebc(remapped).values().view(-1, num_sparse, dim)
        loss = loss_fn(dlrm(dense, pooled), labels)
        adam.zero_grad(set_to_none=True)
        loss.backward()  # the row-wise AdaGrad update of the touched rows runs in here
        adam.step()
        return float(loss.detach())

    for kjt, dense, labels in batches[:warmup]:
        step(kjt, dense, labels)
    remap_seconds[0] = 0.0
    timed = batches[warmup:]
    log(f"training {len(timed)} timed batches on {torch.get_num_threads()} threads")
    losses: list[float] = []
    t0 = time.perf_counter()
    for kjt, dense, labels in timed:
        losses.append(step(kjt, dense, labels))
    seconds = time.perf_counter() - t0
    timed_events = len(timed) * batch_size

    embedding_bytes = sum(r * dim * 4 for r in rows)
    adagrad_bytes = sum(r * 4 for r in rows)  # one fp32 accumulator per row
    filled = sum(
        int((m._mch_sorted_raw_ids != torch.iinfo(torch.int64).max).sum())
        for m in mcc._managed_collision_modules.values()
    )
    mc_bytes = sum(b.numel() * b.element_size() for b in mcc.buffers())
    dense_bytes = sum(p.numel() * p.element_size() for p in dlrm.parameters())
    head = max(1, len(losses) // 10)
    return {
        "events_per_s": timed_events / seconds,
        "events": timed_events,
        "seconds": seconds,
        # Of `seconds`, the managed-collision remap (profile + admit new ids + remap);
        # the second rate is the embedding + MLP work alone, as with a static id space.
        "remap_seconds": remap_seconds[0],
        "events_per_s_excluding_remap": timed_events / max(seconds - remap_seconds[0], 1e-9),
        "batches": len(timed),
        "batch_size": batch_size,
        "warmup_batches": warmup,
        "generation_s": gen_s,
        "torchrec_version": str(getattr(torchrec, "__version__", "unknown")),
        "fbgemm_gpu_version": str(getattr(fbgemm_gpu, "__version__", "unknown")),
        "torch_version": str(torch.__version__),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_1m_after": os.getloadavg()[0],  # other work on the machine skews the figure
        "tables": {
            "count": len(tables),
            "dim": dim,
            "rows_per_table": rows,
            "total_rows": sum(rows),
            "rows_holding_an_id": filled,
            "sizing": "distinct ids the run feeds each field + 1 managed-collision miss row",
            "embedding_bytes": embedding_bytes,
            "rowwise_adagrad_bytes": adagrad_bytes,
            "managed_collision_bytes": mc_bytes,
        },
        "dense_param_bytes": dense_bytes,
        "loss_first_10pct": sum(losses[:head]) / head,
        "loss_last_10pct": sum(losses[-head:]) / head,
        "workload": {
            "source": "streaming.sources.synthetic.SyntheticSource",
            "num_sparse": num_sparse,
            "num_dense": num_dense,
            "universe": universe,
            "seed": seed,
        },
        "note": (
            "TorchRec 1.8 on CPU: MCHManagedCollisionModule per field (LFU, eviction "
            "interval 1) -> FusedEmbeddingBagCollection (FBGEMM host TBE, mean pooling, "
            f"fused row-wise AdaGrad lr {SPARSE_LR}) -> trainer.model.DLRM (Adam lr "
            f"{DENSE_LR}), BCE loss; tables sized to the distinct ids of the run (+1 miss "
            "row each), as our store keeps only seen ids. Events pre-generated from "
            "SyntheticSource and converted to KeyedJaggedTensors before timing; "
            f"{warmup} warm-up batches untimed; only forward/backward/optimizer steps "
            "are timed (no decoding, no store, no Kafka). remap_seconds is the "
            "managed-collision share (with eviction interval 1 it re-sorts every "
            "table's id buffer each batch); events_per_s_excluding_remap leaves it out."
        ),
    }


def _spec(num_sparse: int, num_dense: int, dim: int) -> Any:
    from streaming.spec import FeatureSpec, SparseFeature

    return FeatureSpec(
        sparse=[
            SparseFeature(name=f"c{k + 1}", kind="categorical", dim=dim, pooling="mean")
            for k in range(num_sparse)
        ],
        dense=[f"i{k + 1}" for k in range(num_dense)],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_EVENTS} events over a {QUICK_UNIVERSE}-id universe (a smoke run)",
    )
    parser.add_argument("--events", type=int, default=None, help=f"default {FULL_EVENTS}")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--num-sparse", type=int, default=26)
    parser.add_argument("--num-dense", type=int, default=13)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--universe", type=int, default=None, help="default 10000000")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    events = args.events or (QUICK_EVENTS if args.quick else FULL_EVENTS)
    kwargs: dict[str, int] = {
        "events": events,
        "batch_size": args.batch_size,
        "num_sparse": args.num_sparse,
        "num_dense": args.num_dense,
        "dim": args.dim,
        "universe": args.universe or (QUICK_UNIVERSE if args.quick else 10_000_000),
        "seed": args.seed,
    }
    try:
        run = _run_in_process if args.in_process else torchrec_events_per_s
        result = run(**kwargs)
    except TorchRecUnavailable as exc:
        log(str(exc))
        raise SystemExit(2) from exc
    print(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # this checkout's packages, not an installed copy
    main()
