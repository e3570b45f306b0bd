"""``mettle-predict``: a trained run applied to new videos, with the frozen backbones run live.

Composition of both stages (allowed here, in ``extract``): the run folder says which backbones,
weights, token budget and model produced it (``source.json``, ``config.yaml``, ``best.pt``); the
videos are decoded, their tokens computed exactly as the cache computed them (``LiveSource``), and
the trained LCD/MTI + head give the task's output:

* ``ave``: a class per second and the events (runs of one non-background class);
* ``avvp``: audio and visual events (class, onset, offset) by the LLP rules (0.5 thresholds);
* ``avs-s4`` / ``avs-ms3``: a mask per second (PNG files);
* ``avqa``: the answer to ``--question``.

Outputs go to ``--out`` as ``predictions.json`` plus a PNG per video (a timeline, or the masks).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import click
import numpy as np
import torch

from mettle.cache import CacheError, CacheMeta
from mettle.cache.writer import first_difference
from mettle.manifests import Clip, Manifest, Question
from mettle.manifests.cli import clean_errors

from .backbones import BackboneError, create_backbone
from .live import LiveSource
from .media import MediaError
from .media.errors import open_container
from .media.video import VIDEO_SUFFIXES

log = logging.getLogger(__name__)


def _duration(path: Path) -> float:
    with open_container(path.stem, path) as c:
        if c.duration:
            return float(c.duration) / 1_000_000
        stream = (c.streams.video or c.streams.audio)[0]
        return float(stream.duration * stream.time_base) if stream.duration else 0.0


def _manifest(videos: Sequence[Path], meta: CacheMeta, question: str | None) -> Manifest:
    clips, questions = [], []
    for i, v in enumerate(videos):
        if not v.exists():
            raise MediaError(v.stem, v, "no such file", "check the path")
        if v.suffix.lower() not in VIDEO_SUFFIXES or not v.is_file():
            raise MediaError(v.stem, v, "not a video file mettle reads", f"pass {', '.join(VIDEO_SUFFIXES)} files")
        duration = max(_duration(v), float(meta.num_segments))
        clips.append(Clip(v.stem, ("test",), meta.num_segments, duration, {"video": v.with_suffix("").name}))
        if question is not None:
            q = Question(i, i, "test", ("Audio-Visual", "Existential"), question.strip(), (), 0)
            vocab = set(meta.vocabularies.get("question_word", ()))
            if not vocab:
                raise CacheError(f"--question: this run's task answers no questions (its {meta.dataset} cache has no "
                                 "question vocabulary). Fix: drop --question, or pass an avqa run")
            unknown = [w for w in q.words() if w not in vocab]
            if unknown:
                raise CacheError(f"--question: {', '.join(repr(w) for w in unknown)} not in the run's question "
                                 f"vocabulary. Fix: use words of the training questions ({len(vocab)} known)")
            questions.append(q)
    return Manifest(meta.dataset, tuple(clips), dict(meta.vocabularies), questions=tuple(questions))


def predict(run_dir: str | Path, videos: Sequence[str | Path], visual_weights: str | None = None,
            audio_weights: str | None = None, random_init: bool = False, device: str = "auto",
            question: str | None = None) -> list[dict[str, Any]]:
    """The task's predictions for each video (one dict per video, in order)."""
    from mettle.train.config import load_config
    from mettle.train.loop import load_checkpoint
    from mettle.train.model import MettleModel
    from mettle.train.tasks import get_task

    run = Path(run_dir)
    for name in ("config.yaml", "source.json", "best.pt"):
        if not (run / name).is_file():
            raise CacheError(f"--run {run} has no {name}. Fix: pass a run folder written by mettle-train")
    cfg = load_config(run / "config.yaml")
    meta = CacheMeta.from_dict(json.loads((run / "source.json").read_text()), str(run / "source.json"))
    task = get_task(cfg.task)
    if cfg.task == "avqa" and question is None:
        raise CacheError("task avqa answers a question. Fix: pass --question \"Which object makes sound first?\"")
    videos = [Path(v) for v in videos]
    if len({v.parent for v in videos}) > 1:
        raise MediaError(videos[0].stem, videos[0], "videos come from several folders", "put them in one folder")
    stems = [v.stem for v in videos]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:  # one clip id and one PNG per name: the second would overwrite the first
        raise MediaError(twice[0], videos[stems.index(twice[0])], "given twice (or as two files of one name)",
                         "pass each video once, under names that differ")
    if not (run / "results.json").is_file():
        log.warning("--run %s has no results.json: its training did not finish; best.pt holds the best epoch so far",
                    run)
    backbones = {}
    for m, rec in meta.backbones.items():
        weights = visual_weights if m == "visual" else (audio_weights or (visual_weights if "+fbank" in rec.name else None))
        b = create_backbone(rec.name, weights=weights, random_init=random_init)
        b.set_preprocess(dict(rec.preprocess))  # preprocess new videos as the training cache was
        now, then = (json.loads(json.dumps(x)) for x in (b.preprocess_spec(), dict(rec.preprocess)))
        field = first_difference(now, then)
        if field is not None:  # a rule this mettle no longer applies (the fbank image's padding before 2026-11-28)
            raise BackboneError(f"the run's {m} cache was preprocessed otherwise than {rec.name} does now ({field}: "
                                f"{then.get(field)!r}, now {now.get(field)!r}). Fix: extract the cache again and "
                                "retrain, or predict with the mettle that made it")
        if b.weights_id != rec.weights_id:
            raise BackboneError(f"the run was trained on {m} tokens of {rec.name} with weights {rec.weights_id[:16]}, "
                                f"these are {b.weights_id[:16]}. Fix: pass the same weights file "
                                f"(--{m}-weights) {'or --random-init' if rec.weights_id == 'random-init' else ''}")
        backbones[m] = b
    manifest = _manifest(videos, meta, question)
    source = LiveSource(manifest, videos[0].parent, backbones, preset=meta.preset, tokens=meta.tokens, device=device)
    if {a.key: a for a in source.meta.arrays} != {a.key: a for a in meta.arrays}:
        raise CacheError("the live tokens do not match the run's cache layout. Fix: use the run's backbones")
    model = MettleModel(source.meta, manifest, cfg, task)
    model.load_state_dict(load_checkpoint(run / "best.pt")["model"])
    model.to(source.device).eval()
    if cfg.task == "avqa":
        task.items(source, "test")  # question bookkeeping
    out = []
    with torch.no_grad():
        for i, data in enumerate(source.iterate([[i] for i in range(len(videos))], model.keys)):
            extra = {k: v.to(source.device) for k, v in task.head_inputs(manifest, [i]).items()}
            tokens = {k: v.to(source.device) for k, v in data["tokens"].items()}
            y = model(tokens, **extra)
            y = {k: v[0].float().cpu() for k, v in y.items()} if isinstance(y, dict) else y[0].float().cpu()
            out.append({"video": str(videos[i]), "task": cfg.task, **_describe(cfg.task, y, meta)})
    return out


