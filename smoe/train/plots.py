"""Plots of a run (PNG next to its logs): loss curves, and per-layer expert load over time."""

from __future__ import annotations

from pathlib import Path

from smoe.train.logs import read_records


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write run_dir/loss.png and run_dir/expert_load.png from metrics.jsonl; returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    recs = read_records(run_dir)
    train = [r for r in recs if r.get("kind", "train") == "train"]
    evals = [r for r in recs if r.get("kind") == "eval" and "val_loss" in r]
    written = []
    if train or evals:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        if train:
            steps = [r["step"] for r in train]
            ax.plot(steps, [r["ce"] for r in train], label="train cross-entropy")
        if evals:
            ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
            if evals[-1].get("unigram_loss") is not None:
                ax.axhline(evals[-1]["unigram_loss"], color="gray", ls="--", label="unigram baseline")
        ax.set_xlabel("step")
        ax.set_ylabel("nats / token")
        ax.set_title("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        if train:
            ax2.plot(steps, [r["aux"] for r in train], label="load-balancing loss (1 = balanced)")
            ax2.plot(steps, [r["z"] for r in train], label="router z-loss")
            ax2.set_yscale("log")
            ax2.set_xlabel("step")
            ax2.set_title("router losses")
            ax2.legend()
            ax2.grid(alpha=0.3)
        fig.tight_layout()
        written.append(run_dir / "loss.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    with_load = [r for r in train if "load" in r]
    if with_load:
        n_layers, n_exp = len(with_load[0]["load"]), len(with_load[0]["load"][0])
        cols = min(4, n_layers)
        rows = (n_layers + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False, sharey=True)
        steps = [r["step"] for r in with_load]
        for i in range(n_layers):
            ax = axes[i // cols][i % cols]
            for e in range(n_exp):
                ax.plot(steps, [r["load"][i][e] for r in with_load], lw=1, label=f"expert {e}")
            ax.axhline(1 / n_exp, color="black", ls="--", lw=1)
            ax.set_title(f"layer {i}: tokens per expert")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for j in range(n_layers, rows * cols):
            axes[j // cols][j % cols].axis("off")
        axes[0][0].set_ylabel("fraction of token-slots")
        axes[0][0].legend(fontsize=6, ncol=2)
        fig.tight_layout()
        written.append(run_dir / "expert_load.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written
