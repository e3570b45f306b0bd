"""Token budgets (how many tokens of a block are kept) and task presets (which blocks are kept).

Both are small registries, and both are part of the cache format: a cache records the budget and
preset names, and every reader and the live token source (end-to-end mode) pool tokens with
:func:`pool_tokens`, so "the same tokens" means the same thing on both sides.

Token budgets:

* ``full``: every token, the exact input of end-to-end Mettle.
* ``last-grid``: every block average-pooled to its backbone's last-stage grid (Swin-V2-L 6x6,
  HTS-AT 8x8); blocks already that small are kept as they are. The default.
* ``grid<N>`` (``grid4``, ``grid2``, ...): every block pooled to at most N x N.

Task presets:

* ``classification`` (AVE, AVVP, AVQA): every block of every backbone, under the token budget.
* ``segmentation`` (AVS): the visual backbone's stage outputs (the last block of each stage) and
  the last stage's blocks of every backbone, all at full resolution (the budget does not apply).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .errors import CacheError

Grid = tuple[int, int]


@dataclass(frozen=True)
class BlockLayout:
    """What a backbone block looks like, as far as the cache needs to know (no backbone code here)."""

    index: int
    name: str
    tokens: int
    dim: int
    grid: Grid
    stage: int


# ----------------------------------------------------------------------------- token budgets
def _budget_full(grid: Grid, last: Grid) -> Grid:
    return grid


def _budget_last_grid(grid: Grid, last: Grid) -> Grid:
    return (min(grid[0], last[0]), min(grid[1], last[1]))


TOKEN_BUDGETS: dict[str, Callable[[Grid, Grid], Grid]] = {"full": _budget_full, "last-grid": _budget_last_grid}
DEFAULT_TOKENS = "last-grid"
_GRID_N = re.compile(r"^grid([1-9][0-9]?)$")


def check_budget(name: str) -> str:
    """Validate a token budget name; the error lists the choices."""
    if name in TOKEN_BUDGETS or _GRID_N.match(name):
        return name
    raise CacheError(f"unknown token budget {name!r}. Fix: use one of {', '.join(TOKEN_BUDGETS)}, "
                     "or gridN (every block pooled to at most N x N, e.g. grid4)")


def budget_grid(name: str, grid: Grid, last: Grid) -> Grid:
    """The grid a block of source ``grid`` is stored at under budget ``name``."""
    check_budget(name)
    m = _GRID_N.match(name)
    if m:
        n = int(m.group(1))
        return (min(grid[0], n), min(grid[1], n))
    return TOKEN_BUDGETS[name](grid, last)


def pool_tokens(x: torch.Tensor, grid: Grid, target: Grid) -> torch.Tensor:
    """Average-pool row-major grid tokens ``(B, H*W, D)`` to ``(B, h*w, D)`` (adaptive windows).

    The identity when ``target == grid``. Adaptive pooling with exact windows when H is a multiple
    of h (every Swin-V2 / HTS-AT case), so a pooled token is the plain mean of its window.
    """
    if tuple(target) == tuple(grid):
        return x
    b, n, d = x.shape
    if n != grid[0] * grid[1]:
        raise ValueError(f"{n} tokens do not form a {grid[0]}x{grid[1]} grid")
    maps = x.transpose(1, 2).reshape(b, d, grid[0], grid[1])
    pooled = F.adaptive_avg_pool2d(maps.float(), target).to(x.dtype)
    return pooled.reshape(b, d, target[0] * target[1]).transpose(1, 2)


# ----------------------------------------------------------------------------- task presets
@dataclass(frozen=True)
class Selection:
    """One cached block: its layout, the stored grid, and whether the token budget applied."""

    block: BlockLayout
    grid: Grid


def _classification(blocks: Sequence[BlockLayout], modality: str, budget: str) -> list[Selection]:
    last = blocks[-1].grid
    return [Selection(b, budget_grid(budget, b.grid, last)) for b in blocks]


def _segmentation(blocks: Sequence[BlockLayout], modality: str, budget: str) -> list[Selection]:
    last_stage = blocks[-1].stage
    keep = [b for i, b in enumerate(blocks)
            if b.stage == last_stage or (modality == "visual" and (i + 1 == len(blocks) or blocks[i + 1].stage != b.stage))]
    return [Selection(b, b.grid) for b in keep]


TASK_PRESETS: dict[str, Callable[[Sequence[BlockLayout], str, str], list[Selection]]] = {
    "classification": _classification,
    "segmentation": _segmentation,
}
PRESET_SUMMARY = {
    "classification": "every block of both backbones, under the token budget (AVE, AVVP, AVQA)",
    "segmentation": "visual stage outputs + last-stage blocks of both backbones, full resolution (AVS)",
}
# datasets whose task needs the segmentation preset; everything else is classification
_DATASET_PRESET = {"avsbench-s4": "segmentation", "avsbench-ms3": "segmentation", "toy-avs": "segmentation"}


def default_preset(dataset: str) -> str:
    return _DATASET_PRESET.get(dataset, "classification")


def check_preset(name: str) -> str:
    if name not in TASK_PRESETS:
        raise CacheError(f"unknown cache preset {name!r}. Fix: use one of {', '.join(TASK_PRESETS)}")
    return name


def select_blocks(preset: str, blocks: Sequence[BlockLayout], modality: str, budget: str) -> list[Selection]:
    """The blocks a preset caches for one backbone, with their stored grids."""
    check_budget(budget)
    return TASK_PRESETS[check_preset(preset)](blocks, modality, budget)