def _runs(labels: Sequence[str], skip: str | None = None) -> list[list]:
    events, start = [], 0
    for t in range(1, len(labels) + 1):
        if t == len(labels) or labels[t] != labels[start]:
            if labels[start] != skip:
                events.append([labels[start], start, t])
            start = t
    return events


def _describe(task: str, y: Any, meta: CacheMeta) -> dict[str, Any]:
    if task == "ave":
        names = meta.vocabularies["event"]
        prob = torch.softmax(y, -1)
        labels = [names[int(k)] for k in prob.argmax(-1)]
        return {"seconds": [{"t": t, "label": labels[t], "p": round(float(prob[t].max()), 4)} for t in range(len(labels))],
                "events": _runs(labels, skip=names[-1])}
    if task == "avvp":
        from mettle.train.metrics.avvp import parse_predictions

        names = meta.vocabularies["event"]
        pa, pv = parse_predictions(y["video"].numpy(), y["frame"][:, 0].numpy(), y["frame"][:, 1].numpy())
        events = {}
        for modality, p in (("audio", pa), ("visual", pv)):
            events[modality] = [[names[c], on, off] for c in range(p.shape[0])
                                for _, on, off in _runs(p[c].tolist(), skip=0)]
        return {"video_labels": [names[c] for c in np.flatnonzero(y["video"].numpy() >= 0.5)], "events": events}
    if task.startswith("avs"):
        from mettle.train.tasks.avs import upsample

        probs = torch.sigmoid(upsample(y[None], 224))[0].numpy()
        return {"masks": (probs > 0.5).astype(np.uint8), "coverage": [round(float((p > 0.5).mean()), 4) for p in probs]}
    if task == "avqa":
        names = meta.vocabularies["answer"]
        from mettle.train.tasks.avqa import answer_logits

        prob = torch.softmax(answer_logits(y), -1)
        return {"answer": names[int(prob.argmax())], "p": round(float(prob.max()), 4)}
    raise CacheError(f"mettle-predict does not handle task {task!r} yet. Fix: use a run of ave, avvp, avs-*, avqa")


