"""``extract(cfg)``: manifest -> backbones -> cache, resumable, local or on dask workers.

Local runs overlap the three stages: the next shard's clips are decoded (by worker processes
when the backbones run on a GPU, else by threads; see ``config.decode_processes_of``) and
preprocessed (threads) while the current one runs through the backbones, and a writer thread
writes the previous shard.
Distributed runs (``workers`` / ``scheduler``) hand whole shards to dask workers (see
``distributed.py``); either way the cache is the same, row for row.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mettle.cache import OK, CacheError, CacheMeta, CacheWriter, ShardStatus, create_cache, default_preset, plan_cache
from mettle.cache.format import META_FILE
from mettle.cache.runtime import resolve_device
from mettle.manifests import Manifest, build_manifest, get_dataset

from .config import ExtractConfig, decode_processes_of, graph_setting, graphs_of, load_backbones
from .media import DECODING, MASK_SIZE, MISSING
from .media.pool import MediaPool
from .shard import Putter, ShardInFlight, launch_shard, submit_decodes
from .tokens import TokenForward

log = logging.getLogger(__name__)


@dataclass
class ExtractSummary:
    cache: Path
    clips: int
    clips_ok: int
    failures: dict[str, str]
    shards_done_now: int
    shards_skipped: int
    bytes_written: int
    bytes_on_disk: int
    seconds: float
    profile: dict[str, Any]

    def lines(self) -> list[str]:
        out = [f"cache {self.cache}: {self.clips_ok} of {self.clips} clips ok, {len(self.failures)} failed; "
               f"{self.shards_done_now} shards written now, {self.shards_skipped} already done"]
        if self.shards_done_now:
            out.append(f"wrote {self.bytes_written / 1e6:.1f} MB in {self.seconds:.1f} s "
                       f"({self.profile.get('clips_per_second', 0):.2f} clips/s on {self.profile.get('device', '?')}); "
                       f"cache size on disk {self.bytes_on_disk / 1e6:.1f} MB")
        else:
            out.append(f"nothing left to extract (--overwrite starts again); size on disk {self.bytes_on_disk / 1e6:.1f} MB")
        return out + [f"failed {cid}: {why}" for cid, why in self.failures.items()]


def load_manifest_for(cfg: ExtractConfig) -> Manifest:
    """The dataset's manifest (``--data-root`` goes to builders that take it), cut to ``--limit``."""
    options = dict(cfg.manifest_options)
    if cfg.data_root is not None and "data_root" in get_dataset(cfg.dataset).options():
        options.setdefault("data_root", cfg.data_root)
    manifest = build_manifest(cfg.dataset, **options)
    if cfg.limit is not None:
        if cfg.limit < 1:
            raise ValueError(f"--limit {cfg.limit} must be >= 1")
        manifest = manifest.subset(range(min(cfg.limit, len(manifest))))
    return manifest


def data_root_of(cfg: ExtractConfig) -> Path:
    if cfg.data_root is not None:
        return Path(cfg.data_root)
    opts = dict(get_dataset(cfg.dataset).options(), **cfg.manifest_options)
    if isinstance(opts.get("data_root"), str):
        return Path(opts["data_root"])
    raise ValueError(f"dataset {cfg.dataset} needs --data-root (the folder holding its videos or frames/audio)")


def _resumed_shard_clips(cfg: ExtractConfig) -> int | None:
    """The shard size of the cache being resumed, when --shard-clips is not given: a rerun without it
    continues the cache instead of being refused for a shard size it never chose."""
    if cfg.overwrite or not (Path(cfg.cache) / META_FILE).is_file():
        return None
    try:
        return CacheMeta.load(Path(cfg.cache)).shard_clips
    except CacheError:
        return None  # create_cache names what is wrong with the folder


