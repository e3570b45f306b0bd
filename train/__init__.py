"""Stage two: meta-token distillation (LCD/MTI) and task heads trained from the cache.

Never imports ``mettle.extract``: stage two must run on a machine without backbone code or
weights. The training code lands here with the stage-two issue (see README, "Status").
"""
