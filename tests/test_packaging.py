"""setup.cfg lists every package folder, and ships the annotation files."""

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    found = {"mettle"} | {
        "mettle." + ".".join(p.parent.relative_to(ROOT).parts)
        for p in ROOT.glob("*/**/__init__.py")
        if p.parent.relative_to(ROOT).parts[0] in {"manifests", "cache", "extract", "train"}
    }
    assert listed == found


def test_no_python_modules_at_the_root_besides_init():
    assert sorted(p.name for p in ROOT.glob("*.py")) == ["__init__.py"]


def test_annotations_are_packaged():
    from mettle.manifests.annotations import packaged

    for dataset, name in [("ave", "Annotations.txt"), ("llp", "AVVP_eval_visual.csv"),
                          ("music-avqa", "json_update/avqa-test.json.gz")]:
        assert (packaged(dataset) / name).is_file()
