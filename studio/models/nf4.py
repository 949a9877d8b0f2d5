"""4-bit NF4 storage of a loaded model's linear layers (bitsandbytes), for QLoRA-style image training.

diffusers can quantize while loading, but only a diffusers folder or hub id and only when a GPU is present; this
quantizes what any loader returned (folders, hub ids, single-file checkpoints) one layer at a time on its way to the
device, so the card never holds the 16-bit layer set. Same format as the LLM QLoRA path: NF4 with double
quantization, matmuls in the compute dtype. peft attaches LoRA to the resulting `Linear4bit` layers as it does for
transformers models.
"""

from __future__ import annotations

import torch


def quantize_linears_nf4(model: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype) -> int:
    """Replace every `nn.Linear` of `model` by a bitsandbytes NF4 `Linear4bit` on `device` (bias and the other
    modules are left where they are); returns the number of weights quantized."""
    import bitsandbytes as bnb

    quantized = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                      device="meta")
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", module=layer)
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            layer.to(device)  # bitsandbytes quantizes a Params4bit when it moves to a device
            setattr(parent, name, layer)
            quantized += child.weight.numel()
    # What diffusers' own bitsandbytes loading marks: pipeline.to() then moves the model without casting the packed
    # 4-bit data, and peft wraps the layers with its 4-bit LoRA layer.
    model.is_loaded_in_4bit = True
    model.quantization_method = "bitsandbytes"
    return quantized
