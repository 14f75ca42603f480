"""The report page's figures, drawn with matplotlib and returned as PNG bytes (the page inlines them)."""

from __future__ import annotations

import io


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def curves(history: list[dict], metric: str) -> bytes:
    """Training loss by epoch, and the validation loss and `metric` (e.g. accuracy) at each evaluation."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    train = [(h["epoch"], h["loss"]) for h in history if "loss" in h and "epoch" in h]
    evals = [h for h in history if f"eval_{metric}" in h]
    if train:
        axes[0].plot(*zip(*train))
    if evals:
        epochs = [h["epoch"] for h in evals]
        axes[1].plot(epochs, [h.get("eval_loss") for h in evals], marker="o")
        axes[2].plot(epochs, [h[f"eval_{metric}"] for h in evals], marker="o")
    for ax, title in zip(axes, ("training loss", "validation loss", f"validation {metric}")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
    return _png(fig)


def reliability(before: dict, after: dict | None, temperature: float | None) -> bytes:
    """Reliability diagrams: each bin's accuracy against its mean confidence, before and after the temperature; a
    calibrated model's bars reach the diagonal. Bars' widths are the bins', their shade the bin's share of images."""
    plt = _pyplot()
    panels = [("before", before)] + ([("after", after)] if after else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (name, measured) in zip(axes[0], panels):
        bins = [b for b in measured.get("bins", []) if b.get("count")]
        total = sum(b["count"] for b in bins) or 1
        for b in bins:
            width = b["upper"] - b["lower"]
            ax.bar(b["lower"], b["accuracy"], width=width, align="edge", edgecolor="black",
                   color=(0.2, 0.4, 0.8, 0.25 + 0.75 * b["count"] / total))
            ax.plot([b["lower"] + width / 2], [b["confidence"]], "r_", markersize=12)
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        label = "after temperature" + (f" {temperature:.2f}" if temperature else "") if name == "after" else "before"
        ax.set_title(f"{label}: ECE {measured.get('ece', float('nan')):.4f}")
    return _png(fig)
