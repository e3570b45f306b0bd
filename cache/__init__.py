"""The contract between the stages: the self-describing layer-token cache.

Imports only ``mettle.manifests``; ``mettle.extract`` writes caches through :mod:`.writer`,
``mettle.train`` reads them through :func:`open_cache`. The layout is documented in
:mod:`.format` and in the README ("The cache").
"""

from .budget import (DEFAULT_TOKENS, PRESET_SUMMARY, TASK_PRESETS, TOKEN_BUDGETS, BlockLayout, budget_grid,
                     check_budget, check_preset, default_preset, pool_tokens, select_blocks)
from .dtypes import DEFAULT_DTYPE, DTYPES, Float16Overflow
from .errors import CacheError
from .format import FORMAT_VERSION, OK, STORAGES, ArraySpec, BackboneRecord, CacheMeta
from .source import SCALE, TokenSource
from .info import describe
from .reader import Cache, open_cache
from .plan import plan_cache
from .writer import CacheWriter, ShardBuffer, ShardStatus, create_cache
from .verify import VerifyReport, verify_cache

__all__ = [
    "DEFAULT_DTYPE", "DEFAULT_TOKENS", "DTYPES", "FORMAT_VERSION", "OK", "PRESET_SUMMARY", "SCALE", "STORAGES", "TASK_PRESETS",
    "TOKEN_BUDGETS", "ArraySpec", "BackboneRecord", "BlockLayout", "Cache", "CacheError", "CacheMeta", "CacheWriter",
    "Float16Overflow", "ShardBuffer", "ShardStatus", "TokenSource", "budget_grid", "check_budget", "check_preset", "create_cache",
    "default_preset", "describe", "open_cache", "plan_cache", "pool_tokens", "select_blocks", "VerifyReport", "verify_cache",
]
