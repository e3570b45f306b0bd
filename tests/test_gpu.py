"""CUDA paths (marker ``gpu``; deselected by default, run with ``pytest -m gpu`` on a GPU machine)."""

from unittest import mock

import numpy as np
import pytest
import torch

from mettle.cache import ArraySpec, open_cache
from mettle.extract.config import ExtractConfig
from mettle.extract.run import extract
from mettle.train.config import LCDConfig, resolve_config
from mettle.train.lcd import LCD, LayerDistiller, Readout
from mettle.train.loop import fit

pytestmark = pytest.mark.gpu  # skipped without CUDA (conftest.py)


def test_cuda_extraction_matches_cpu(toy_root, tmp_path):
    """float16 autocast on the GPU (CUDA graphs by default) stays within the cache's float16 precision of the
    CPU float32 run."""
    common = dict(dataset="toy", data_root=str(toy_root), manifest_options={"num_clips": 12, "frames": True},
                  backbones="tiny", limit=4)
    extract(ExtractConfig(cache=str(tmp_path / "cpu"), device="cpu", **common), progress=False)
    extract(ExtractConfig(cache=str(tmp_path / "gpu"), device="cuda", **common), progress=False)
    a, b = open_cache(tmp_path / "cpu"), open_cache(tmp_path / "gpu")
    assert a.meta.arrays == b.meta.arrays
    for key in a.keys():
        x, y = a.read(key, range(4)), b.read(key, range(4))
        rel = np.linalg.norm(x - y) / np.linalg.norm(x)
        assert rel < 2e-2, (key, rel)


def test_training_batches_are_read_into_page_locked_memory(toy48_cache):
    cache = open_cache(toy48_cache)
    keys = cache.keys()[:3]
    for workers in (0, 1):
        for epoch in range(2):  # the second epoch's rows come from memory (stacked, then pinned by the loader)
            batch = next(iter(cache.iterate([[5, 2, 9]], keys, workers=workers, seed=epoch)))
            for k in keys:
                t = batch["tokens"][k]
                assert t.is_pinned(), (k, workers, epoch)
                assert np.array_equal(t.numpy(), cache.read(k, [5, 2, 9], cache.batch_dtype))
                assert torch.equal(t.to("cuda", non_blocking=True).cpu(), t)
    cache.close()  # the worker kept for both epochs (cache/loader.py) ends here


def test_cuda_lcd_equals_naive_and_cpu():
    torch.manual_seed(0)
    cfg = dict(meta_tokens=4, dim=32, heads=4)
    layer, naive, readout = (LayerDistiller(48, LCDConfig(attention="folded", **cfg)),
                             LayerDistiller(48, LCDConfig(attention="naive", **cfg)), Readout(48, LCDConfig(**cfg)))
    naive.load_state_dict(layer.state_dict())
    x = torch.randn(6, 100, 48).half()
    cpu = layer(x, readout)
    layer, naive, readout = layer.cuda(), naive.cuda(), readout.cuda()
    gpu, ref = layer(x.cuda(), readout), naive(x.cuda(), readout)
    assert torch.allclose(gpu, ref, atol=1e-4) and torch.allclose(gpu.cpu(), cpu, atol=1e-4)


