"""The MLflow model registry as chat-doctor uses it: the promotion rule, aliases, versions by run.

Each version of `chat-doctor-adapter` carries its lineage and eval figures as tags
(`eval.tuned.loss`, `eval.base.rougeL`, ..., `eval.key` = which rows and settings produced them) and
the promotion decision with its reason (`promotion.decision`, `promotion.reason`; changes made by
hand go to `promotion.manual`). `candidate` is the newest
version; `champion` moves only by the rule in `decide_promotion` or by hand. A version is created
with `registration: incomplete` and marked `complete` only once its tags and card are in place;
an incomplete one (a registration cut short by a crash or a lost store) is never resolved, and the
retry of the run that made it deletes it. `chat-doctor-models` (chat_doctor/serving/cli.py) lists and
moves them by hand.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from chat_doctor.core.files import file_lock
from chat_doctor.evaluation.metrics import METRICS
from chat_doctor.tracking.mlflow_runs import client, local_store, tracking_uri

REGISTRATION = "registration"  # version tag: `incomplete` until everything but the aliases is in place


def is_complete(version) -> bool:
    # Only our own registration marks a version incomplete; one without the tag (made by hand) is complete.
    return version.tags.get(REGISTRATION) != "incomplete"


def versions_of_run(name: str, run_id: str) -> list:
    """The versions of `name` that the MLflow run `run_id` registered, oldest first."""
    found = client().search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return sorted(found, key=lambda v: int(v.version))


def figure_tags(model: str, figures: dict[str, float]) -> dict[str, str]:
    # Full precision (repr): a champion's figures read back from its tags must compare equal to the
    # same figures computed again, or a retrained copy of the champion would "beat" it by rounding.
    return {f"eval.{model}.{metric}": repr(float(figures[metric])) for metric in METRICS if metric in figures}


def figures_from_tags(tags: dict[str, str], model: str = "tuned") -> dict[str, float]:
    prefix = f"eval.{model}."
    return {key.removeprefix(prefix): float(value) for key, value in tags.items() if key.startswith(prefix)}


def _better(a: float, b: float, higher_is_better: bool, margin: float) -> bool:
    return a - b > margin if higher_is_better else b - a > margin


def decide_promotion(
    metric: str,
    tuned: dict[str, float],
    base: dict[str, float],
    champion: dict[str, float] | None,
    champion_version: int | None,
    min_improvement: float = 0.0,
) -> tuple[bool, str]:
    """(promote?, why). The version must beat the base and the current champion on `metric`."""
    higher = METRICS[metric].higher_is_better
    if higher is None:
        raise ValueError(f"registry.promote_metric = {metric}: a reported figure, not one that ranks models")
    direction = METRICS[metric].direction
    value = tuned[metric]
    if not _better(value, base[metric], higher, min_improvement):
        return False, f"{metric} {value:.4g} does not beat the base's {base[metric]:.4g} ({direction} is better)"
    if champion is None:
        return True, f"{metric} {value:.4g} beats the base's {base[metric]:.4g}; there was no champion"
    if metric not in champion:
        return False, f"champion v{champion_version} has no {metric} figure on these rows; compare by hand"
    if not _better(value, champion[metric], higher, min_improvement):
        return False, (
            f"{metric} {value:.4g} does not beat champion v{champion_version}'s {champion[metric]:.4g} "
            f"({direction} is better, margin {min_improvement})"
        )
    return True, (
        f"{metric} {value:.4g} beats the base's {base[metric]:.4g} "
        f"and champion v{champion_version}'s {champion[metric]:.4g}"
    )


def aliased_version(name: str, alias: str):
    """The ModelVersion behind `alias`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def champion_record(name: str, alias: str) -> dict | None:
    """What evaluation needs to know about the current champion, or None when there is none."""
    version = aliased_version(name, alias)
    if version is None:
        return None
    tags = version.tags
    return {
        "version": int(version.version),
        "eval_key": tags.get("eval.key"),
        "base_model": tags.get("base_model"),
        "base_revision": tags.get("base_revision"),
        "figures": figures_from_tags(tags),
    }


def resolve(name: str, spec: str):
    """A version number, `vN` or an alias -> ModelVersion; a clear error when there is none."""
    number = spec.removeprefix("v")
    if number.isdigit():
        from mlflow.exceptions import MlflowException

        try:
            version = client().get_model_version(name, number)
        except MlflowException:
            raise SystemExit(f"{name}: no version {number}") from None
    else:
        version = aliased_version(name, spec)
        if version is None:
            raise SystemExit(f"{name}: no version has the alias {spec!r}")
    if not is_complete(version):
        raise SystemExit(
            f"{name} v{version.version}: its registration was cut short (tag {REGISTRATION}: incomplete); "
            "retry the flow run that made it, which removes it"
        )
    return version


def download_adapter(name: str, version: int | str, dst: Path) -> Path:
    """The version's PEFT adapter folder (adapter_config.json + weights), downloaded under `dst`."""
    import mlflow

    client()  # sets the tracking URI
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dst)))
    adapter = local / "peft"
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{name} v{version}: no PEFT adapter in its artifacts ({local})")
    return adapter


def promote_by_hand(name: str, alias: str, version: int | str, reason: str) -> None:
    mlflow_client = client()
    mlflow_client.set_registered_model_alias(name, alias, str(version))
    mlflow_client.set_model_version_tag(name, str(version), "promotion.manual", f"{alias} by hand: {reason}")


def demote_by_hand(name: str, alias: str) -> str:
    """Remove `alias`; return the version it pointed at."""
    version = resolve(name, alias).version
    mlflow_client = client()
    mlflow_client.delete_registered_model_alias(name, alias)
    mlflow_client.set_model_version_tag(name, version, "promotion.manual", f"{alias} removed by hand")
    return version


@contextmanager
def registry_turn(name: str) -> Iterator[None]:
    """One run at a time evaluates against the champion and registers (`name`'s promotion decision),
    so every version is judged against all those registered before it. Other runs wait here.

    A local store: a lock file beside it (every process on this machine). A tracking server: a
    Prefect global concurrency limit of 1, on the Prefect server the runs report to."""
    waiting = f"waiting for another run's evaluate-and-register of {name}"
    store = local_store(tracking_uri())
    if store is not None:
        with file_lock(store.with_name(store.name + ".registry-lock"), waiting):
            yield
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    limit = f"chat-doctor-registry-{name}"
    with get_client(sync_client=True) as prefect:
        try:
            prefect.read_global_concurrency_limit_by_name(limit)
        except ObjectNotFound:
            with suppress(ObjectAlreadyExists):  # another run made it first
                prefect.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
    with concurrency(limit, occupy=1, strict=True):
        yield
