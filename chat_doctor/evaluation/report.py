"""Views of an evaluation report: the markdown summary (Prefect artifact, model card) and the chart."""

from __future__ import annotations

from pathlib import Path

from chat_doctor.core.files import atomic_path
from chat_doctor.evaluation.metrics import METRICS, RANKED

COLUMNS = tuple(METRICS)


def gate_models(report: dict) -> dict[str, dict]:
    """{model: figures} on the rows promotion is judged on."""
    return report["sets"][report["gate_set"]]["models"]


def figures_table(models: dict[str, dict]) -> str:
    head = "| model | " + " | ".join(COLUMNS) + " |\n" + "|---" * (len(COLUMNS) + 1) + "|\n"
    rows = [
        f"| {name} | " + " | ".join(f"{figures[c]:.4g}" if c in figures else "-" for c in COLUMNS) + " |"
        for name, figures in models.items()
    ]
    return head + "\n".join(rows) + "\n"


def markdown_summary(report: dict, samples: list[dict], shown: int = 3) -> str:
    """Figures per eval set, how they were made, and a few answers side by side."""
    generation = report["generation"]
    parts = [
        f"## Evaluation: base `{report['base_model']}` vs tuned\n",
        f"Greedy, repetition_penalty {generation['repetition_penalty']}, "
        f"max_new_tokens {generation['max_new_tokens']}. Promotion is judged on `{report['gate_set']}`.\n",
        "; ".join(f"{m.name}: {m.description} ({m.direction})" for m in METRICS.values()) + ".\n",
    ]
    for name, result in report["sets"].items():
        parts.append(f"### {name}: {result['rows']} rows for loss, {result['generated']} answered\n")
        parts.append(figures_table(result["models"]))
    for sample in samples[:shown]:
        parts.append(f"\n**Query ({sample['set']}):** {sample['query'][:300]}\n")
        parts.append(f"- reference: {sample['reference'][:300]}")
        for model in ("base", "tuned"):
            answer = sample[model]
            cut = "" if answer["stopped"] else " [no EOS before the limit]"
            parts.append(f"- {model}: {answer['answer'][:300]}{cut}")
    return "\n".join(parts) + "\n"


def plot_chart(report: dict, path: Path) -> None:
    """One bar panel per metric, a bar per model, on the rows promotion is judged on."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    models = gate_models(report)
    metrics = list(RANKED)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3 * len(metrics), 3.2))
    for ax, metric in zip(axes, metrics, strict=True):
        names = [name for name in models if metric in models[name]]
        ax.bar(names, [models[name][metric] for name in names], color=["#999999", "#2a7ab0", "#d08c2a"][: len(names)])
        ax.set_title(f"{metric} ({METRICS[metric].direction} is better)", fontsize=9)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"{report['gate_set']}: base vs tuned", fontsize=10)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