@pytest.mark.parametrize("chunk,meta", [(64 << 20, 64 << 20), (1, 64 << 20), (1, 1)])
@pytest.mark.parametrize("recompute", [True, False])
def test_cuda_grouped_lcd_equals_naive_and_cpu(chunk, meta, recompute, device="cuda"):
    """The grouped attention on CUDA (batched products writing into strided ``out=`` views; with ``chunk`` 1
    the layers attended one at a time and joined before the part after the attention) against the
    per-layer reference on CUDA and against itself on the CPU: outputs and every parameter's gradient."""
    torch.manual_seed(0)
    arrays = [ArraySpec(f"visual/stage0.block{i}", "visual", f"stage0.block{i}", i, 0, 48, (10, 10), (10, 10))
              for i in range(5)]
    cfg = dict(meta_tokens=4, dim=32, heads=4, matmul="float32")  # exact products: TF32 is tested below
    folded = LCD(arrays, LCDConfig(attention="folded", **cfg))
    with torch.no_grad():
        for p in folded.parameters():
            p.add_(0.1 * torch.randn_like(p))
    naive = LCD(arrays, LCDConfig(attention="naive", **cfg))
    naive.load_state_dict(folded.state_dict())
    folded.chunk_bytes, folded.meta_bytes, folded.recompute = chunk, meta, recompute
    tokens = {a.key: torch.randn(2, 3, 100, 48).half() for a in arrays}
    weights = torch.randn(2, 3, 4, 32)

    def run(model, dev):
        model.to(dev).zero_grad(set_to_none=True)
        out = model({k: v.to(dev) for k, v in tokens.items()})
        (out * weights.to(dev)).sum().backward()
        # copies: on the CPU ``.cpu()`` returns the gradient itself, whose data ``model.to`` later moves in place
        return out.cpu(), {n: p.grad.to("cpu", copy=True) for n, p in model.named_parameters()}

    cpu = run(folded, "cpu")
    gpu, ref = run(folded, device), run(naive, device)
    for a, b in ((gpu, ref), (gpu, cpu)):
        assert torch.allclose(a[0], b[0], atol=1e-4)
        for n, g in a[1].items():
            assert torch.allclose(g, b[1][n], atol=1e-4, rtol=1e-3), n


@pytest.mark.parametrize("graphs", ["false", "auto"])
def test_cuda_training_follows_cpu(small_toy_cache, graphs):
    """The same five steps on CPU and GPU from one cache: losses agree (float32 compute on both), with
    eager CUDA steps and with the default (on CUDA: 3 eager, the capture, then replays)."""
    sets = {"lcd.dim": 32, "lcd.meta_tokens": 2, "lcd.heads": 2, "optim.batch_size": 2, "optim.lr": 1e-3,
            "cuda_graphs": graphs, "lcd.matmul": "float32"}  # 4 training clips: full batches only, so step 5 replays
    cache = open_cache(small_toy_cache)
    runs = [fit(resolve_config("ave", {"hidden": 32, "temporal": "gru", "dropout": 0.0}, sets=sets, device=d),
                cache, progress=False, max_steps=5) for d in ("cpu", "cuda")]
    a, b = (torch.tensor(r.step_losses) for r in runs)
    assert len(a) == 5 and torch.allclose(a, b, atol=5e-3, rtol=5e-3), (a, b)  # cuDNN may use TF32
    assert runs[1].peak_memory > 0 and runs[1].graph_replays == (graphs == "auto")


@pytest.mark.parametrize("storage", ["float16", "int8"])
def test_tokens_encoded_on_the_gpu_reach_the_host_as_the_cpu_encodes_them(storage, small_toy_cache):
    """``TokenForward.encoded`` on CUDA: encoded next to the backbone, copied into page-locked host memory
    without blocking; after ``wait`` the codes are what the CPU encoder makes of the same tokens."""
    from mettle.cache.dtypes import encode, get_dtype
    from mettle.extract.backbones import create_backbone
    from mettle.extract.tokens import TokenForward

    backbone = create_backbone("test_swinv2_tiny", random_init=True)
    arrays = [a for a in open_cache(small_toy_cache).meta.arrays if a.modality == "visual"]
    fw = TokenForward(backbone, arrays, torch.device("cuda"), precision="float32")
    x = backbone.preprocess(np.random.default_rng(0).integers(0, 256, (6, 112, 112, 3), dtype=np.uint8))
    dtype = get_dtype(storage)
    flights = [fw.encoded(x, dtype) for _ in range(3)]  # several batches in flight at once
    want = fw(x)
    for flight in flights:
        got = flight.wait()
        assert list(got) == [a.key for a in arrays]
        for key, e in got.items():
            assert e.codes.device.type == "cpu" and e.codes.is_pinned()
            codes, scale = encode(want[key].numpy(), dtype)
            assert np.abs(e.codes.numpy().astype(np.int32) - codes.astype(np.int32)).max() <= (storage == "int8"), key
            assert np.allclose(e.peak.numpy(), np.abs(want[key].numpy()).reshape(6, -1).max(1), rtol=1e-4), key
            if scale is not None:
                assert np.allclose(e.scale.numpy(), scale, rtol=1e-5), key


