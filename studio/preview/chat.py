"""Chat preview: a base model + one LoRA adapter → greedy replies with and without the adapter, side by side.

`generate_reply` is shared by the training loop's sample replies and by the studio's Chat tab; `ChatPreview` keeps
the base model and adapter loaded between messages.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from peft import PeftModel
from peft.helpers import rescale_adapter_scale

from studio.models.causal_lm import load_causal_lm, pad_token_id
from studio.export.peft_merge import adapter_base_model, adapter_tokenizer
from studio.hardware import inference_dtype, pick_device

MAX_NEW_TOKENS = 128


def generate_reply(model, tokenizer, messages: list[dict], max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """The model's greedy (deterministic) answer to the conversation `messages`, rendered by its chat template."""
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=pad_token_id(tokenizer))
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


class ChatPreview:
    """One adapter folder on its base model, loaded on the first reply and kept for the next ones."""

    def __init__(self, adapter_dir: str | Path, base_model: str | None = None, device: torch.device | None = None):
        self.adapter_dir = Path(adapter_dir)
        self.base_model = adapter_base_model(self.adapter_dir, base_model)
        self.device = device or pick_device()
        self._lock = threading.Lock()  # one generation at a time: the adapter scale is model state
        self._model: PeftModel | None = None
        self._tokenizer = None

    def reply(self, messages: list[dict], adapter_strength: float = 1.0,
              max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[str, str]:
        """(reply with the adapter at `adapter_strength`, reply of the base model alone) to `messages`."""
        with self._lock:
            model, tokenizer = self._load()
            with torch.no_grad():
                # Strength multiplies the LoRA update (alpha/rank scaling): 0 = base model, 1 = as trained.
                with rescale_adapter_scale(model, float(adapter_strength)):
                    with_adapter = generate_reply(model, tokenizer, messages, max_new_tokens)
                with model.disable_adapter():
                    without = generate_reply(model, tokenizer, messages, max_new_tokens)
        return with_adapter, without

    def _load(self) -> tuple[PeftModel, object]:
        if self._model is None:
            base = load_causal_lm(self.base_model, dtype=inference_dtype(self.device), device=self.device)
            self._tokenizer = adapter_tokenizer(self.adapter_dir, self.base_model)
            self._model = PeftModel.from_pretrained(base, str(self.adapter_dir)).eval()
        return self._model, self._tokenizer
