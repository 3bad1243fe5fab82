"""Start-up checks that need no Ray, run before Ray starts, cheapest first; and starting or joining Ray itself.

A job that cannot run should say so in seconds, with one line naming the URI and the cause, not after the model was
hashed and a cluster joined. The order is by cost:

1. the output is writable (one small write and delete in its bookkeeping folder ``OUT.job``, never under ``OUT``,
   which holds only Parquet: catches an output path inside a file, a missing bucket, a read-only location or
   missing credentials);
2. the model's small JSON files (``config.json``, ``preprocessor_config.json``) exist and parse;
3. the input plans (listing; for Parquet the named columns are checked on the first file's footer), unless the
   output already holds this job's record: a resume reads its frozen plan and never lists the input again;
4. the weights' identity (:func:`model.weights.checkpoint_fingerprint`: the safetensors header, size and version,
   not a read of the weights), last because it is the one check that reads part of a large file. A legacy pickled
   checkpoint (``pytorch_model.bin``) has no header to vet, so it is read once with ``weights_only=True``: one that
   pickles code is refused here, before any actor starts.

Every failure here is a :class:`pipeline.plan.JobError` (or ``InputError`` / ``CheckpointError``) that ``jobs.cli``
maps to exit code 2; failing to start or join Ray is a :class:`ClusterStartError` (exit code 4).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from model.storage import filesystem_for
from pipeline import sources
from pipeline.config import JobConfig

logger = logging.getLogger(__name__)


class ClusterStartError(RuntimeError):
    """Ray could not be started in-process, or the cluster named by ``RAY_ADDRESS`` could not be joined."""


@dataclass
class Preflight:
    """What the checks loaded, so that the job does not load it twice."""

    model_config: Any
    processor: Any
    checkpoint: Any  # model.weights.CheckpointFingerprint: the weights' identity without reading them
    shards: list[sources.Shard] | None  # None when resuming: the frozen plan is used, the input is not listed


def run_preflight(config: JobConfig) -> Preflight:
    """Run every check that needs no Ray, cheapest first (see the module docstring); raise on the first failure."""
    from model.configuration import ViTHybridConfig
    from model.processing import ViTHybridImageProcessor
    from model.weights import checkpoint_fingerprint, load_checkpoint
    from pipeline.layout import JOB_FILE, OutputLayout
    from pipeline.plan import _storage_step

    with _storage_step("cannot write output", config.output):
        layout = OutputLayout(config.output, config.storage_options)  # refuses a bucket's root
        check_output_writable(layout.bookkeeping_uri, config.storage_options)
        resuming = not config.overwrite and layout.book.exists(JOB_FILE)
    with _storage_step("cannot load model", config.model):
        model_config = ViTHybridConfig.from_pretrained(config.model, storage_options=config.storage_options)
        processor = ViTHybridImageProcessor.from_pretrained(config.model, storage_options=config.storage_options)
    shards = None if resuming else plan_input(config)
    with _storage_step("cannot load model", config.model):
        checkpoint = checkpoint_fingerprint(config.model, storage_options=config.storage_options)
        if checkpoint.format == "pytorch":
            # A pickle has no header to vet: read it once here with weights_only=True, so that a checkpoint that
            # pickles code is refused in one line before any actor starts (safetensors needs no such read).
            load_checkpoint(config.model, storage_options=config.storage_options)
    return Preflight(model_config=model_config, processor=processor, checkpoint=checkpoint, shards=shards)


def plan_input(config: JobConfig) -> list[sources.Shard]:
    """The shards of ``--input`` for a new job (a resume uses the plan frozen in ``OUT.job``)."""
    from pipeline.plan import _storage_step

    with _storage_step("cannot read input", config.input):
        return sources.plan_shards(
            config.input,
            format=config.format,
            storage_options=config.storage_options,
            images_per_shard=config.images_per_shard,
            bytes_per_shard=config.bytes_per_shard,
            id_column=config.id_column,
            image_column=config.image_column,
        )


def check_output_writable(output: str, storage_options: dict[str, Any] | None = None) -> None:
    """Write and delete one empty object under ``output``; raises the storage error (OSError) naming the cause.

    The caller points it at the bookkeeping folder (``OUT.job``), so that a probe a kill leaves behind never sits
    among the Parquet files readers glob.
    """
    filesystem, path = filesystem_for(output, storage_options)
    path = path.rstrip("/")
    protocols = filesystem.protocol if isinstance(filesystem.protocol, (tuple, list)) else (filesystem.protocol,)
    if "file" in protocols or "local" in protocols:
        _check_local_parents(output, filesystem, path)
        filesystem.makedirs(path, exist_ok=True)
    probe = f"{path}/_preflight-{uuid.uuid4().hex}"
    filesystem.pipe_file(probe, b"")
    try:
        filesystem.rm_file(probe)
    except FileNotFoundError:
        pass


def _check_local_parents(output: str, filesystem: Any, path: str) -> None:
    current = path
    while current and not filesystem.exists(current):
        parent = current.rpartition("/")[0]
        if parent == current:
            break
        current = parent
    if current and filesystem.isfile(current):
        raise NotADirectoryError(f"output {output} is inside a file ({current}); choose a folder")


# The Ray that a job starts in its own process keeps idle worker processes for a minute instead of Ray's default
# second. A CPU node runs its decode, writer and finalize tasks a few at a time between batches that take ~20 s; with
# the default every such task waited for a fresh worker process (Python, Ray and pyarrow imported again: 1-2.5 s on a
# busy 2-core node, measured with ray.timeline() between an actor's last batch and its writer task). With this the
# last writer of a 32-image job ran within 50 ms of the batch and the job's tail went from ~2.5 s to ~0.4 s.
LOCAL_RAY_SYSTEM_CONFIG: dict[str, Any] = {"idle_worker_killing_time_threshold_ms": 60_000}

# The Ray that a job starts in its own process has no dashboard: its head process and the nine module processes it
# forks import most of Ray's web stack beside the job's own start-up. On a 2-core node ``ray.init()`` took 8.7 s with
# it and 6.3 s without, and the dashboard's processes had used ~4 CPU-seconds 16 s later, while the job's actors
# were importing torch. The benchmark, the demo, the GPU check and the tests' shared Ray start Ray with the same
# options (local_ray_options), so they measure and exercise the Ray a job runs on. For the dashboard, start Ray
# with ``ray start --head`` and run the job with ``RAY_ADDRESS=auto``: it joins that Ray (and its dashboard,
# http://127.0.0.1:8265) instead.
LOCAL_RAY_INCLUDE_DASHBOARD = False


def local_ray_options() -> dict[str, Any]:
    """``ray.init()`` options for a Ray started in this process: the job's own, and the demo's, the benchmark's, the
    GPU check's and the tests', so that they all measure and exercise the Ray a job really runs on.

    The tests' shared Ray once lacked the idle-worker setting: each of their jobs then waited for fresh worker
    processes for its writer tasks, 5-6 s on the 2-core test machine (a 120-image test job on a warm Ray took
    16.7 and 18.2 s without it in two runs, 7.4-13.8 s with it in four).
    """
    return {"include_dashboard": LOCAL_RAY_INCLUDE_DASHBOARD, "_system_config": dict(LOCAL_RAY_SYSTEM_CONFIG)}


def ray_started_here() -> bool:
    """Whether this process started the Ray it is connected to (``ray.init()`` with no cluster to join) rather than
    joined one: that Ray is one node, this machine, whose workers run this interpreter with this process's packages.

    Read from Ray's private ``_global_node`` (the head node object ``ray.init()`` keeps when it started one); a Ray
    that renames it reads as "joined", which only costs the checks a joined cluster gets.
    """
    try:
        from ray._private import worker

        node = worker._global_node
        return node is not None and bool(node.is_head())
    except Exception:  # noqa: BLE001 - a private API: "joined" is the safe answer
        return False


# The project's switches that act inside workers (read tasks, inference actors, writer tasks), read from each
# process's environment: fault-injection points, the placement log of the multi-node tests, the stand-in model and
# the CPU seam for GPU actors. Workers of a Ray started in process inherit the driver's environment; workers of a
# joined cluster have their raylet's, so a driver that joins hands these on through its job's runtime_env
# (joined_cluster_runtime_env). Tests check that this lists every such variable the pipeline reads.
WORKER_SWITCHES: tuple[str, ...] = (
    "VIT_HYBRID_FAILPOINTS",
    "VIT_HYBRID_PLACEMENT_LOG",
    "VIT_HYBRID_STAND_IN_MODEL",
    "VIT_HYBRID_GPU_ACTORS_ON_CPU",
)

# Set by Ray's job manager in the environment of a ``ray job submit`` entrypoint: the submitted runtime_env, which
# Ray already applies to every worker of the job (and refuses to merge with a driver's env_vars of the same name).
_SUBMITTED_JOB_VARIABLE = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def joined_cluster_runtime_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The ``runtime_env`` a driver joining a cluster gives its job: the :data:`WORKER_SWITCHES` set in its own
    environment, so that a failpoint or stand-in model set for a job acts in its workers whether the job started
    Ray or joined one (without it they would be silently inert on a cluster). Empty under ``ray job submit``, whose
    runtime_env already reaches every worker, and when no switch is set: a user's job gets no runtime_env of ours."""
    if _SUBMITTED_JOB_VARIABLE in environ:
        return {}
    switches = {name: environ[name] for name in WORKER_SWITCHES if name in environ}
    return {"env_vars": switches} if switches else {}


def connect_ray(**init_options: Any) -> Any:
    """``ray.init()`` unless Ray is already initialised: joins ``RAY_ADDRESS`` (``ray job submit``) or starts Ray in
    process. Any failure becomes a :class:`ClusterStartError` with the cause and what to check. ``init_options``
    (logging ones: the demo's) go to ``ray.init()`` either way; a joining driver also hands its
    :data:`WORKER_SWITCHES` to its workers (:func:`joined_cluster_runtime_env`)."""
    import os

    import ray

    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS")
    try:
        try:
            ray.init(**local_ray_options(), **init_options)
        except ValueError as error:  # ray.init() found a cluster to join: its config is the cluster's own
            if "_system_config must not be provided" not in str(error):
                raise
            join_options: dict[str, Any] = dict(init_options)
            if runtime_env := joined_cluster_runtime_env(os.environ):
                join_options["runtime_env"] = runtime_env
            ray.init(**join_options)
    except Exception as error:
        where = f"join the Ray cluster at RAY_ADDRESS={address}" if address else "start Ray in this process"
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ClusterStartError(
            f"cannot {where}: {type(error).__name__}: {cause}; check that the cluster is up and the address is right "
            "(or unset RAY_ADDRESS to run locally)"
        ) from error
    return ray