def prepare(cfg: ExtractConfig, backbones=None) -> tuple[CacheWriter, Manifest, dict]:
    """Build the manifest, load the backbones, plan and create (or reopen) the cache."""
    if cfg.on_error not in ("fail", "skip"):
        raise ValueError(f"--on-error {cfg.on_error!r} is unknown. Fix: use fail or skip")
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size {cfg.batch_size} must be >= 1")
    graph_setting(cfg.cuda_graphs)  # checked before anything is built
    manifest = load_manifest_for(cfg)
    root = data_root_of(cfg)
    if not root.is_dir():
        raise ValueError(f"--data-root {root} is not a folder. Fix: pass the folder holding the {cfg.dataset} "
                         "media (layouts in the README, 'Datasets')")
    backbones = backbones if backbones is not None else load_backbones(cfg)
    targets = {}
    if any("masks" in c.labels for c in manifest.clips):  # AVS: masks travel with the tokens
        targets["masks"] = {"shape": [manifest.clips[0].num_segments, MASK_SIZE, MASK_SIZE], "dtype": "uint8",
                            "missing": MISSING}
    meta = plan_cache(manifest, {m: b.record() for m, b in backbones.items()}, storage=cfg.format,
                      preset=cfg.preset or default_preset(cfg.dataset), tokens=cfg.tokens, dtype=cfg.dtype,
                      shard_clips=cfg.shard_clips or _resumed_shard_clips(cfg), extract=cfg.to_dict(), targets=targets,
                      batch_size=cfg.batch_size, media=DECODING)
    writer = create_cache(cfg.cache, meta, manifest, overwrite=cfg.overwrite)
    return writer, manifest, backbones


def make_forwards(writer: CacheWriter, backbones: dict, device: str, cfg: ExtractConfig) -> dict[str, TokenForward]:
    """One :class:`TokenForward` per modality on ``device``, with ``cfg``'s precision and CUDA graphs."""
    dev = resolve_device(device)
    graph_batch = cfg.batch_size if graphs_of(cfg, dev.type) else None
    return {m: TokenForward(b, [a for a in writer.meta.arrays if a.modality == m], dev, cfg.precision, graph_batch)
            for m, b in backbones.items()}


def extract(cfg: ExtractConfig, progress: bool = True, backbones=None) -> ExtractSummary:
    """Run (or resume) an extraction; returns the summary. Raises ExtractError on a bad clip with
    ``on_error="fail"`` (finished shards are kept: rerunning resumes)."""
    t0 = time.perf_counter()
    writer, manifest, backbones = prepare(cfg, backbones)
    todo = writer.pending_shards(cfg.retry_failed)
    if todo and dict(writer.meta.media) != DECODING:  # a finished cache of other rules, opened to be read
        raise CacheError(f"--cache {writer.root} was extracted under other media decoding rules; writing "
                         f"{len(todo)} shards into it now would mix the two. Fix: re-extract it with --overwrite")
    forwards, media_pool = {}, None
    if todo and not (cfg.workers or cfg.scheduler):  # nothing moves to the device when all is done
        processes = decode_processes_of(cfg, resolve_device(cfg.device).type)  # checked before models move
        forwards = make_forwards(writer, backbones, cfg.device, cfg)  # models onto the device
        if processes:
            media_pool = MediaPool(processes).start()
    setup = time.perf_counter() - t0  # manifest, models, plan, decode processes: paid once per run
    teardown = 0.0
    skipped = writer.meta.num_shards - len(todo)
    if skipped:
        log.info("%d of %d shards already done; extracting %d", skipped, writer.meta.num_shards, len(todo))
    if cfg.workers or cfg.scheduler:
        from .distributed import run_distributed

        del backbones  # workers load their own
        statuses = run_distributed(cfg, writer, todo, progress)
    else:
        try:
            statuses = run_local(cfg, writer, manifest, forwards, todo, progress, media_pool)
        finally:
            t_close = time.perf_counter()
            if media_pool is not None:
                media_pool.close()  # waits for the decode processes to exit: paid once per run, like setup
            teardown = time.perf_counter() - t_close
    seconds = time.perf_counter() - t0
    written = sum(s.bytes for s in statuses)
    n_clips = sum(len(s.clips) for s in statuses)
    devices = sorted({s.device for s in statuses}) or [str(resolve_device(cfg.device))]
    profile = {"seconds": seconds, "clips": n_clips, "clips_per_second": n_clips / seconds if seconds else 0.0,
               "device": ",".join(devices), "peak_memory": max((s.peak_memory for s in statuses), default=0),
               "decode_s": sum(s.decode_s for s in statuses), "forward_s": sum(s.forward_s for s in statuses),
               "write_s": sum(s.write_s for s in statuses), "workers": len({s.worker for s in statuses}),
               **{k: sum(s.extra.get(k, 0.0) for s in statuses)
                  for k in ("stage_s", "launch_s", "wait_s", "put_s", "backlog_s", "one_off_s")},
               "mb_per_second": written / 1e6 / seconds if seconds else 0.0, "setup_s": setup, "teardown_s": teardown,
               "clips_per_second_after_setup": n_clips / (seconds - setup) if seconds > setup else 0.0}
    done = writer.finish(profile) if todo or not writer.done else writer.read_done()
    return ExtractSummary(writer.root, writer.meta.num_clips, done["clips_ok"], done["failures"], len(todo), skipped,
                          written, done["bytes_on_disk"], seconds, profile)


