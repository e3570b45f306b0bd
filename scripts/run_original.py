"""The original project's run scripts, as one driver: extract (or resume) the cache, then train.

Usage: python scripts/run_original.py SETTING TASK --data-root DIR [--work DIR] [--dry-run]
       [--visual-weights F] [--audio-weights F] [--random-init] [--device D] [-- extra mettle-train args]

SETTING: ``specific`` (Swin-V2-L frames + HTS-AT audio, the paper's main setting) or ``shared``
(Swin-V2-L for both, audio as fbank images). TASK: ave, avvp, avs-s4, avs-ms3, avqa. The shell
scripts in ``scripts/original/`` (``run_mettle_specific_swin_htsat_ave.sh``, ...) call this with their
setting and task, so users of the original repository find the same entry points.

Each task uses its dataset and the training settings of the reference recipes where they carry
over (batch size, epochs, learning rate of DG-SCT's scripts; see the README's protocol notes);
``avqa`` first runs ``avqa-grounding`` and starts from it. Extraction resumes by default and
training skips finished runs, so rerunning a script continues where it stopped.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

DATASET = {"ave": "ave", "avvp": "llp", "avs-s4": "avsbench-s4", "avs-ms3": "avsbench-ms3", "avqa": "music-avqa"}
TRAIN = {  # the reference recipes' batch size / epochs / learning rate (DG-SCT's train scripts and defaults)
    "ave": ["optim.batch_size=8", "optim.epochs=50", "optim.lr=5e-4"],
    "avvp": ["optim.batch_size=8", "optim.epochs=40", "optim.lr=3e-4", "head.han_losses=true"],  # + the HAN's losses
    "avs-s4": ["optim.batch_size=8", "optim.epochs=15", "optim.lr=3e-4"],
    "avs-ms3": ["optim.batch_size=2", "optim.epochs=30", "optim.lr=1.5e-4"],
    "avqa-grounding": ["optim.batch_size=128", "optim.epochs=30", "optim.lr=3e-4"],  # grounding_gen/main_grd_gen.py
    # DG-SCT: up to 80 epochs, stopped after 3 without a better val accuracy; mettle has no early stop: 30
    "avqa": ["optim.batch_size=8", "optim.epochs=30", "optim.lr=1e-4", "head.match_weight=0.5"],  # + loss_match
}


def commands(setting: str, task: str, data_root: str, work: Path, passthrough: list[str],
             extract_flags: list[str], dataset: str | None = None, backbones: str | None = None) -> list[list[str]]:
    dataset = dataset or DATASET[task]
    cache = work / f"cache-{dataset}-{setting}"
    out = work / "runs"
    extract = ["mettle-extract", "--dataset", dataset, "--data-root", data_root, "--cache", str(cache),
               "--backbones", backbones or setting, *extract_flags]
    if dataset == "music-avqa":
        extract += ["--set", f"train_json={Path(data_root) / 'json' / 'avqa-train.json'}"]
    train = []
    for t in (["avqa-grounding", "avqa"] if task == "avqa" else [task]):
        cmd = ["mettle-train", "--task", t, "--cache", str(cache), "--out", str(out), "--resume"]  # reruns continue
        cmd += [x for s in TRAIN[t] for x in ("--set", s)]
        if t == "avqa":
            cmd += ["--init-from", str(out / "latest-avqa-grounding")]
        train.append(cmd + passthrough)
    return [extract, *train]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("setting", choices=["specific", "shared"])
    ap.add_argument("task", choices=sorted(DATASET))
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--work", type=Path, default=Path("work"))
    ap.add_argument("--visual-weights")
    ap.add_argument("--audio-weights")
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--dataset", help="another dataset of the task's format (e.g. toy, toy-llp, toy-avs, toy-avqa)")
    ap.add_argument("--backbones", help="another backbone set than the setting's (e.g. tiny, for smoke runs)")
    args, passthrough = ap.parse_known_args()
    passthrough = [p for p in passthrough if p != "--"] + ["--device", args.device]
    flags = ["--device", args.device]
    flags += ["--visual-weights", args.visual_weights] if args.visual_weights else []
    flags += ["--audio-weights", args.audio_weights] if args.audio_weights else []
    flags += ["--random-init"] if args.random_init else []
    for cmd in commands(args.setting, args.task, args.data_root, args.work, passthrough, flags, args.dataset,
                        args.backbones):
        print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        if args.dry_run:
            continue
        if cmd[1:3] == ["--task", "avqa"]:
            runs = sorted((args.work / "runs").glob("avqa-grounding__*/results.json"), key=lambda p: p.stat().st_mtime)
            if not runs:
                sys.exit("error: the grounding run did not finish; rerun this script")
            cmd[cmd.index("--init-from") + 1] = str(runs[-1].parent)
        code = subprocess.call(cmd)
        if code:
            sys.exit(code)


if __name__ == "__main__":
    main()
