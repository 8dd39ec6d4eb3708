"""What the steps hand each other: small typed records of paths, ids and figures (never a model or a
dataset), which Prefect stores as JSON and gives back as the same types on a retry or a cache hit."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Self

from pydantic import BaseModel, ConfigDict

from chat_doctor.core.layout import RunFolder


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Splits(Record):
    """A data step's output: the train and eval splits and its report, in one folder."""

    train: Path
    eval: Path
    report: Path
    suffix: ClassVar[str]

    @classmethod
    def at(cls, folder: Path) -> Self:
        return cls(
            train=folder / f"train{cls.suffix}", eval=folder / f"eval{cls.suffix}", report=folder / "report.json"
        )


class Processed(Splits):
    """The sample step's output: cleaned rows (JSON Lines), and what happened to the others."""

    suffix = ".jsonl"


class Tokenized(Splits):
    """The tokenize step's output: the splits as Arrow streams of input_ids and labels."""

    suffix = ".arrow"


class EvalRows(Record):
    """The eval-source step's output: the cleaned `evaluate.source` rows."""

    rows: Path
    report: Path


class DataMade(Record):
    """The data step's output: the run's DVC experiment and its data, read into folders of their own."""

    processed: Processed
    tokenized: Tokenized
    experiment: str  # `dvc exp show` lists it, `dvc exp apply` brings it back
    rev: str  # the experiment's commit
    hashes: dict[str, str]  # {"data/processed": md5, "data/tokenized": md5}, from its dvc.lock

    @property
    def tags(self) -> dict[str, str]:
        """Lineage tags for the MLflow run and the registered version."""
        return {
            **{f"dvc.{path}": md5 for path, md5 in self.hashes.items()},
            "dvc.experiment": self.experiment,
            "dvc.experiment_rev": self.rev,
        }


class DataVersion(Record):
    """The version-data step's output: the data's lineage tags (`dvc.data/processed`: md5, the DVC
    experiment and its commit), once the data is on the DVC remote."""

    tags: dict[str, str]


class Trained(Record):
    """The train step's output: the run folder holding the adapter, and the checkpoint resumed from."""

    run: RunFolder
    resumed_from: str = ""


class Merged(Record):
    """The merge step's output: the run folder now holding the merged model, and how well it kept
    the adapter's effect."""

    run: RunFolder
    logit_error: float
    adapter_effect_kept: float


class Evaluated(Record):
    """The evaluate step's output: its files in the run's eval folder."""

    report: Path
    samples: Path
    summary: Path
    chart: Path


class Registered(Record):
    """The register step's output: the new version, its aliases and why it was (not) promoted."""

    name: str
    version: int
    aliases: list[str]
    uri: str
    promotion: str


class Exported(Record):
    """The export step's output: the GGUF files and Modelfile written (none without a champion)."""

    files: list[Path] = []
