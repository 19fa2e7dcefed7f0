"""A run's report: scores per mode as a table, Markdown, JSON, and a plot of score against prompt positions."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..extras import install_command


@dataclass
class EvalReport:
    """Scores and predictions per mode. `scores[mode]` holds exact_match and f1 (fractions in [0, 1]), the
    number of questions, the mean prompt positions, the mean decoder positions the compression saved per prompt
    (`tokens_saved_estimated` when stored contexts, which keep no text, were counted by their encoder tokens),
    and the prefill and total generation seconds. `notes` says what a resumed run found and redid."""

    scores: dict[str, dict[str, Any]]
    predictions: dict[str, list[dict[str, Any]]]
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)  # what `save` wrote
    plot_skipped: str | None = None  # why `save` wrote no plot

    def table(self) -> str:
        head = ("mode", "EM %", "F1 %", "questions", "prompt positions", "tokens saved", "prefill s", "total s")
        rows = [head] + [(
            mode, f"{s['exact_match'] * 100:.1f}", f"{s['f1'] * 100:.1f}", str(s["questions"]),
            f"{s['mean_prompt_positions']:.0f}", _saved(s), f"{s['prefill_seconds']:.2f}",
            f"{s['total_seconds']:.2f}") for mode, s in self.scores.items()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                         for r in rows)

    def to_markdown(self) -> str:
        c = self.config
        lines = [f"# arccompress eval: {c.get('data', '')}", "",
                 f"encoder `{c.get('encoder')}`, decoder `{c.get('decoder')}` ({c.get('backend')}), {c.get('shots')} "
                 f"shots (seed {c.get('seed')}), {c.get('questions')} questions.", "",
                 "| mode | EM % | F1 % | questions | mean prompt positions | mean tokens saved | prefill s | total s |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for mode, s in self.scores.items():
            lines.append(f"| {mode} | {s['exact_match'] * 100:.1f} | {s['f1'] * 100:.1f} | {s['questions']} | "
                         f"{s['mean_prompt_positions']:.0f} | {_saved(s)} | {s['prefill_seconds']:.2f} | "
                         f"{s['total_seconds']:.2f} |")
        if any(s.get("tokens_saved_estimated") for s in self.scores.values()):
            lines += ["", "~ tokens saved by stored contexts are counted with the encoder's (Llama 3) tokens: exact "
                          "for a Llama 3 decoder, an estimate for others."]
        lines += [""] + [f"- {note}" for note in self.notes] if self.notes else []
        return "\n".join(lines) + "\n"

    def save(self, folder: str | Path) -> list[Path]:
        """Write report.json, report.md and report.png (score against prompt positions: needs matplotlib, else
        the plot is left out and `plot_skipped` says why); return the files written."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.json").write_text(json.dumps({"config": self.config, "scores": self.scores,
                                                        "notes": self.notes}, indent=2))
        (folder / "report.md").write_text(self.to_markdown())
        written = [folder / "report.md", folder / "report.json"]
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self.plot_skipped = f"matplotlib is not installed ({install_command('eval')})"
            self.files = written
            return written
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for mode, s in self.scores.items():
            ax.scatter(s["mean_prompt_positions"], s["exact_match"] * 100, s=60, label=mode)
            ax.annotate(f"{mode} {s['exact_match'] * 100:.1f}", (s["mean_prompt_positions"], s["exact_match"] * 100),
                        textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel("mean decoder prompt positions")
        ax.set_ylabel("exact match (%)")
        top = max(s["exact_match"] * 100 for s in self.scores.values())
        ax.set_ylim(0, max(5.0, top * 1.15))  # scores are never negative: the axis starts at 0
        ax.set_title(f"{self.config.get('shots')}-shot QA, {self.config.get('questions')} questions", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "report.png", dpi=120)
        plt.close(fig)
        self.files = written + [folder / "report.png"]
        return self.files


def _saved(s: dict[str, Any]) -> str:
    return f"{'~' if s.get('tokens_saved_estimated') else ''}{s['mean_tokens_saved']:.0f}"
