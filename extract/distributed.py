"""Extraction on dask.distributed: one task per shard, each worker owns the shards it writes.

``--workers N`` starts a local cluster (N processes, one thread each; on a GPU machine worker k
uses GPU k mod #GPUs); ``--scheduler ADDRESS`` joins a running cluster (e.g. one started by
dask-jobqueue on SLURM). A task opens the cache from its folder (the cache describes itself),
loads the backbones once per worker process, checks their weights fingerprints against the cache,
decodes and runs its shard, writes it, and returns the shard's status. A worker that dies takes
only its current shard with it; dask reruns that task elsewhere, and a whole-shard rewrite gives
the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tqdm import tqdm

from mettle.cache import CacheError, CacheMeta, CacheWriter, ShardStatus
from mettle.manifests import Manifest

from .config import ExtractConfig, load_backbones
from .shard import process_shard, submit_decodes

log = logging.getLogger(__name__)

_WORKER_MODELS: dict[tuple, Any] = {}  # per worker process: (options) -> forwards


def _worker_device(device: str) -> str:
    import torch

    if device != "auto" or not torch.cuda.is_available():
        return device
    try:
        from distributed import get_worker

        index = int(str(get_worker().name).rsplit("-", 1)[-1])
    except (ValueError, ImportError):
        index = 0
    return f"cuda:{index % torch.cuda.device_count()}"


def _forwards(cfg: ExtractConfig, writer: CacheWriter):
    from .run import make_forwards

    key = (cfg.backbones, cfg.visual_weights, cfg.audio_weights, cfg.random_init, cfg.device, cfg.precision,
           writer.meta.slug, str(writer.root))
    if key not in _WORKER_MODELS:
        _WORKER_MODELS.clear()
        backbones = load_backbones(cfg)
        for m, b in backbones.items():
            want = writer.meta.backbones[m].weights_id
            if b.weights_id != want:
                raise CacheError(f"this worker loaded {m} weights {b.weights_id[:16]}, the cache was started with "
                                 f"{want[:16]}. Fix: give every worker the same weights files")
        _WORKER_MODELS[key] = make_forwards(writer, backbones, _worker_device(cfg.device), cfg)
    return _WORKER_MODELS[key]


def extract_shard_task(cfg: ExtractConfig, shard: int) -> ShardStatus:
    """The unit of distributed work: extract and write one whole shard of ``cfg.cache``."""
    from pathlib import Path

    from mettle.cache.format import MANIFEST_FILE

    from .run import data_root_of

    root = Path(cfg.cache)
    meta = CacheMeta.load(root)
    manifest = Manifest.from_json((root / MANIFEST_FILE).read_text())
    writer = CacheWriter(root, meta)
    forwards = _forwards(cfg, writer)
    with ThreadPoolExecutor(max(1, cfg.decode_threads), thread_name_prefix="decode") as pool:
        root = data_root_of(cfg)
        backbones = {m: fw.backbone for m, fw in forwards.items()}
        decodes = submit_decodes(pool, manifest, root, meta.shard_rows(shard), backbones)
        buffer, status = process_shard(meta, manifest, shard, decodes, forwards, cfg.batch_size, cfg.on_error,
                                       data_root=root)
    _fault_point(writer, buffer, shard)
    return writer.write_shard(buffer, status)


def _fault_point(writer: CacheWriter, buffer, shard: int) -> None:
    """Fault injection for the reliability tests: ``METTLE_FAULT_KILL_SHARD=K:FLAGFILE`` makes the worker
    that writes shard K die half-way through writing it, once (the flag file records that it did)."""
    import os

    spec = os.environ.get("METTLE_FAULT_KILL_SHARD")
    if not spec:
        return
    target, _, flag = spec.partition(":")
    if int(target) != shard or os.path.exists(flag):
        return
    open(flag, "w").close()
    arrays = buffer.arrays()
    half = dict(list(arrays.items())[: len(arrays) // 2])
    writer.store.write_shard(shard, half)
    os._exit(17)


def task_key(writer: CacheWriter, shard: int) -> str:
    """The dask key of one shard's task. A scheduler runs one task per key: two extractions sharing a
    ``--scheduler`` must differ in key unless they write the same shard of the same cache (the folder,
    resolved, and the cache's identity: backbones, weights, budget, ...), or one gets the other's results."""
    ident = json.dumps([str(writer.root.resolve()), writer.meta.identity()], sort_keys=True)
    return f"mettle-extract-{writer.meta.slug}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}-shard-{shard}"


def run_distributed(cfg: ExtractConfig, writer: CacheWriter, todo: list[int], progress: bool) -> list[ShardStatus]:
    from distributed import Client, LocalCluster, as_completed

    if cfg.scheduler:
        client, cluster = Client(cfg.scheduler), None
    else:
        cluster = LocalCluster(n_workers=cfg.workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    statuses = []
    try:
        futures = [client.submit(extract_shard_task, cfg, k, key=task_key(writer, k), pure=False) for k in todo]
        bar = tqdm(total=len(todo), desc="extract", unit="shard", disable=not progress)
        try:
            for fut in as_completed(futures):
                statuses.append(fut.result())  # a failed task re-raises here (ExtractError names the clip)
                bar.update()
        except BaseException:
            client.cancel(futures)
            raise
        finally:
            bar.close()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return sorted(statuses, key=lambda s: s.shard)
