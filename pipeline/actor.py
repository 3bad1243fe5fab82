"""The inference stage as Ray Data runs it: the callable class the driver names, its settings and its pool's keywords.

Why apart from :mod:`pipeline.infer`: the driver only names the class (``map_batches(InferenceActor, ...)``) and sizes
its pool; it never computes. :mod:`pipeline.infer`, where the model runs, imports torch, and torch's import cost every
job's driver 1.7 s of CPU on its start-up path (and every job that fails its checks before Ray starts, the same 1.7 s
more before it could say why). This module imports no torch: an actor's process imports :mod:`pipeline.infer` when
Ray Data builds the class there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from pipeline.infer import BatchInference

# Calls of one actor Ray Data runs at once: one computes while another prepares its batch or builds its rows. Two is
# enough to hide host work shorter than the compute; each extra call holds one more batch in the actor's memory.
CONCURRENT_CALLS = 2


@dataclass(frozen=True)
class InferenceSettings:
    """Everything an actor needs to build its model; small and picklable, sent once per actor."""

    model_uri: str
    task: str  # "classify" or "embed"
    top_k: int = 5
    dtype: str = "auto"
    device: str = "auto"
    embedding_dtype: str = "float32"
    normalize_embeddings: bool = False
    torch_threads: int | None = None
    compute_lanes: int = 1  # model calls that compute at once: 1 on a GPU (one device), CPU: the sizing's calls
    channels_last: bool = True
    batch_size: int | None = None  # rows per model call when pad_to_batch; larger batches are run in pieces
    pad_to_batch: bool = False  # fixed shapes: pad every model call to batch_size rows
    compile: bool = False  # torch.compile the model (shapes fixed by padding, so it compiles once)
    decode_in_actor: bool = False  # batches carry file bytes ("data"); decode them here, in decode_threads threads
    decode_threads: int = 1
    fast_decode: bool = True
    exif_orientation: bool = True
    max_image_pixels: int = 89_478_485
    storage_options: dict[str, Any] | None = field(default=None, repr=False)  # may hold credentials

    def __post_init__(self) -> None:
        if self.pad_to_batch and not self.batch_size:
            raise ValueError("pad_to_batch needs batch_size: the number of rows every model call is padded to")


class InferenceActor:
    """Ray Data callable class of the inference stage: builds a :class:`pipeline.infer.BatchInference` (the model,
    loaded once) when the actor starts, and hands it every batch."""

    def __init__(self, settings: InferenceSettings) -> None:
        from pipeline.infer import BatchInference

        self.inference: BatchInference = BatchInference(settings)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return self.inference(batch)


def actor_pool_arguments(use_gpu: bool = True, *, cpu_calls: int = 1) -> dict[str, Any]:
    """The ``ActorPoolStrategy`` keywords for the inference pool.

    GPU actors take :data:`CONCURRENT_CALLS` calls at once, so that host work overlaps compute (:mod:`pipeline.infer`).
    A CPU actor takes ``cpu_calls`` batches at once, each computed in its own thread (the node's cores as concurrent
    single-threaded model calls, :func:`pipeline.cpu.size_cpu_node`), and is sent no more than it computes: its
    batches reach the model without a copy, so there is no host work to hide, and a batch queued behind running ones
    (Ray Data queues up to twice the concurrency by default) would idle while another actor, still starting or just
    finished, waits for work. Measured on a 2-core node with two one-thread actors: with two calls queued per actor
    one actor took both batches of a 32-image job and the node ran at 1.25 of its 2 cores.
    """
    if not use_gpu:
        calls = max(1, cpu_calls)
        return {"max_concurrent_calls_per_actor": calls, "max_tasks_in_flight_per_actor": calls,
                "enable_true_multi_threading": calls > 1}
    return {"max_concurrent_calls_per_actor": CONCURRENT_CALLS, "enable_true_multi_threading": True}
