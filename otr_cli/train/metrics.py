"""Per-step metrics: metrics.jsonl (one JSON object per optimizer step), the trackers, curves.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from otr_cli.atomic import write_text_atomic

CURVE_PANELS = (
    ("loss", "objective loss"),
    ("ce", "cross-entropy of targets (nats)"),
    ("lr", "learning rate"),
    ("match_rate", "OTR match rate"),
    ("p_target", "p(target)"),
    ("entropy", "entropy of p (nats)"),
    ("no_match_frac", "OTR: positions with no matching sample"),
    ("unreachable_frac", "OTR: positions with q(target) < 1e-3"),
)


class MetricsLog:
    """Appends records to ``metrics.jsonl`` and hands their numbers to the trackers; only the main rank writes.

    trackers: ``train/trackers.Trackers`` (trainer.report_to) or None.
    """

    def __init__(self, path: Path, enabled: bool, trackers=None):
        self.path = path
        self.enabled = enabled
        self.trackers = trackers if enabled else None
        self._records: Optional[list[dict[str, Any]]] = None  # read from the file at the first records()

    def records(self) -> list[dict[str, Any]]:
        """Every record of the file so far: read once, then kept as they are written, so that a save's
        log_history (trainer_state.json) does not re-read a file that grows with every step while the other
        ranks wait. The list is the log's own: do not change it."""
        if self._records is None:
            self._records = read_metrics(self.path)
        return self._records

    def truncate_after(self, step: int) -> None:
        """Drop records past `step`: a resumed run rewrites them, so the file has no duplicates."""
        if not self.enabled:
            return
        if self.trackers is not None:
            self.trackers.start_at(step)
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        self._records = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(record)
        with self.path.open("a") as handle:
            handle.write(line + "\n")
        if self._records is not None:
            self._records.append(json.loads(line))  # as a reader of the file sees it
        if self.trackers is not None:
            self.trackers.log(record)

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(records: list[dict[str, Any]], out_png: Path) -> Optional[Path]:
    """One panel per metric present in the records, against optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, title) for key, title in CURVE_PANELS if any(key in r for r in records)]
    # eval.every_steps writes "eval/<benchmark>" accuracies: one panel for all of them.
    eval_keys = list(dict.fromkeys(k for r in records for k in r if k.startswith("eval/")))
    if eval_keys:
        panels.append(("eval/", "accuracy during training"))
    if not records or not panels:
        return None
    columns = 3
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for axis, (key, title) in zip(axes.flat, panels):
        if key == "eval/":
            for name in eval_keys:
                points = [(r["step"], r[name]) for r in records if name in r]
                axis.plot([s for s, _ in points], [v for _, v in points], "o-", ms=3, label=name[len("eval/"):])
            axis.legend(fontsize=8)
            axis.set_title(title, fontsize=10)
            axis.set_xlabel("step", fontsize=8)
            axis.grid(alpha=0.3)
            continue
        points = [(r["step"], r[key]) for r in records if key in r]
        axis.plot([s for s, _ in points], [v for _, v in points], lw=1.2)
        if key == "ce":
            val = [(r["step"], r["val_ce"]) for r in records if "val_ce" in r]
            if val:
                axis.plot([s for s, _ in val], [v for _, v in val], "o-", ms=3, label="validation")
                axis.legend(fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step", fontsize=8)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
