"""Property-based tests: parsers and config overrides either accept an input or refuse it with their
own error type, a line and a fix; they never crash with anything else."""

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mettle.manifests import AnnotationError, ManifestError
from mettle.manifests.ave import _parse_rows
from mettle.manifests.llp import _tsv
from mettle.manifests.options import parse_overrides
from mettle.train.config import ConfigError, resolve_config

FIELD = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
CLASSES = {"bell": 0, "siren": 1}


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.one_of(FIELD, st.sampled_from(["bell", "siren", "0", "3", "10", "good", "abc_01"])),
                         min_size=0, max_size=7), max_size=5))
def test_ave_rows_parse_or_name_the_line(rows):
    text = "\n".join("&".join(r) for r in rows)
    try:
        parsed = _parse_rows(Path("Annotations.txt"), text, CLASSES, 10, header_allowed=True)
    except AnnotationError as e:
        assert str(e).startswith("Annotations.txt:") and "Fix:" in str(e)
        return
    for n, cls, vid, s, e in parsed:
        assert cls in (0, 1) and 0 <= s <= e <= 10 and vid and "/" not in vid and ".." not in vid


@settings(max_examples=200)
@given(st.lists(st.lists(FIELD, min_size=0, max_size=5), max_size=5))
def test_llp_rows_parse_or_name_the_line(rows):
    text = "header\n" + "\n".join("\t".join(r) for r in rows)
    try:
        out = list(_tsv(Path("AVVP_train.csv"), text, 2))
    except AnnotationError as e:
        assert "AVVP_train.csv" in str(e) and "Fix:" in str(e)
        return
    assert all(len(fields) == 2 for _, fields in out)


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from(["num_clips", "seed", "frames", "data_root", "nope", ""]),
                          st.sampled_from(["=", ":", ""]), FIELD), max_size=4))
def test_dataset_overrides_are_typed_or_refused(pairs):
    defaults = {"num_clips": 48, "seed": 0, "frames": False, "data_root": "data/toy"}
    try:
        out = parse_overrides([k + sep + v for k, sep, v in pairs], defaults, "dataset 'toy'")
    except ManifestError as e:
        assert "Fix:" in str(e)
        return
    for key, value in out.items():
        assert type(value) is type(defaults[key])


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(["lcd.meta_tokens", "lcd.dim", "lcd.adapt", "optim.lr", "seed", "lcd.layers",
                                        "head.hidden", "lcd.nope", "out"]), FIELD, max_size=4))
def test_train_overrides_are_typed_or_refused(sets):
    try:
        cfg = resolve_config("ave", {"hidden": 256}, sets=sets)
    except ConfigError as e:
        assert "Fix:" in str(e)
        return
    assert isinstance(cfg.lcd.meta_tokens, int) and isinstance(cfg.optim.lr, float)
    assert isinstance(cfg.lcd.adapt, bool) and isinstance(cfg.seed, int)
