"""Planning a cache: token budgets, presets, pooling, and how many clips a shard holds."""

import pytest
import torch

from mettle.cache import CacheError, budget_grid, plan_cache, pool_tokens, select_blocks

from test_cache import AUDIO, VISUAL


@pytest.fixture(scope="module")
def manifest(toy_manifest):
    return toy_manifest.subset(range(5))


def test_budget_grids_and_presets():
    assert budget_grid("full", (48, 48), (6, 6)) == (48, 48)
    assert budget_grid("last-grid", (48, 48), (6, 6)) == (6, 6)
    assert budget_grid("last-grid", (6, 6), (6, 6)) == (6, 6)
    assert budget_grid("grid4", (64, 64), (8, 8)) == (4, 4) and budget_grid("grid4", (2, 2), (2, 2)) == (2, 2)
    with pytest.raises(CacheError, match="gridN"):
        budget_grid("grid0", (8, 8), (2, 2))
    seg_v = [s.block.name for s in select_blocks("segmentation", VISUAL.blocks, "visual", "last-grid")]
    assert seg_v == ["stage0.block0", "stage1.block0", "stage2.block0", "stage2.block1"]  # stage ends + last stage
    seg_a = select_blocks("segmentation", AUDIO.blocks, "audio", "last-grid")
    assert [s.block.name for s in seg_a] == ["stage1.block0"] and seg_a[0].grid == (2, 2)
    cls = select_blocks("classification", VISUAL.blocks, "visual", "last-grid")
    assert len(cls) == len(VISUAL.blocks) and {s.grid for s in cls} == {(2, 2)}


def test_pool_tokens_is_the_window_mean():
    x = torch.randn(3, 8 * 8, 5)
    pooled = pool_tokens(x, (8, 8), (2, 2))
    grid = x.reshape(3, 8, 8, 5)
    manual = torch.stack([grid[:, i * 4:(i + 1) * 4, j * 4:(j + 1) * 4].mean((1, 2))
                          for i in range(2) for j in range(2)], 1)
    assert torch.allclose(pooled, manual, atol=1e-6)
    assert pool_tokens(x, (8, 8), (8, 8)) is x


def test_default_shards_hold_whole_extraction_batches(manifest, monkeypatch):
    """Extraction batches the segments of a shard's clips: the default shard size is rounded to whole batches
    (the full-size layout's 28 clips of 10 segments a shard ended every shard with a partial batch of 32)."""
    import mettle.cache.plan as plan
    from mettle.cache.plan import aligned_shard_clips

    assert [aligned_shard_clips(c, 10, 32) for c in (8, 15, 16, 23, 24, 28, 47, 64)] == [8, 15, 16, 16, 32, 32, 48, 64]
    assert aligned_shard_clips(27, 60, 32) == 24 and aligned_shard_clips(64, 10, 64) == 64
    records = {"visual": VISUAL, "audio": AUDIO}
    per_clip = plan_cache(manifest, records, shard_clips=1).bytes_per_clip()
    monkeypatch.setattr(plan, "SHARD_TARGET_BYTES", 28 * per_clip)  # 28 clips fit the byte target
    assert plan_cache(manifest, records).shard_clips == 28  # no batch size: the byte target alone
    meta = plan_cache(manifest, records, batch_size=32)
    assert meta.shard_clips == 32 and meta.shard_clips * meta.num_segments % 32 == 0
    assert plan_cache(manifest, records, batch_size=32, shard_clips=28).shard_clips == 28  # asked for: kept
