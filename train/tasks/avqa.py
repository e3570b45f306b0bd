"""AVQA on MUSIC-AVQA, and its audio-visual grounding pre-training.

``avqa-grounding`` (self-supervised, the original workflow's grounding-generation step): per
segment, the audio meta-tokens ground the visual meta-tokens (audio-queried attention over the K
visual tokens, our stand-in for spatial regions), and a small classifier tells whether the sound
and the grounded picture come from the same clip or from another clip of the batch (binary
cross-entropy). Metric: matching accuracy.

``avqa``: the question (template filled from its values, padded to 14 words) is encoded by a
word embedding + LSTM over the question vocabulary; the same grounding module gives per-segment
audio and grounded visual features, fused and given temporal context; question-guided attention
over the segments pools them; the pooled vector, gated by the question, is classified over the
answer vocabulary. ``head.match_weight`` (0 by default) adds that weight times the grounding module's
match loss (own picture against another clip's), as the reference QA training adds ``0.5 * loss_match``.
``--init-from RUN`` starts from a grounding run (every parameter whose name and shape match:
the LCDs and ``head.grounding``; ``init_keys=head.grounding.*``: the grounding module only, as the
reference). Metrics: accuracy per question type, per modality group and
overall; on MUSIC-AVQA, the other release's test set is scored too (``json`` <-> ``json_update``).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mettle.cache import TokenSource
from mettle.manifests import Manifest, ManifestError, Question, synthetic_videos

from ..metrics.avqa import avqa_accuracies, avqa_table
from . import register_task
from .base import Task

log = logging.getLogger(__name__)
QUESTION_WORDS = 14  # the reference loaders pad questions to 14 tokens


class Grounding(nn.Module):
    """Audio-guided attention over a segment's visual meta-tokens, and a bilinear audio-visual match score."""

    def __init__(self, meta_dim: int, hidden: int) -> None:
        super().__init__()
        self.fc_a = nn.Sequential(nn.LayerNorm(meta_dim), nn.Linear(meta_dim, hidden))
        self.fc_v = nn.Sequential(nn.LayerNorm(meta_dim), nn.Linear(meta_dim, hidden))
        self.match = nn.Bilinear(hidden, hidden, 1)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, K, d) each -> audio (B, T, h) and audio-grounded visual (B, T, h) features."""
        a = self.fc_a(audio).mean(2)
        v = self.fc_v(visual)
        att = torch.softmax(torch.einsum("bth,btkh->btk", a, v) / math.sqrt(a.shape[-1]), dim=-1)
        return a, torch.einsum("btk,btkh->bth", att, v)

    def score(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.match(a, v).squeeze(-1)


class GroundingHead(nn.Module):
    """Match logits ``(B, T, 2)``: [same clip, another clip of the batch] (a batch of one clip: another second of it)."""

    def __init__(self, meta_dim: int, hidden: int) -> None:
        super().__init__()
        self.grounding = Grounding(meta_dim, hidden)

    def forward(self, meta: Mapping[str, torch.Tensor], **_: Any) -> torch.Tensor:
        return match_logits(self.grounding, meta["audio"], meta["visual"], self.training)


def match_logits(grounding: Grounding, audio: torch.Tensor, visual: torch.Tensor, training: bool,
                 positive: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``(B, T, 2)`` match logits of each second's audio against its own picture and against a negative
    (``positive``: ``grounding(audio, visual)`` when the caller has it already)."""
    a, v_pos = positive if positive is not None else grounding(audio, visual)
    # the negative for second s: in training a random second of another clip of the (shuffled) batch, as the
    # reference draws them; in evaluation the same second of it, so validation scores do not vary from epoch
    # to epoch. A batch of one clip (an epoch's last) has no other clip: another second of its own.
    b, t = visual.shape[:2]
    if b > 1:
        other = visual.roll(1, dims=0)
        pick = torch.randint(0, t, (b, t), device=visual.device) if training else None
    else:
        other = visual
        shift = torch.randint(1, t, (b, t), device=visual.device) if training and t > 1 else 1
        pick = (torch.arange(t, device=visual.device).expand(b, t) + shift) % t
    if pick is not None:
        other = other.gather(1, pick.view(b, t, *[1] * (other.dim() - 2)).expand_as(other))
    _, v_neg = grounding(audio, other)
    return torch.stack([grounding.score(a, v_pos), grounding.score(a, v_neg)], -1)


