"""Task metrics as the reference protocols define them, one module per task, each tested on
hand-built cases: ``ave`` (segment accuracy), ``avvp`` (LLP segment/event F-scores), ``avqa``
(MUSIC-AVQA accuracy per question type and group), ``avs`` (AVSBench mIoU and F-score)."""

from .ave import segment_accuracy
from .avqa import AVQA_GROUPS, avqa_accuracies, avqa_table
from .avs import REFERENCE_BATCHES, f_curves, fscore_batched, fscore_per_frame, fscore_reference, mask_iou
from .avvp import AVVP_KEYS, avvp_scores, avvp_table, avvp_video_scores, extract_events, parse_predictions

__all__ = ["AVQA_GROUPS", "AVVP_KEYS", "REFERENCE_BATCHES", "avqa_accuracies", "avqa_table", "f_curves",
           "fscore_batched", "fscore_per_frame", "fscore_reference",
           "mask_iou", "avvp_scores", "avvp_table", "avvp_video_scores", "extract_events", "parse_predictions", "segment_accuracy"]
