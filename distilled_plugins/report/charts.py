"""The report's charts: matplotlib figures inlined in the page as SVG (``None`` where there is nothing to draw)."""

from __future__ import annotations

import io


def _svg(fig) -> str:
    buffer = io.StringIO()
    fig.tight_layout()
    fig.savefig(buffer, format="svg")
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog: the SVG sits inside the HTML


def _figure(width: float = 6.4, height: float = 3.2):
    """A figure of matplotlib's object API, not pyplot's global state: the API server renders reports of several
    requests at once, in threads."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def funnel_chart(funnel: list[tuple[str, int | None]]) -> str | None:
    rows = [(name, n) for name, n in funnel if n is not None and name != "trained tokens"]
    if not rows:
        return None
    fig, ax = _figure(6.4, 0.5 + 0.45 * len(rows))
    ax.barh([n for n, _ in rows][::-1], [v for _, v in rows][::-1], color="#4c72b0")
    for i, (_, v) in enumerate(rows[::-1]):
        ax.text(v, i, f" {v:,}", va="center", fontsize=9)
    ax.set_title("Rows through the stages")
    ax.margins(x=0.15)
    return _svg(fig)


def length_chart(lengths: list[int], max_tokens: int | None, seq_length: int | None) -> str | None:
    if not lengths:
        return None
    fig, ax = _figure()
    ax.hist(lengths, bins=min(40, max(5, len(set(lengths)))), color="#55a868")
    for value, label, color in ((max_tokens, "max_tokens", "#c44e52"), (seq_length, "seq_length", "#8172b2")):
        if value:
            ax.axvline(value, color=color, linestyle="--", linewidth=1, label=f"{label} {value:,}")
    ax.set_xlabel("completion tokens (teacher's usage)")
    ax.set_ylabel("completions")
    ax.set_title("Teacher completion lengths")
    ax.legend(fontsize=8)
    return _svg(fig)


def loss_chart(steps: list[dict]) -> str | None:
    if not steps:
        return None
    fig, ax = _figure()
    xs = [(s["epoch"] - 1) * s["steps_per_epoch"] + s["step"] for s in steps]
    ax.plot(xs, [s["loss"] for s in steps], marker=".", color="#4c72b0")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (worker 0)")
    ax.set_title("Fine-tuning loss")
    return _svg(fig)


def level_chart(evaluation: dict, previous: dict | None) -> str | None:
    levels = evaluation.get("by_level") or {}
    if not levels:
        return None
    fig, ax = _figure()
    names = list(levels)
    xs = range(len(names))
    width = 0.4 if previous else 0.8
    ax.bar(
        [x - (width / 2 if previous else 0) for x in xs],
        [levels[n]["accuracy"] for n in names],
        width,
        label="this run",
    )
    if previous:
        before = previous["evaluation"].get("by_level", {})
        ax.bar(
            [x + width / 2 for x in xs],
            [before.get(n, {}).get("accuracy", 0) for n in names],
            width,
            label=f"previous ({previous['run_id']})",
            color="#999999",
        )
        ax.legend(fontsize=8)
    ax.set_xticks(list(xs), [f"level {n}" for n in names])
    ax.set_ylabel("accuracy %")
    ax.set_ylim(0, 100)
    ax.set_title(f"MATH-500 by level (pass@1 {evaluation['pass@1']:.1f}%)")
    return _svg(fig)


def acceptance_chart(column: str, values: dict) -> str | None:
    if len(values) < 2:
        return None
    fig, ax = _figure(6.4, 0.6 + 0.35 * len(values))
    names = list(values)
    ax.barh(names[::-1], [100 * values[n]["accepted"] for n in names][::-1], color="#dd8452")
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of rows kept by rejection sampling")
    ax.set_title(f"Acceptance by {column}")
    return _svg(fig)
