"""Perplexity curves from a knnlm-sweep JSON: vs λ, vs k and vs T, for each split (matplotlib, PNG)."""
import logging
import os

import matplotlib

matplotlib.use("Agg")  # files only: no display on CI machines
logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq sets the root logger to DEBUG-friendly levels
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_curves(sweep, splits, tuned, k, out_dir):
    """tuned: {kind: (temp, lmbda, ppl)} chosen on the first split. Returns the PNG file names."""
    s = sweep["settings"]
    ki = s["ks"].index(k)
    files = []
    for axis, xlabel in (("lmbda", "λ"), ("k", "k"), ("temp", "temperature T")):
        if axis == "temp" and len(s["temps"]) < 2:
            continue
        fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 3.6), squeeze=False)
        for ax, row, split in zip(axes[0], sweep["logs"], splits):
            for kind, style in (("exact", "-o"), ("approx", "--s")):
                temp, lmbda, _ = tuned[kind]
                grid = np.array(row["ppl"][kind])  # (K, T, L)
                ti, li = s["temps"].index(temp), s["lmbdas"].index(lmbda)
                if axis == "lmbda":
                    x, y = s["lmbdas"], grid[ki, ti, :]
                elif axis == "k":
                    x, y = s["ks"], grid[:, ti, li]
                else:
                    x, y = s["temps"], grid[ki, :, li]
                ax.plot(x, y, style, ms=3, label=f"kNN-LM, {kind} distances")
            ax.axhline(row["base_ppl"], color="gray", lw=1, label="base LM")
            ax.set(title=f"{split}", xlabel=xlabel, ylabel="perplexity")
            if axis in ("k", "temp"):
                ax.set_xscale("log", base=2 if axis == "k" else 10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle({"lmbda": f"perplexity vs λ (k={k}, T tuned on {splits[0]})",
                      "k": f"perplexity vs k (λ and T tuned on {splits[0]} at k={k})",
                      "temp": f"perplexity vs T (k={k}, λ tuned on {splits[0]})"}[axis], fontsize=10)
        fig.tight_layout()
        name = f"ppl_vs_{axis}.png"
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        files.append(name)
    return files