def match_loss(logits: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of ``match_logits``: own picture 1, the negative 0."""
    labels = torch.zeros_like(logits)
    labels[..., 0] = 1.0
    return F.binary_cross_entropy_with_logits(logits, labels)


class AVQAHead(nn.Module):
    """``{audio, visual: (B, T, K, d)}`` + question word ids ``(B, 14)`` -> answer logits ``(B, A)``.

    Per segment: grounded audio and visual features fused with their product, plus a learned
    position embedding (questions ask "first", "how many"); one transformer layer over the
    segments; question-guided attention pools them; the pooled vector gated by the question and the
    question itself feed the answer classifier.
    """

    def __init__(self, meta_dim: int, vocab: int, answers: int, hidden: int = 256, dropout: float = 0.1,
                 segments: int = 10, match: bool = False) -> None:
        super().__init__()
        self.with_match = match  # also return the grounding's match logits (head.match_weight > 0)
        self.grounding = Grounding(meta_dim, hidden)
        self.embed = nn.Embedding(vocab, hidden, padding_idx=0)
        self.encoder = nn.LSTM(hidden, hidden, batch_first=True)
        self.fuse = nn.Sequential(nn.LayerNorm(3 * hidden), nn.Linear(3 * hidden, hidden), nn.GELU())
        self.position = nn.Parameter(torch.zeros(segments, hidden))
        self.temporal = nn.TransformerEncoderLayer(hidden, 4, 2 * hidden, dropout, batch_first=True, norm_first=True)
        self.query = nn.Linear(hidden, hidden)
        self.out = nn.Sequential(nn.LayerNorm(2 * hidden), nn.Dropout(dropout), nn.Linear(2 * hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, answers))

    def forward(self, meta: Mapping[str, torch.Tensor], question: torch.Tensor,
                **_: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        """Answer logits ``(B, A)``; with ``match``: ``{"answer": (B, A), "match": (B, T, 2)}``."""
        a, v = self.grounding(meta["audio"], meta["visual"])
        x = self.fuse(torch.cat([a, v, a * v], -1)) + self.position[: a.shape[1]]
        x = self.temporal(x)  # (B, T, h)
        # the state after each question's last word (words are left-aligned, padding after them): the
        # final state of a packed sequence, without packing's lengths on the host (a wait for the GPU,
        # which a CUDA graph cannot hold)
        lengths = (question != 0).sum(1).clamp(min=1)
        states, _ = self.encoder(self.embed(question))  # (B, L, h)
        q = states[torch.arange(len(states), device=states.device), lengths - 1]  # (B, h)
        att = torch.softmax(torch.einsum("bth,bh->bt", x, self.query(q)) / math.sqrt(x.shape[-1]), dim=1)
        pooled = torch.einsum("bt,bth->bh", att, x)
        answer = self.out(torch.cat([pooled * q, q], -1))
        if not self.with_match:
            return answer
        return {"answer": answer,
                "match": match_logits(self.grounding, meta["audio"], meta["visual"], self.training, positive=(a, v))}


def answer_logits(outputs: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The answer logits of an AVQA head's outputs (a dict when it also gives match logits)."""
    return outputs["answer"] if isinstance(outputs, Mapping) else outputs


class _QuestionItems:
    """Items are questions: indices into ``self.questions`` (the manifest's, plus the other
    MUSIC-AVQA release's test questions mapped onto the cache's clips)."""

    def prepare(self, source: TokenSource) -> None:
        m = source.manifest
        self.questions: list[Question] = list(m.questions)
        self.splits: dict[str, list[int]] = {}
        ok = set(source.rows())
        for i, q in enumerate(self.questions):
            if q.clip_index in ok:
                self.splits.setdefault(q.split, []).append(i)
        left = sum(q.clip_index not in ok for q in self.questions)
        if left:
            log.warning("%d questions are about clips that failed extraction and are left out", left)
        self.extra = {}
        if m.dataset == "music-avqa":
            self._add_other_release(m, ok)

    def _add_other_release(self, m: Manifest, ok: set[int]) -> None:
        from mettle.manifests import build_manifest

        version = m.options.get("version", "json")
        other = "json_update" if version == "json" else "json"
        try:
            om = build_manifest("music-avqa", version=other)
        except (ManifestError, OSError) as e:
            log.warning("could not load the %s test questions (%s); scoring %s only", other, e, version)
            return
        row_of = {c.clip_id: i for i, c in enumerate(m.clips)}
        name = f"test_{other}"
        items, missing = [], 0
        for q in om.questions:
            row = row_of.get(om.clips[q.clip_index].clip_id)
            if q.split != "test":
                continue
            if row is None or row not in ok:
                missing += 1
                continue
            items.append(len(self.questions))
            self.questions.append(Question(q.question_id, row, name, q.qtype, q.template, q.values, q.answer))
        self.splits[name] = items
        self.extra[name] = missing

    def items(self, source: TokenSource, split: str) -> list[int]:
        if getattr(self, "_source", None) is not source:
            self.prepare(source)
            self._source = source
        return list(self.splits.get(split, []))

    def item_rows(self, manifest: Manifest, items: Sequence[int]) -> list[int]:
        return [self.questions[i].clip_index for i in items]


@register_task
class AVQATask(_QuestionItems, Task):
    name = "avqa"
    summary = "MUSIC-AVQA question answering: accuracy per question type, modality group and overall"
    modalities = ("visual", "audio")
    head_defaults = {"hidden": 256, "dropout": 0.1, "match_weight": 0.0}
    select_metric = "overall"

    def check(self, manifest: Manifest) -> None:
        from mettle.cache import CacheError

        if not manifest.questions:
            raise CacheError(f"task avqa needs questions, which dataset {manifest.dataset} does not have. "
                             "Fix: use a MUSIC-AVQA cache (dataset music-avqa or toy-avqa)")

    def extra_splits(self, source: TokenSource) -> list[str]:
        self.items(source, "test")
        return [s for s in self.splits if s.startswith("test_")]

    def build_head(self, head: Mapping[str, Any], meta_dim: int, meta_tokens: int, manifest: Manifest,
                   meta: Any = None) -> nn.Module:
        self.match_weight = float(head.get("match_weight", 0.0))  # configs saved before 2026-11-28 lack it
        return AVQAHead(meta_dim, len(manifest.vocabularies["question_word"]), len(manifest.vocabularies["answer"]),
                        int(head["hidden"]), float(head["dropout"]), manifest.clips[0].num_segments,
                        match=self.match_weight > 0)

    def head_inputs(self, manifest: Manifest, items: Sequence[int]) -> dict[str, torch.Tensor]:
        index = {w: i for i, w in enumerate(manifest.vocabularies["question_word"])}
        ids = torch.zeros(len(items), QUESTION_WORDS, dtype=torch.long)
        for k, i in enumerate(items):
            words = [index[w] for w in self.questions[i].words()][:QUESTION_WORDS]
            ids[k, :len(words)] = torch.tensor(words)
        return {"question": ids}

    def targets(self, manifest: Manifest, items: Sequence[int]) -> torch.Tensor:
        return torch.tensor([self.questions[i].answer for i in items], dtype=torch.long)

    def loss(self, outputs: torch.Tensor | Mapping[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, Mapping):  # the reference's loss_qa + 0.5 * loss_match (head.match_weight)
            return F.cross_entropy(outputs["answer"], targets) + self.match_weight * match_loss(outputs["match"])
        return F.cross_entropy(outputs, targets)

    def metrics(self, outputs: torch.Tensor | Mapping[str, torch.Tensor], targets: torch.Tensor, manifest: Manifest,
                items: Sequence[int]) -> dict[str, float]:
        outputs = answer_logits(outputs)
        return avqa_accuracies(outputs.argmax(-1).tolist(), targets.tolist(), [self.questions[i].qtype for i in items])

    def table(self, metrics: Mapping[str, float]) -> list[str]:
        return avqa_table(metrics)


@register_task
class AVQAGroundingTask(Task):
    name = "avqa-grounding"
    summary = "self-supervised audio-visual grounding (same clip vs another clip) to initialise avqa"
    modalities = ("visual", "audio")
    head_defaults = {"hidden": 256}
    select_metric = "match_accuracy"

    def items(self, source: TokenSource, split: str) -> list[int]:
        """The split's clips; on MUSIC-AVQA its real videos only, as the reference grounding step trains and
        validates (``avqa-{train,val}_real.json``): a synthetic video is pieced together from solo
        recordings, so its sound and picture match only as its pieces do."""
        rows = source.rows(split)
        m = source.manifest
        if m.dataset != "music-avqa":
            return rows
        if getattr(self, "_synthetic", None) is None:
            self._synthetic = synthetic_videos()
        kept = [r for r in rows if m.clips[r].clip_id not in self._synthetic]
        if len(kept) < len(rows):
            log.info("avqa-grounding: %s: %d synthetic videos left out, %d real ones kept", split,
                     len(rows) - len(kept), len(kept))
        return kept

    def build_head(self, head: Mapping[str, Any], meta_dim: int, meta_tokens: int, manifest: Manifest,
                   meta: Any = None) -> nn.Module:
        return GroundingHead(meta_dim, int(head["hidden"]))

    def targets(self, manifest: Manifest, items: Sequence[int]) -> torch.Tensor:
        return torch.zeros(len(items))  # self-supervised: the labels are built into the outputs

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return match_loss(outputs)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor, manifest: Manifest,
                items: Sequence[int]) -> dict[str, float]:
        pos, neg = outputs[..., 0], outputs[..., 1]
        return {"match_accuracy": 100.0 * float(torch.cat([(pos > 0).flatten(), (neg < 0).flatten()]).float().mean())}