@pytest.mark.parametrize("graphs", [False, True])
def test_copies_on_their_own_streams_hand_over_each_batch_s_own_tokens(graphs, small_toy_cache):
    """``TokenForward.encoded`` with the copies on upload and download streams (the default): five different
    page-locked batches in flight at once, each comes back as the same batch with the copies on the compute
    stream (``copy_streams=False``) gives (int8 codes within one step: two captures may pick other kernels);
    with graphs, a replay overwriting the outputs of the one before while its copy to the host runs would
    show here, as the batches' codes are far apart."""
    from mettle.cache.dtypes import get_dtype
    from mettle.extract.backbones import create_backbone
    from mettle.extract.tokens import TokenForward

    backbone = create_backbone("test_swinv2_tiny", random_init=True)
    arrays = [a for a in open_cache(small_toy_cache).meta.arrays if a.modality == "visual"]
    rng = np.random.default_rng(0)
    batches = [backbone.preprocess(rng.integers(0, 256, (8, 112, 112, 3), dtype=np.uint8)).pin_memory()
               for _ in range(5)]
    dtype = get_dtype("int8")
    stream = TokenForward._stream

    def late(self, name):  # each copy starts ~20 ms late, so that a missing wait, clone or record_stream shows
        s = stream(self, name)
        with torch.cuda.stream(s):
            torch.cuda._sleep(40_000_000)
        return s

    runs = {}
    for streams in (True, False):
        fw = TokenForward(backbone, arrays, torch.device("cuda"), precision="float32",
                          graph_batch=8 if graphs else None, copy_streams=streams)
        fw.encoded(batches[0], dtype).wait()  # warm-up (with graphs: the capture)
        with mock.patch.object(TokenForward, "_stream", late):
            runs[streams] = [flight.wait() for flight in [fw.encoded(x, dtype) for x in batches]]
        assert len(fw.graphs) == graphs and all(g is not None for g in fw.graphs.values())
        assert bool(fw._streams) == streams
    for b, (got, want) in enumerate(zip(runs[True], runs[False])):
        for key in want:
            assert (got[key].codes.int() - want[key].codes.int()).abs().max() <= 1, (b, key)
            assert torch.allclose(got[key].scale, want[key].scale, rtol=1e-3), (b, key)
            assert torch.allclose(got[key].peak, want[key].peak, rtol=1e-3), (b, key)
    first, second = (runs[True][i][arrays[0].key].codes.int() for i in (0, 1))
    assert (first - second).abs().max() > 8  # different batches: a mix-up could not pass the checks above


def test_cuda_graph_extraction_equals_eager(toy_root, tmp_path, caplog):
    """``--cuda-graphs`` (the default on CUDA) against ``--no-cuda-graphs``: full batches replay one captured graph per backbone, and the partial batch
    at each shard's end (6 segments here, in both shards) one of its own from its second time; the
    cache equals the eager run's."""
    import logging

    common = dict(dataset="toy", data_root=str(toy_root), manifest_options={"num_clips": 12, "frames": True},
                  backbones="tiny", limit=6, shard_clips=3, batch_size=8, device="cuda", precision="float16")
    extract(ExtractConfig(cache=str(tmp_path / "eager"), cuda_graphs=False, **common), progress=False)
    with caplog.at_level(logging.INFO, logger="mettle.extract.graphs"):
        extract(ExtractConfig(cache=str(tmp_path / "graphs"), cuda_graphs=True, **common), progress=False)
    captured = [r.getMessage() for r in caplog.records if "run as one CUDA graph" in r.getMessage()]
    assert len(captured) == 4 and sum("(6," in m for m in captured) == 2, caplog.text
    a, b = open_cache(tmp_path / "eager"), open_cache(tmp_path / "graphs")
    for key in a.keys():
        x, y = a.read(key, range(6)), b.read(key, range(6))
        rel = np.linalg.norm(x - y) / np.linalg.norm(x)
        assert rel < 1e-3, (key, rel)


