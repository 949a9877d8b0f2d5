"""`distributed: fsdp` for LLM runs: the frozen base model sharded over the processes, the LoRA kept whole.

With plain data parallelism every GPU holds the whole base model; FSDP splits its weights over the GPUs and gathers
each decoder layer's weights only for that layer's forward and backward, so a model no single card holds trains on
several (QLoRA: a 70B model in 4-bit on 2 x 24 GB). The settings are what accelerate, peft and bitsandbytes document for
4-bit FSDP (FSDP1, one unit per decoder layer, use_orig_params false; see accelerate_settings for the loading ones);
they go into output_dir/accelerate_config.yaml, and `shard` takes them from accelerate's FSDP plugin, which reads that
file through `accelerate launch`.

One change from that recipe: the LoRA weights stay out of FSDP (`ignored_states`), replicated on every process as in
ddp, their gradients summed by the loop's one all-reduce. Sharding them would save a few hundred MB at most; keeping
them whole keeps checkpoints, resume and peft's adapter files exactly as in a one-process run.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from studio.errors import StudioError


def accelerate_settings(cuda: bool) -> dict:
    """The `fsdp_config` of the accelerate config file. Two settings differ from the documented recipe for now:
    cpu_ram_efficient_loading (the main process loads the weights, the others get empty ones that FSDP fills by
    broadcast; what makes a 70B model loadable at all) stays off until the model loader leaves the weights off the GPU
    under FSDP (studio/models/causal_lm.py moves the whole model to the device before FSDP sees it); and
    sync_module_states (that broadcast) needs CUDA in accelerate's FSDP plugin."""
    return {"fsdp_version": 1, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_sharding_strategy": "FULL_SHARD", "fsdp_use_orig_params": False,
            "fsdp_cpu_ram_efficient_loading": False, "fsdp_sync_module_states": cuda,
            "fsdp_backward_prefetch": "BACKWARD_PRE", "fsdp_forward_prefetch": False, "fsdp_offload_params": False,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT", "fsdp_activation_checkpointing": False}


def shard(engine, device: torch.device) -> None:
    """Wrap the LLM engine's model in FSDP with the launch's settings; the LoRA parameters stay unsharded."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = getattr(engine, "model", None)
    if model is None or engine.cfg.is_image:
        raise StudioError("distributed: fsdp shards LLM runs; image runs train with distributed: ddp.")
    check_4bit_storage(model)
    lora = [p for p in model.parameters() if p.requires_grad]
    plugin = FullyShardedDataParallelPlugin()  # from the environment accelerate launch set from the config file
    plugin.set_auto_wrap_policy(model)
    engine.model = FSDP(model, sharding_strategy=plugin.sharding_strategy, cpu_offload=plugin.cpu_offload,
                        auto_wrap_policy=plugin.auto_wrap_policy, backward_prefetch=plugin.backward_prefetch,
                        forward_prefetch=plugin.forward_prefetch, use_orig_params=plugin.use_orig_params,
                        sync_module_states=plugin.sync_module_states, param_init_fn=plugin.param_init_fn,
                        limit_all_gathers=plugin.limit_all_gathers, ignored_states=lora, device_id=device)
    # The chunked loss runs the decoder and the head itself; FSDP's root unit gathers their weights in its forward.
    engine.own_loss_because = "FSDP gathers the sharded weights in the model's own forward"


def check_4bit_storage(model) -> None:
    """FSDP flattens each unit's weights into one tensor of one dtype: 4-bit weights must be stored in the compute
    dtype (bitsandbytes' bnb_4bit_quant_storage), not in uint8 beside 16-bit norms."""
    quantization = getattr(getattr(model.get_base_model(), "hf_quantizer", None), "quantization_config", None)
    storage = getattr(quantization, "bnb_4bit_quant_storage", None)
    if quantization is not None and getattr(quantization, "load_in_4bit", False) and not (
            isinstance(storage, torch.dtype) and storage.is_floating_point):
        raise StudioError(f"distributed: fsdp with load_in_4bit needs the 4-bit weights stored in the compute dtype "
                          f"(bnb_4bit_quant_storage), and this model was loaded with {storage} storage. Train with "
                          "load_in_4bit: false, or with distributed: ddp.")


@contextmanager
def unwrapped(engine) -> Iterator[None]:
    """For an export or a checkpoint: the engine's model as peft built it, the FSDP wrappers set aside, so peft
    finds its LoRA layers by their own names. Its (unsharded) LoRA weights are all an adapter needs; nothing is
    gathered, so only the main process needs to be here."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    root = engine.model
    wrapped = [(parent, name, child) for parent in root.modules() for name, child in parent.named_children()
               if isinstance(child, FSDP)]
    for parent, name, child in wrapped:
        setattr(parent, name, child.module)
    engine.model = root.module
    try:
        yield
    finally:
        for parent, name, child in reversed(wrapped):
            setattr(parent, name, child)
        engine.model = root
