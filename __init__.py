"""mettle: memory-efficient audio-visual adaptation with a two-stage feature cache.

Stage one (``mettle.extract``) runs the frozen backbones once over a dataset and stores every
layer's tokens in a self-describing cache (``mettle.cache``); stage two (``mettle.train``)
trains meta-token modules and task heads from that cache. ``mettle.manifests`` says what a
dataset is. Importing ``mettle`` loads no torch.
"""

__version__ = "0.1.0"