def test_encoding_on_a_second_gpu_waits_for_that_gpu(small_toy_cache):
    """On ``cuda:1`` (the current device staying ``cuda:0``, as for dask workers on a multi-GPU node) the
    copies' event is recorded on cuda:1's stream: ``wait`` returns the finished tokens."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    from mettle.cache.dtypes import encode, get_dtype
    from mettle.extract.backbones import create_backbone
    from mettle.extract.tokens import TokenForward

    backbone = create_backbone("test_swinv2_tiny", random_init=True)
    arrays = [a for a in open_cache(small_toy_cache).meta.arrays if a.modality == "visual"]
    fw = TokenForward(backbone, arrays, torch.device("cuda:1"), precision="float32")
    x = backbone.preprocess(np.random.default_rng(0).integers(0, 256, (32, 112, 112, 3), dtype=np.uint8))
    assert torch.cuda.current_device() == 0
    want = fw(x)
    for flight in [fw.encoded(x, get_dtype("float16")) for _ in range(4)]:
        for key, e in flight.wait().items():
            assert np.array_equal(e.codes.numpy(), encode(want[key].numpy(), get_dtype("float16"))[0]), key


@pytest.mark.parametrize("overlap", ["false", "auto"])
def test_cuda_graph_training_follows_eager(toy48_cache, caplog, overlap):
    """``cuda_graphs`` (auto on CUDA, true here): after the warm-up, full batches replay one captured step (checked against
    the eager step at capture), the epoch's last, smaller batch runs eagerly; dropout included, the
    losses follow the eager run's and the replays counted. With ``overlap_copy`` (auto: on with graphs) two
    graphs take turns, each batch copied in on a stream of its own while the step before runs: the same losses
    and parameters."""
    import logging

    sets = {"lcd.dim": 32, "lcd.meta_tokens": 2, "lcd.heads": 2, "optim.batch_size": 3, "optim.lr": 1e-3,
            "optim.epochs": 2, "overlap_copy": overlap}
    cache = open_cache(toy48_cache)
    head = {"hidden": 32, "temporal": "gru", "dropout": 0.1}
    eager = fit(resolve_config("ave", head, sets=sets, device="cuda", cuda_graphs=False), cache, progress=False)
    with caplog.at_level(logging.INFO, logger="mettle.train.step"):
        graphed = fit(resolve_config("ave", head, sets=sets, device="cuda", cuda_graphs=True), cache, progress=False)
    assert ("2 CUDA graphs taking turns" if overlap == "auto" else "run as one CUDA graph") in caplog.text, caplog.text
    steps = len(eager.step_losses)  # 32 training clips at 3 a batch: 10 full batches and one of 2, twice
    assert steps == 22 and graphed.graph_replays == steps - 4 - 2, graphed.graph_replays  # warm-up 3, capture 1
    a, b = torch.tensor(eager.step_losses), torch.tensor(graphed.step_losses)
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), (a, b)
    for (k, p), q in zip(eager.model.state_dict().items(), graphed.model.state_dict().values()):
        assert torch.allclose(p, q, rtol=1e-3, atol=1e-4), k


@pytest.mark.parametrize("fault", ["check", "second capture"])
def test_a_fault_in_the_graph_check_falls_back_to_eager_steps(toy48_cache, caplog, monkeypatch, fault):
    """Graphs are on by default on CUDA: a fault while checking the capture (here forced, as the
    snapshot mix-up found on the H200 on 2026-11-27 was), or inside the second graph's capture (two graphs
    take turns by default, the second in the first's pool), gives a warning and eager steps that train as
    without graphs, not a failed run."""
    import logging

    import mettle.train.step as step

    sets = {"lcd.dim": 32, "lcd.meta_tokens": 2, "lcd.heads": 2, "optim.batch_size": 3, "optim.epochs": 1}
    head = {"hidden": 32, "temporal": "gru", "dropout": 0.0}
    cache = open_cache(toy48_cache)
    eager = fit(resolve_config("ave", head, sets=sets, device="cuda", cuda_graphs=False), cache, progress=False)

    def broken(*args):
        raise TypeError("forced")

    captures, step_once = [], step.TrainStep._forward_backward

    def second_capture_fails(self, *batch):
        if torch.cuda.is_current_stream_capturing():
            captures.append(1)
            if len(captures) == 2:
                raise TypeError("forced")
        return step_once(self, *batch)

    if fault == "check":
        monkeypatch.setattr(step, "_update_error", broken)
    else:
        monkeypatch.setattr(step.TrainStep, "_forward_backward", second_capture_fails)
    with caplog.at_level(logging.WARNING, logger="mettle.train.step"):
        graphed = fit(resolve_config("ave", head, sets=sets, device="cuda"), cache, progress=False)
    what = "checking the captured training step" if fault == "check" else "capturing the training step"
    assert f"{what} failed (TypeError: forced)" in caplog.text, caplog.text
    assert torch.cuda.current_stream().cuda_stream == torch.cuda.default_stream().cuda_stream  # restored
    assert graphed.graph_replays == 0
    a, b = torch.tensor(eager.step_losses), torch.tensor(graphed.step_losses)  # AdamW capturable vs not: 1e-3
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), (a, b)


def test_graphed_training_still_names_a_clip_with_non_finite_tokens(small_toy_cache, tmp_path):
    """Losses are read a step late on CUDA (and replayed from a graph): a bad clip is still named."""
    import shutil

    import zarr

    bad = tmp_path / "bad"
    shutil.copytree(small_toy_cache, bad)
    source = open_cache(bad)
    row = source.rows("train")[-1]
    arr = zarr.open_array(str(bad / "tokens.zarr" / "visual" / "stage3.block0"), mode="r+")
    block = arr[:]
    block[row] = np.inf
    arr[:] = block
    sets = {"lcd.dim": 32, "lcd.meta_tokens": 2, "lcd.heads": 2, "optim.batch_size": 1, "optim.epochs": 3}
    cfg = resolve_config("ave", {"hidden": 32, "temporal": "gru", "dropout": 0.1}, sets=sets, device="cuda",
                         cuda_graphs=True)
    with pytest.raises(FloatingPointError, match=f"non-finite tokens in clip {source.manifest.clips[row].clip_id}"):
        fit(cfg, open_cache(bad), progress=False)


def test_cuda_graph_training_on_a_second_gpu(toy48_cache, caplog):
    """Training on ``cuda:1`` while ``cuda:0`` stays current (a sweep worker's GPU): the step is captured on
    cuda:1 (a capture on another GPU's stream would record nothing and replay as nothing)."""
    import logging

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    sets = {"lcd.dim": 32, "lcd.meta_tokens": 2, "lcd.heads": 2, "optim.batch_size": 3, "optim.epochs": 1}
    head = {"hidden": 32, "temporal": "gru", "dropout": 0.0}
    cache = open_cache(toy48_cache)
    eager = fit(resolve_config("ave", head, sets=sets, device="cuda:1", cuda_graphs=False), cache, progress=False)
    with caplog.at_level(logging.INFO, logger="mettle.train.step"):
        graphed = fit(resolve_config("ave", head, sets=sets, device="cuda:1", cuda_graphs=True), cache,
                      progress=False)
    assert torch.cuda.current_device() == 0 and graphed.graph_replays == 11 - 4 - 1, caplog.text
    a, b = torch.tensor(eager.step_losses), torch.tensor(graphed.step_losses)
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), (a, b)


def test_int8_codes_reach_the_gpu_page_locked_and_train_as_decoded(toy_root, tmp_path, monkeypatch):
    """An int8 cache's LCD arrays come as page-locked int8 codes + scales; training from them on the GPU
    follows training from the decoded tokens."""
    from mettle.cache import SCALE
    from mettle.train.model import MettleModel

    extract(ExtractConfig(dataset="toy", cache=str(tmp_path / "c"), data_root=str(toy_root), dtype="int8",
                          manifest_options={"num_clips": 12, "frames": True}, backbones="tiny", device="cpu",
                          limit=6), progress=False)
    cache = open_cache(tmp_path / "c")
    keys = cache.keys()
    batch = next(iter(cache.iterate([[0, 1, 2]], keys, codes=keys)))
    for k in keys:
        assert batch["tokens"][k].dtype == torch.int8 and batch["tokens"][k].is_pinned(), k
        assert batch["tokens"][k + SCALE].is_pinned(), k
    sets = {"lcd.dim": 32, "lcd.meta_tokens": 2, "lcd.heads": 2, "optim.batch_size": 2, "optim.epochs": 2,
            "lcd.matmul": "float32"}  # float32 products: TF32 would round the two inputs' last bits apart
    cfg = resolve_config("ave", {"hidden": 32, "temporal": "gru", "dropout": 0.0}, sets=sets, device="cuda")
    codes = fit(cfg, cache, progress=False)
    monkeypatch.setattr(MettleModel, "code_keys", property(lambda self: []))
    decoded = fit(cfg, cache, progress=False)
    a, b = torch.tensor(codes.step_losses), torch.tensor(decoded.step_losses)
    assert len(a) == 4 and torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a, b)


