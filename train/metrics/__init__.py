"""Task metrics as the reference protocols define them, one module per task, each tested on
hand-built cases: ``ave`` (segment accuracy), ``avvp`` (LLP segment/event F-scores)."""

from .ave import segment_accuracy
from .avvp import AVVP_KEYS, avvp_scores, avvp_table, avvp_video_scores, extract_events, parse_predictions

__all__ = ["AVVP_KEYS", "avvp_scores", "avvp_table", "avvp_video_scores", "extract_events", "parse_predictions", "segment_accuracy"]
