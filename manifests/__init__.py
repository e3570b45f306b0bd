"""What a dataset is: validated manifests built from the official annotation files.

``build_manifest(name, **options)`` returns the ordered clip list of a registered dataset;
``list_datasets()`` names them. No torch and no model code here: this is the bottom layer
(manifests <- cache <- {extract, train}).
"""

from . import ave, avqa, avsbench, llp, toy  # noqa: F401  (register the builders)
from ._registry import DatasetSpec, build_manifest, get_dataset, list_datasets, register_dataset
from .errors import AnnotationError, ManifestError
from .avqa import synthetic_videos
from .schema import SPLITS, Clip, Manifest, Question, load_manifest, save_manifest

__all__ = [
    "AnnotationError", "Clip", "DatasetSpec", "Manifest", "ManifestError", "Question", "SPLITS",
    "build_manifest", "get_dataset", "list_datasets", "load_manifest", "register_dataset", "save_manifest",
    "synthetic_videos",
]
