"""MUSIC-AVQA accuracy per question type, per modality group and overall (the reference ``test()``).

Accuracies are pooled counts, in percent: a group's accuracy is its correct answers over its
questions (not the mean of its types). Types: Audio (Counting, Comparative), Visual (Counting,
Location), Audio-Visual (Existential, Counting, Location, Comparative, Temporal).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

AVQA_GROUPS = {
    "Audio": ("Counting", "Comparative"),
    "Visual": ("Counting", "Location"),
    "Audio-Visual": ("Existential", "Counting", "Location", "Comparative", "Temporal"),
}
_SHORT = {"Audio": "A", "Visual": "V", "Audio-Visual": "AV", "Counting": "Count", "Comparative": "Comp",
          "Location": "Loc", "Existential": "Ext", "Temporal": "Temp"}


def avqa_accuracies(predicted: Sequence[int], answers: Sequence[int], qtypes: Sequence[tuple[str, str]]
                    ) -> dict[str, float]:
    """``{"Audio/Counting": %, ..., "Audio": %, "Visual": %, "Audio-Visual": %, "overall": %}``.

    A type or group with no question is left out (the table prints ``-``).
    """
    predicted, answers = np.asarray(predicted), np.asarray(answers)
    if not (len(predicted) == len(answers) == len(qtypes)):
        raise ValueError(f"{len(predicted)} predictions, {len(answers)} answers, {len(qtypes)} question types")
    if not len(answers):
        raise ValueError("no questions to score")
    right = predicted == answers
    out: dict[str, float] = {}
    for group, kinds in AVQA_GROUPS.items():
        in_group = np.array([m == group for m, _ in qtypes])
        for kind in kinds:
            mask = in_group & np.array([k == kind for _, k in qtypes])
            if mask.any():
                out[f"{group}/{kind}"] = 100.0 * float(right[mask].mean())
        if in_group.any():
            out[group] = 100.0 * float(right[in_group].mean())
    out["overall"] = 100.0 * float(right.mean())
    return out


def avqa_table(acc: Mapping[str, float]) -> list[str]:
    """The standard table: per type, per group average, overall."""
    cols = []
    for group, kinds in AVQA_GROUPS.items():
        cols += [(f"{_SHORT[group]}-{_SHORT[k]}", f"{group}/{k}") for k in kinds] + [(f"{_SHORT[group]}-Avg", group)]
    cols.append(("Overall", "overall"))
    head = "| " + " | ".join(c for c, _ in cols) + " |"
    values = "| " + " | ".join(f"{acc[k]:.2f}" if k in acc else "-" for _, k in cols) + " |"
    return [head, "|" + " --- |" * len(cols), values]
