"""The numerics policy of inference, in one record: what the fingerprint records and what the actor applies.

Why it exists. On GPUs torch's defaults are not one policy: cuDNN convolutions run float32 in TF32 (10-bit
mantissa) by default while cuBLAS matrix products do not, so a "float32" GPU run silently differs from a CPU run
under the same fingerprint, by more than the 1e-4 this project holds against the reference. The policy makes the
choice explicit, applies it to both kinds of kernel alike, and travels in the job fingerprint, so a job is never
resumed under another policy.

* ``allow_tf32`` (default off): TF32 for float32 convolutions AND matrix products, or for neither. Exact first:
  turn it on only to trade float32 accuracy for speed on purpose; bfloat16 jobs (the GPU default) are unaffected.
* ``weight_standardization = "float32"``: BiT's standardised convolution weights are computed from the float32
  weights and cast once (see :class:`model.modeling.WeightStandardizedConv2d`), rather than standardising weights
  that were first rounded to bfloat16. Recorded so that a change of this rule changes the fingerprint.
* ``cudnn_benchmark`` (default on, CUDA only): let cuDNN time its algorithms for each input shape once. Batches have
  fixed shapes in the pipeline, so the tuning is paid once per actor.

Example::

    policy = numerics_policy("bfloat16")
    policy.apply()            # sets torch.backends flags for this process (an inference actor)
    fingerprint["numerics"] = policy.to_dict()
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

WEIGHT_STANDARDIZATION = "float32"  # computed in float32 before any cast to a lower precision


@dataclass(frozen=True)
class NumericsPolicy:
    """How floating-point work is done on the device; frozen, so one record describes a whole job."""

    dtype: str  # compute dtype: float32, bfloat16 or float16
    allow_tf32: bool = False
    weight_standardization: str = WEIGHT_STANDARDIZATION
    cudnn_benchmark: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def apply(self) -> None:
        """Set torch's process-wide backend flags to this policy (call once per process, before the first forward).

        Uses the flags that have existed since torch 1.7 (``allow_tf32`` for cuBLAS and cuDNN) and sets both, never the
        newer ``fp32_precision`` API: torch >= 2.9 raises when the two APIs are mixed, and other libraries still read
        the old flags.
        """
        import torch

        torch.backends.cuda.matmul.allow_tf32 = self.allow_tf32
        torch.backends.cudnn.allow_tf32 = self.allow_tf32
        torch.backends.cudnn.benchmark = self.cudnn_benchmark


def numerics_policy(dtype: str, *, allow_tf32: bool = False) -> NumericsPolicy:
    """The policy of a job computing in ``dtype`` (a torch dtype name such as ``"bfloat16"``)."""
    return NumericsPolicy(dtype=dtype, allow_tf32=allow_tf32)


def current_backend_flags() -> dict[str, Any]:
    """What torch's flags are now (for reports: the policy says what was asked, this what is in force)."""
    import torch

    flags: dict[str, Any] = {}
    for name, read in (
        ("cuda_matmul_allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32),
        ("cudnn_allow_tf32", lambda: torch.backends.cudnn.allow_tf32),
        ("cudnn_benchmark", lambda: torch.backends.cudnn.benchmark),
        ("float32_matmul_precision", torch.get_float32_matmul_precision),
    ):
        try:
            flags[name] = read()
        except RuntimeError as error:  # torch >= 2.9 refuses to read flags set through a mix of its two APIs
            flags[name] = f"unreadable: {str(error).splitlines()[0][:120]}"
    return flags
