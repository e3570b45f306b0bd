"""Extraction's device work alone, for ``bench_pipeline.py``: ``TokenForward.encoded`` (forward, pooling,
encoding, copies) timed on the same batches as a run, and with its copies on the compute stream or on
streams of their own (``TokenForward.copy_streams``).
"""

from __future__ import annotations

import time


def batch_inputs(args, backbones, dev) -> dict:
    """One batch of random media per modality, preprocessed, on ``dev`` (every timed batch reads it)."""
    from extract_ops import random_media

    media = random_media(args.batch_size)
    return {m: b.preprocess(media[m]).to(dev) for m, b in backbones.items()}


def copy_streams_compared(args, backbones, run: dict) -> dict:
    """``TokenForward.encoded`` with the copies on the compute stream (as before the ninth session), then on
    their own streams (the default), once each after the runs: seconds for the same batches as a run."""
    import torch

    from mettle.cache import open_cache

    dev = torch.device(args.device)
    inputs, meta = batch_inputs(args, backbones, dev), open_cache(run["cache"]).meta
    return {streams: encode_path(args, backbones, meta, run["autocast"], inputs, dev, args.clips * 10, streams)
            for streams in (False, True)}


def encode_path(args, backbones, meta, autocast: dict, inputs: dict, dev, segs: int, copy_streams: bool = True) -> float:
    """Seconds for extraction's device work alone on the same batches: ``TokenForward.encoded`` (forward,
    pooling, encoding into the storage dtype, copy to the host) from page-locked host inputs, two
    batches in flight as extraction keeps them, without decoding, shard buffers or writes. Between the
    pure forward and the whole pipeline, it says which side of the gap a change should work on.
    ``copy_streams`` False: the copies to and from the device on the compute stream (see TokenForward)."""
    from mettle.cache.dtypes import get_dtype
    from mettle.extract.tokens import TokenForward

    storage = get_dtype(meta.dtype)
    fws = {m: TokenForward(b, [a for a in meta.arrays if a.modality == m], dev,
                           "float16" if autocast[m] else "float32", args.batch_size if args.graphs else None,
                           copy_streams=copy_streams)
           for m, b in backbones.items()}
    host = {m: x.cpu().pin_memory() if dev.type == "cuda" else x.cpu() for m, x in inputs.items()}
    for m, fw in fws.items():  # warm-up (with --cuda-graphs: the capture)
        fw.encoded(host[m], storage).wait()
    t0 = time.perf_counter()
    flights = []
    for start in range(0, segs, args.batch_size):
        n = min(args.batch_size, segs - start)
        for m, fw in fws.items():
            flights.append(fw.encoded(host[m][:n], storage))
        while len(flights) > 2 * len(fws):
            flights.pop(0).wait()
    for f in flights:
        f.wait()
    return time.perf_counter() - t0
