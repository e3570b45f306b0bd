"""Stage one: decode media, run the frozen backbones once, write every layer's tokens to the cache."""
