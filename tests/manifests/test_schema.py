import dataclasses
import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mettle.manifests import Clip, Manifest, ManifestError, build_manifest, load_manifest, save_manifest
from mettle.manifests.options import parse_overrides
from mettle.manifests.paths import check_media_id, resolve_under


def _clip(i, **kw):
    base = dict(clip_id=f"c{i}", splits=("train",), num_segments=2, duration=2.0,
                media={"video": f"videos/c{i}"}, labels={"segment_labels": [0, 1]})
    base.update(kw)
    return Clip(**base)


def _manifest(*clips, **kw):
    return Manifest("x", tuple(clips), {"event": ("a", "background")}, **kw)


def test_json_round_trip_and_stable_hash(tmp_path):
    m = build_manifest("llp")
    path = tmp_path / "m.json"
    save_manifest(m, path)
    back = load_manifest(path)
    assert back == m and back.sha256() == m.sha256()
    assert json.loads(path.read_text())["format"] == 1
    # any change of content changes the hash
    changed = dataclasses.replace(m, clips=m.clips[:-1])
    assert changed.sha256() != m.sha256()


@pytest.mark.parametrize("clips, problem", [
    ((_clip(0), _clip(0)), "duplicate clip id"),
    ((_clip(0, splits=("dev",)),), "must be a non-empty subset"),
    ((_clip(0, splits=("train", "test")),), "clip-level splits must be disjoint"),
    ((_clip(0, labels={"segment_labels": [0, 2]}),), "segment label 2 is not an index"),
    ((_clip(0, labels={"segment_labels": [0]}),), "1 segment labels for 2 segments"),
    ((_clip(0, media={"video": "../outside"}),), "not a plain relative path"),
    ((_clip(0, media={"video": "/abs/path"}),), "not a plain relative path"),
    ((_clip(0, labels={"audio_events": [[0, 1, 3]]}),), r"\[1, 3\) outside 0..2"),
])
def test_validation_names_clip_and_problem(clips, problem):
    with pytest.raises(ManifestError, match=problem):
        _manifest(*clips).validate()


def test_loading_other_format_or_garbage_refused(tmp_path):
    d = _manifest(_clip(0)).to_dict()
    d["format"] = 99
    with pytest.raises(ManifestError, match="format 99 is not supported"):
        Manifest.from_dict(d)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(tmp_path / "bad.json")
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "missing.json")


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "a\\b", "..x", ".hidden", "a b", "x\x00"])
def test_unsafe_ids_refused(bad):
    with pytest.raises(ManifestError):
        check_media_id(bad)


def test_resolve_under_is_lexical(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(tmp_path, root / "link")  # the user's own links are followed
    assert resolve_under(root, "a/b.npy") == root / "a/b.npy"
    assert resolve_under(root, "link/x").parent.resolve() == tmp_path.resolve()
    for bad in ("../x", "a/../../x", "/etc/passwd", "a\\b", ""):
        with pytest.raises(ManifestError, match="not a plain relative path"):
            resolve_under(root, bad)


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20))
def test_check_media_id_never_lets_a_separator_through(s):
    try:
        ok = check_media_id(s)
    except ManifestError:
        return
    assert "/" not in ok and "\\" not in ok and ".." not in ok and not ok.startswith(".")


DEFAULTS = {"n": 3, "rate": 0.5, "flag": False, "name": "x", "path": None}


@given(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False), st.booleans())
def test_overrides_typed_round_trip(n, rate, flag):
    got = parse_overrides([f"n={n}", f"rate={rate!r}", f"flag={str(flag).lower()}", "path=a=b"], DEFAULTS, "t")
    assert got == {"n": n, "rate": rate, "flag": flag, "path": "a=b"}


@given(st.text(max_size=15))
def test_overrides_reject_or_accept_cleanly(raw):
    """Whatever the user types, the parser returns a typed value or raises ManifestError with a fix."""
    for key in DEFAULTS:
        try:
            value = parse_overrides([f"{key}={raw}"], DEFAULTS, "t")[key]
        except ManifestError as e:
            assert "Fix:" in str(e)
        else:
            assert isinstance(value, str if DEFAULTS[key] in (None, "x") else type(DEFAULTS[key]))


@pytest.mark.parametrize("pair, problem", [
    ("n", "is not key=value"), ("=3", "is not key=value"), ("m=3", "has no option 'm'"),
    ("n=three", "expected int"), ("flag=maybe", "expected true or false"),
])
def test_overrides_errors(pair, problem):
    with pytest.raises(ManifestError, match=problem):
        parse_overrides([pair], DEFAULTS, "t")
