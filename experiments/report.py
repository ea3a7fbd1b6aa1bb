"""The outputs of a grid: `results.jsonl` (one JSON line per finished run, written as it ends),
the markdown table that puts the configurations side by side, and the plots."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import AblateConfig, resolved
from .model import ModelConfig

def read_results(path: Path) -> list[dict]:
    """The records of a results.jsonl; a line cut short by a killed run is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def append_result(path: Path, record: dict):
    line = json.dumps(record) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None
    return mean, std


def _cell(values, digits=3):
    mean, std = _mean_std(values)
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _fmt_int(n):
    return f"{n / 1e6:.2f}M" if n >= 1e6 else (f"{n / 1e3:.1f}k" if n >= 1e4 else str(n))


def _blocks(model: ModelConfig) -> str:
    return f"{model.n_layers} blocks of memory" + (" + MLP" if model.mlp_ratio > 0 else " only")


def markdown_table(config: AblateConfig, records: list[dict]) -> str:
    by = {}
    for r in records:
        by.setdefault((r["task"], r["rule"], r["memory"]), []).append(r)
    lines = [f"# memplug ablation: {config.name}", ""]
    for task_name, task in config.tasks.items():
        model, train = resolved(config, task_name)
        found = [r for r in records if r["task"] == task_name]
        if not found:
            continue
        seeds = len(config.seeds)
        state = {m: next((r["state_numel"] for r in found if r["memory"] == m), None) for m in config.memories}
        head = [f"{m} ({_fmt_int(state[m])} state)" if state[m] else m for m in config.memories]
        if task_name == "mqar":
            lines += ["## MQAR: accuracy on the queried values (higher is better)", "",
                      f"{task.num_pairs} key-value pairs in {task.seq_len} tokens, vocabulary {task.vocab_size}; "
                      f"{train.steps} steps of {train.batch_size} sequences; {_blocks(model)}, d_model "
                      f"{model.d_model}, {model.num_heads} heads of {model.head_k_dim}x{model.head_v_dim}; "
                      f"m = {model.num_slots}, R = {model.topk}; mean over {seeds} seed(s). State: numbers per "
                      "sequence, all layers.", ""]
            metric = lambda rs: _cell([r["accuracy"] for r in rs])
        else:
            L, E = task.seq_len, task.extrapolate
            lines += [f"## Byte LM: held-out loss so far (nats/byte) at the training length L = {L} / at {E}L "
                      "(lower is better)", "",
                      f"Corpus: {found[0].get('corpus', {}).get('source', task.path)}; {train.steps} steps of "
                      f"{train.batch_size} x {L} bytes; {_blocks(model)}, d_model {model.d_model}; "
                      f"m = {model.num_slots}, R = {model.topk}; mean over {seeds} seed(s).", ""]
            metric = lambda rs: (_cell([r["eval_loss"] for r in rs]) + " / "
                                 + _cell([r.get(f"loss@{E}L") for r in rs]))
        lines.append("| rule | " + " | ".join(head) + " |")
        lines.append("|---|" + "---|" * len(head))
        for rule in config.rules:
            cells = [metric(by[(task_name, rule, m)]) if (task_name, rule, m) in by else "—" for m in config.memories]
            lines.append(f"| {rule} | " + " | ".join(cells) + " |")
        lines.append("")
        sizes = sorted({int(p) for r in found for p in r.get("accuracy_by_pairs", {})})
        if len(sizes) > 1:
            lines += ["Accuracy by number of key-value pairs in the test sequences (trained on "
                      f"{task.train_num_pairs or [task.num_pairs]}):", "",
                      "| rule | pairs | " + " | ".join(config.memories) + " |",
                      "|---|---|" + "---|" * len(config.memories)]
            for rule in config.rules:
                for p in sizes:
                    cells = [_cell([r.get("accuracy_by_pairs", {}).get(str(p)) for r in by.get((task_name, rule, m), [])])
                             for m in config.memories]
                    lines.append(f"| {rule} | {p} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["## Runs", "",
              "| run | params | state | train loss | eval loss | accuracy | tokens/s | unused slots | routing entropy | seconds |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: r["run"]):
        routing = r.get("routing") or []
        unused = _cell([x["unused_fraction"] for x in routing], 2) if routing else "—"
        entropy = _cell([x["entropy"] for x in routing], 2) if routing else "—"
        lines.append(f"| {r['run']} | {_fmt_int(r['params'])} | {_fmt_int(r['state_numel'])} | {r['train_loss']:.3f} | "
                     f"{r['eval_loss']:.3f} | {r['accuracy']:.3f} | {r['tokens_per_s']:.0f} | {unused} | {entropy} | "
                     f"{r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


MARKERS = {"backbone": "o", "fm_dense": "s", "fm_sparse": "^", "mom": "D"}


def plot(config: AblateConfig, records: list[dict], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = {m: f"C{i}" for i, m in enumerate(config.memories)}
    for task_name in config.tasks:
        found = [r for r in records if r["task"] == task_name]
        if not found:
            continue
        rules = [rule for rule in config.rules if any(r["rule"] == rule for r in found)]
        fig, axes = plt.subplots(1, len(rules), figsize=(3.6 * len(rules) + 1.6, 3.6), squeeze=False,
                                 sharey=True, constrained_layout=True)
        for ax, rule in zip(axes[0], rules):
            for memory in config.memories:
                rs = [r for r in found if r["rule"] == rule and r["memory"] == memory]
                if not rs:
                    continue
                if task_name == "mqar":
                    mean, std = _mean_std([r["accuracy"] for r in rs])
                    # configurations of equal state (fm_dense, fm_sparse) side by side, not on top
                    state = rs[0]["state_numel"]
                    same = [m for m in config.memories
                            if any(r["memory"] == m and r["rule"] == rule and r["state_numel"] == state for r in found)]
                    x = state * 2 ** (0.15 * (same.index(memory) - (len(same) - 1) / 2))
                    ax.errorbar([x], [mean], yerr=[std or 0], fmt=MARKERS.get(memory, "o"),
                                color=colors[memory], markersize=8, capsize=3, label=memory)
                    ax.annotate(f"{mean:.2f}", (x, mean), textcoords="offset points", xytext=(0, 8),
                                ha="center", fontsize=7, color=colors[memory])
                else:
                    curves = torch.tensor([r["loss_by_position"] for r in rs]).mean(0)
                    ax.plot(torch.arange(1, len(curves) + 1), curves, color=colors[memory], label=memory)
            ax.set_title(rule)
            ax.grid(alpha=0.3)
            if task_name == "mqar":
                ax.set_xscale("log", base=2)
                ax.set_xlabel("recurrent state (numbers per sequence)")
                ax.set_ylim(-0.02, 1.02)
            else:
                L = config.tasks[task_name].seq_len
                ax.axvline(L, color="gray", ls="--", lw=1)
                ax.text(L, 0.98, " train length", transform=ax.get_xaxis_transform(), va="top", fontsize=8,
                        color="gray")
                ax.set_xscale("log", base=2)
                ax.set_xlabel("position (bytes)")
        if task_name == "mqar":
            axes[0][0].set_ylabel("MQAR accuracy")
            name = "accuracy_vs_state.png"
        else:
            axes[0][0].set_ylabel("held-out loss so far (nats/byte)")
            name = "lm_loss_by_position.png"
        axes[0][-1].legend(fontsize=8, loc="best")
        fig.suptitle(f"{config.name}: {'MQAR accuracy vs state size' if task_name == 'mqar' else 'byte LM loss by position'}")
        path = out / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
        if task_name == "mqar":
            path = _plot_by_pairs(plt, config, found, rules, colors, out)
            if path is not None:
                written.append(path)
    return written


def _plot_by_pairs(plt, config, found, rules, colors, out):
    """MQAR accuracy against the number of key-value pairs (Zoology's view), one panel per rule."""
    sizes = sorted({int(p) for r in found for p in r.get("accuracy_by_pairs", {})})
    if len(sizes) < 2:
        return None
    fig, axes = plt.subplots(1, len(rules), figsize=(3.6 * len(rules) + 1.6, 3.6), squeeze=False, sharey=True,
                             constrained_layout=True)
    for ax, rule in zip(axes[0], rules):
        for memory in config.memories:
            rs = [r for r in found if r["rule"] == rule and r["memory"] == memory]
            if not rs:
                continue
            means = [_mean_std([r.get("accuracy_by_pairs", {}).get(str(p)) for r in rs])[0] for p in sizes]
            means = [float("nan") if m is None else m for m in means]
            ax.plot(sizes, means, marker=MARKERS.get(memory, "o"), color=colors[memory], label=memory)
        ax.set_title(rule)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(p) for p in sizes])
        ax.set_xlabel("key-value pairs in the sequence")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy")
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle(f"{config.name}: MQAR accuracy by number of pairs")
    path = out / "mqar_accuracy_by_pairs.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