def write_outputs(predictions: list[dict[str, Any]], out: Path) -> list[Path]:
    """``predictions.json`` plus one PNG per video: a timeline (ave, avvp) or the masks (avs)."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    previous = out / "predictions.json"
    try:  # the PNGs an earlier call wrote here, of videos this call does not predict, go with its json
        stale = {Path(p["video"]).stem for p in json.loads(previous.read_text())} if previous.is_file() else set()
    except (ValueError, TypeError, KeyError):
        stale = set()
    stale -= {Path(p["video"]).stem for p in predictions}
    for stem in sorted(stale):
        (out / f"{stem}.png").unlink(missing_ok=True)
    pngs = []
    for p in predictions:
        stem = Path(p["video"]).stem
        if "masks" in p:
            masks = p.pop("masks")
            strip = np.concatenate([np.pad(m * 255, ((0, 0), (0, 4)), constant_values=128) for m in masks], 1)
            Image.fromarray(strip.astype(np.uint8)).save(out / f"{stem}.png")
            pngs.append(out / f"{stem}.png")
        elif "events" in p:
            pngs.append(_timeline(p, out / f"{stem}.png"))
    (out / "predictions.json").write_text(json.dumps(predictions, indent=1))
    return pngs


def _timeline(p: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tracks = p["events"] if isinstance(p["events"], dict) else {"event": p["events"]}
    fig, ax = plt.subplots(figsize=(8, 1 + 0.5 * len(tracks)))
    for row, (name, events) in enumerate(tracks.items()):
        for label, on, off in events:
            ax.barh(row, off - on, left=on, height=0.6)
            ax.text(on + 0.1, row, label, va="center", fontsize=7)
    ax.set(yticks=range(len(tracks)), yticklabels=list(tracks), xlabel="seconds", title=Path(p["video"]).name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("videos", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="a mettle-train run folder")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("predictions"), show_default=True)
@click.option("--question", help="avqa: the question to answer")
@click.option("--visual-weights", type=click.Path(dir_okay=False), help="the visual backbone's weights file")
@click.option("--audio-weights", type=click.Path(dir_okay=False), help="the audio backbone's weights file")
@click.option("--random-init", is_flag=True, help="random backbone weights (runs trained on random-init caches)")
@click.option("--device", default="auto", show_default=True)
@clean_errors(CacheError, BackboneError, MediaError, ValueError)
def main(videos, run_dir, out, question, visual_weights, audio_weights, random_init, device) -> None:
    """Predict with a trained run on new VIDEOS (frozen backbones run live)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    preds = predict(run_dir, videos, visual_weights, audio_weights, random_init, device, question)
    pngs = write_outputs(preds, out)
    for p in preds:
        summary = {k: v for k, v in p.items() if k not in ("seconds", "masks")}
        click.echo(json.dumps(summary))
    click.echo(f"wrote {out / 'predictions.json'} and {len(pngs)} PNG files")