def run_local(cfg: ExtractConfig, writer: CacheWriter, manifest: Manifest, forwards: dict[str, TokenForward],
              todo: list[int], progress: bool, media_pool: MediaPool | None = None) -> list[ShardStatus]:
    """One process drives the backbones: the next shard's clips are decoded (``media_pool``'s processes,
    or threads) and preprocessed (threads) while this shard runs through the backbones here, and a
    writer thread waits for the previous shard's last puts (:class:`~.shard.Putter`) and writes it:
    the backbones go on with the next shard's first batches meanwhile."""
    backbones = {m: fw.backbone for m, fw in forwards.items()}
    root = data_root_of(cfg)
    n_clips = sum(len(writer.meta.shard_rows(k)) for k in todo)
    statuses: list[ShardStatus] = []
    threads = max(1, cfg.decode_threads, media_pool.processes if media_pool is not None else 0)

    def submit(shard: int) -> list:
        return submit_decodes(decode_pool, manifest, root, writer.meta.shard_rows(shard), backbones, media_pool)

    bar = tqdm(total=n_clips, desc="extract", unit="clip", disable=not progress or not todo, smoothing=0.1)
    # the write pool closes before the put threads: a shard being finished there (Ctrl-C during the
    # last wait, say) gets its puts, not their cancellation, and is written
    with ThreadPoolExecutor(threads, thread_name_prefix="decode") as decode_pool, Putter() as putter, \
            ThreadPoolExecutor(1, thread_name_prefix="write") as write_pool:
        queued = submit(todo[0]) if todo else []
        write, written, spare = None, None, None  # a shard being finished and written, its buffer; one to refill

        def done(status: ShardStatus) -> None:
            statuses.append(status)
            failed = sum(v != OK for v in status.clips.values())
            bar.set_postfix(shard=f"{status.shard + 1}/{writer.meta.num_shards}", failed=failed)

        for i, shard in enumerate(todo):
            decodes = queued
            try:
                if i + 1 < len(todo):  # decode the next shard while this one runs through the backbones
                    queued = submit(todo[i + 1])
                flight = launch_shard(writer.meta, manifest, shard, decodes, forwards, cfg.batch_size, putter,
                                      cfg.on_error, on_clip=bar.update, data_root=root, recycle=spare)
                if write is not None:  # the previous shard, finished and written while this one launched
                    done(write.result())
                    spare = written
            except BaseException:
                for f in (*decodes, *queued):
                    f.cancel()
                if write is not None:
                    write.result()  # finished shards stay finished; a failed write's error is the one raised
                raise
            write, written = write_pool.submit(_finish_and_write, writer, flight), flight.buffer
        if write is not None:
            done(write.result())
    bar.close()
    return statuses


def _finish_and_write(writer: CacheWriter, flight: ShardInFlight) -> ShardStatus:
    """(Writer thread.) Wait for a launched shard's last puts, then write it (status file last)."""
    buffer, status = flight.finish()
    return writer.write_shard(buffer, status)