@pytest.mark.parametrize("name", ["test_swinv2_tiny", "test_htsat_tiny"])
def test_kept_weight_casts_are_cuda_autocasts_bit_for_bit(name):
    """On CUDA under float16 autocast (extraction's precision), a frozen backbone's kept weight casts
    (kept_casts.py) and kept attention terms give exactly timm's and torch's per-call tokens, in eager
    runs and in a captured graph, also one captured before anything was kept."""
    import copy

    from mettle.extract.backbones import create_backbone
    from mettle.extract.backbones.kept_casts import per_call_copy
    from mettle.extract.backbones.swinv2_attention import FrozenWindowAttention, WindowAttention

    b = create_backbone(name).cuda()
    ref = per_call_copy(b)  # torch's own Linear / Conv2d, and (below) timm's own attention
    for m in ref.modules():
        if type(m) is FrozenWindowAttention:
            m.__class__ = WindowAttention
    rng = np.random.default_rng(0)
    media = (rng.integers(0, 256, (4, 112, 112, 3), dtype=np.uint8) if b.modality == "visual"
             else (0.1 * rng.standard_normal((4, 32000))).astype(np.float32))
    x = b.preprocess(media).cuda()
    fresh = copy.deepcopy(b)  # nothing kept yet under CUDA autocast

    def captured(model):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            outs = model.forward_tokens(x)
        graph.replay()
        torch.cuda.synchronize()
        return outs

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, cache_enabled=False):
        want = ref.forward_tokens(x)
        for _ in range(2):  # made, then reused
            assert all(torch.equal(o, w) for o, w in zip(b.forward_tokens(x), want))
        assert all(torch.equal(o, w) for o, w in zip(captured(b), want))  # kept ones read by the graph
        # captured first (no warm-up): nothing is kept during the capture, the graph casts for itself
        assert all(torch.equal(o, w) for o, w in zip(captured(fresh), want))
        assert all(torch.equal(o, w) for o, w in zip(fresh.forward_tokens(x), want))


def test_the_log_mel_front_end_is_float32_under_cuda_autocast():
    """CUDA's default float16 autocast: a silent second, a clipped square wave and a quiet one give the same
    finite log-mel as float32 (in float16 they gave -inf and NaN)."""
    from mettle.extract.backbones.htsat.frontend import LogMel

    t = torch.arange(32000, device="cuda") / 32000
    waves = torch.stack([torch.zeros_like(t), torch.sign(torch.sin(2 * torch.pi * 200 * t)),
                         1e-4 * torch.randn_like(t)])
    front = LogMel().cuda()
    exact = front(waves)
    with torch.autocast("cuda", dtype=torch.float16):
        mixed = front(waves)
    assert torch.isfinite(exact).all()
    torch.testing.assert_close(mixed, exact)
