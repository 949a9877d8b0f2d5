"""liger-kernel's fused Triton kernels for an LLM's RMSNorm, SwiGLU MLP and rotary embedding, on CUDA.

Each of these is a handful of small elementwise kernels per layer in transformers' PyTorch code (RMSNorm alone: a
cast, a square, a mean, an rsqrt, two multiplies, forward and backward); liger fuses each into one kernel each way,
as TRL, Axolotl and LLaMA-Factory do with `use_liger_kernel`. A LoRA step on an 8B model launches fewer kernels and
keeps fewer activations. LoRA is unaffected: the fused MLP still calls the (LoRA-wrapped) gate/up/down projections.
The LM head's fused linear cross-entropy is studio/llm_loss.py's.

CUDA only: liger is Triton, pinned in requirements-nodeps.txt (`make` installs it without its dependencies: triton
comes with CUDA torch builds), imported here lazily and only on CUDA. The CPU keeps transformers' own modules.
"""

from __future__ import annotations

import torch


def apply_fused_kernels(model: torch.nn.Module, device: torch.device) -> str | None:
    """Patch the transformers model `model` in place on CUDA; returns a line for the log, or None on other devices."""
    if device.type != "cuda":
        return None
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as exc:  # not installed, or no triton (a CUDA torch build without it, e.g. on Windows)
        return (f"liger-kernel is not usable here ({exc}): RMSNorm, SwiGLU and RoPE run as separate PyTorch ops "
                "(`make` installs it: pip install --no-deps -c constraints.txt -r requirements-nodeps.txt).")
    # Unsupported model types are left as they are (liger logs which); the loss stays studio/llm_loss.py's.
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    return f"Fused kernels (liger-kernel) for {model.config.model_type}: RMSNorm, SwiGLU, RoPE."
