"""Loading causal LMs and their tokenizers (local folder or hub id), with errors that say what to do.

Shared by the LLM engine (training), the peft merge (export) and the chat preview.
"""

from __future__ import annotations

import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from studio.errors import StudioError, refuse_pickle


def check_source(base_model: str) -> str:
    """The model to load: a local transformers folder (checked) or a hub id (checked when loading)."""
    path = Path(base_model).expanduser()
    if path.exists():
        if not (path.is_dir() and (path / "config.json").is_file()):
            raise StudioError(f"base_model {path} is not a transformers model folder (it needs config.json, the "
                              "weights and the tokenizer files). Give the folder of a causal LM such as Llama, "
                              "Qwen or Mistral.")
        return str(path)
    if base_model.startswith((".", "/", "~")) or base_model.count("/") > 1:
        raise StudioError(f"base_model {base_model} does not exist. Give a model folder or a hub id such as "
                          "Qwen/Qwen2.5-0.5B-Instruct.")
    return base_model


@contextmanager
def _loading(base_model: str) -> Iterator[None]:
    """Turn transformers' download/offline failures into one message that says how to get the model."""
    try:
        yield
    except OSError as exc:
        raise StudioError(
            f"Could not load the model '{base_model}': it is not a local folder and it could not be fetched from the "
            f"Hugging Face hub (offline, a typo, or a gated model). Download it first, e.g. "
            f"`hf download {base_model} --local-dir models/{base_model.split('/')[-1]}`, and set base_model to that "
            f"folder. ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from None
    except ValueError as exc:  # transformers' "Unrecognized configuration class ..." for non-causal-LM models
        raise StudioError(f"transformers cannot load '{base_model}' as a causal language model: "
                          f"{str(exc).splitlines()[0]}") from None
    except pickle.UnpicklingError as exc:  # torch's restricted unpickler refused a pytorch_model.bin
        weights = Path(base_model) / "pytorch_model.bin"
        raise refuse_pickle(
            f"base_model {base_model}: its pytorch_model.bin weights hold more than tensors (or are damaged)",
            "Better: use the model's .safetensors weights (most model pages offer them), or convert the file once "
            "(this unpickles it, so only for a model you trust); transformers then reads model.safetensors:\n"
            f"  python -c \"import torch, safetensors.torch as st; sd = torch.load(r'{weights}', map_location='cpu', "
            "weights_only=False); st.save_file({k: v.clone().contiguous() for k, v in sd.items() if "
            f"isinstance(v, torch.Tensor)}}, r'{weights.with_name('model.safetensors')}', "
            "metadata={'format': 'pt'})\"") from exc


def load_tokenizer(base_model: str):
    source = check_source(base_model)
    with _loading(source):
        return AutoTokenizer.from_pretrained(source)


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else EOS (padding never carries loss or attention)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def load_causal_lm(base_model: str, *, dtype: torch.dtype | str, device: torch.device,
                   load_in_4bit: bool = False, compute_dtype: torch.dtype = torch.bfloat16) -> PreTrainedModel:
    """The model on `device`, frozen weights in `dtype` ("auto": as stored), or 4-bit NF4 weights (QLoRA).

    4-bit is bitsandbytes' QLoRA recipe: NF4 with double quantization, matmuls in `compute_dtype`. The caller
    decides whether 4-bit is allowed on this device (the product needs CUDA; tests also run it on the CPU).
    """
    source = check_source(base_model)
    extra: dict = {}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype)
        extra["device_map"] = {"": device}  # quantized weights are placed while loading; .to() cannot move them
    with _loading(source):
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra)
    if not load_in_4bit:
        model.to(device)
    return model
