"""Where things live in a project, and one run folder's layout, so no step finds another's files by
path arithmetic."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

PARAMS_FILE = "params.yaml"
RUNS_ROOT = "runs"  # every output that config can place goes under this project folder
# Data outputs tracked by DVC (dvc.yaml names the same folders).
PROCESSED_DIR = Path("data/processed")
TOKENIZED_DIR = Path("data/tokenized")
STATE_DIR = Path(".local")  # the project's own state: server addresses, locks, the GGUF converter
DATA_DIR = Path(RUNS_ROOT) / "data"  # each data version the runs trained on, by content (runs/data/<out>-<md5>)
MODELS_ENV = "CHAT_DOCTOR_MODELS_DIR"  # where the embedded bases are built (the data experiment's copy points home)


def models_dir() -> Path:
    """Where the embedded bases live: the project's models/, or $CHAT_DOCTOR_MODELS_DIR."""
    return Path(os.environ.get(MODELS_ENV) or "models")


class RunFolder(BaseModel):
    """One training run's folder, `runs/run-<hash>/`: the train step writes checkpoints and the
    adapter, merge the merged model, evaluate the eval report. The hash names the data and settings,
    so a rerun of the same training finds its folder and resumes."""

    model_config = ConfigDict(frozen=True)

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        """The PEFT adapter (safetensors), its tokenizer and the resolved config; then its model card."""
        return self.root / "adapter"

    @property
    def merged(self) -> Path:
        """The adapter folded into the full-precision base (safetensors, tokenizer, model card)."""
        return self.root / "merged"

    @property
    def eval(self) -> Path:
        """The evaluations of this run's adapter, one folder per flow run (MLflow run id)."""
        return self.root / "eval"

    def evaluation(self, mlflow_run_id: str) -> Path:
        """One flow run's evaluation: report.json, samples.jsonl, summary.md, chart.png. Its own
        folder: two runs that train the same adapter compare it with different champions."""
        return self.eval / mlflow_run_id

    @property
    def lock(self) -> Path:
        """Held while a run trains or merges here: two runs with the same data and settings take
        turns, and the second finds the first's adapter and merged model."""
        return self.root / ".lock"

    @property
    def attempt(self) -> Path:
        """What one training attempt runs (config, data, MLflow run): the training processes read it."""
        return self.root / "attempt.json"

    @property
    def micro_batch(self) -> Path:
        """The micro-batch an out-of-memory attempt left for the next one."""
        return self.root / "micro_batch.json"

    def outcome(self, rank: int | str = 0) -> Path:
        """What training process `rank` reported at the end of its attempt."""
        return self.root / ("outcome.json" if str(rank) == "0" else f"outcome-rank{rank}.json")
