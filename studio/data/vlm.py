"""VLM captions: any image-text-to-text model transformers loads natively (Qwen2.5-VL / Qwen3-VL, SmolVLM, LLaVA-style
models such as JoyCaption, Florence-2), asked one instruction about each image.

Chat models get the instruction through their processor's chat template (an image block, then the text); Florence-2
has no chat template and takes a task prompt such as `<DETAILED_CAPTION>` as its text. Captions are greedy (the same
image gets the same caption) and flattened to one line, as metadata.csv and .txt sidecars hold them.
"""

from __future__ import annotations

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from studio.data.label_models import load_pretrained

DEFAULT_VLM = "Qwen/Qwen2.5-VL-3B-Instruct"
DEFAULT_INSTRUCTION = "Describe this image in one sentence for training a LoRA."
# Florence-2 follows only its task prompts; the default instruction becomes its detailed-caption task.
TASK_PROMPT_FOR_DEFAULT = "<DETAILED_CAPTION>"
DEFAULT_MAX_TOKENS = 120  # a sentence or a short paragraph; generation stops earlier at the model's end token
# Checkpoints transformers reads natively (no trust_remote_code), offered in the Dataset tab, with what they need
# beyond requirements.txt: Qwen-VL processors include a video processor built on torchvision.
SUGGESTED_VLMS = {DEFAULT_VLM: "needs torchvision", "Qwen/Qwen3-VL-2B-Instruct": "needs torchvision",
                  "HuggingFaceTB/SmolVLM-500M-Instruct": "small", "fancyfeast/llama-joycaption-beta-one-hf-llava":
                  "JoyCaption, 8B", "florence-community/Florence-2-large": "task prompts, fast"}


class VlmCaptioner:
    """One caption per image from an AutoModelForImageTextToText, a whole batch per generate call."""

    def __init__(self, model_id: str, instruction: str, max_tokens: int, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype, self.max_tokens = device, dtype, max_tokens
        self.model = load_pretrained(AutoModelForImageTextToText, model_id, "VLM", dtype=dtype).to(device).eval()
        self.processor = load_pretrained(AutoProcessor, model_id, "VLM")
        # Some repos keep the chat template with the tokenizer only.
        self.chat_template = self.processor.chat_template or getattr(self.processor.tokenizer, "chat_template", None)
        if not self.chat_template and instruction == DEFAULT_INSTRUCTION:
            instruction = TASK_PROMPT_FOR_DEFAULT
        self.instruction = instruction
        self.prompt_in_output = not getattr(self.model.config, "is_encoder_decoder", False)

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image]) -> list[str]:
        inputs = self._inputs(images).to(self.device, self.dtype)  # casts pixels only, never token ids
        generated = self.model.generate(**inputs, max_new_tokens=self.max_tokens, do_sample=False, num_beams=1)
        if self.prompt_in_output:
            generated = generated[:, inputs["input_ids"].shape[1]:]
        texts = self.processor.batch_decode(generated, skip_special_tokens=True)
        return [" ".join(text.split()) for text in texts]

    def _inputs(self, images: list[Image.Image]):
        # Decoder-only models continue the prompt: padded on the left, every prompt ends where generation starts.
        padding = {"padding": True, "padding_side": "left"}
        if not self.chat_template:
            return self.processor(text=[self.instruction] * len(images), images=images, return_tensors="pt",
                                  **padding)
        conversations = [[{"role": "user", "content": [{"type": "image", "image": image},
                                                       {"type": "text", "text": self.instruction}]}]
                         for image in images]
        return self.processor.apply_chat_template(conversations, chat_template=self.chat_template,
                                                  add_generation_prompt=True, tokenize=True, return_dict=True,
                                                  return_tensors="pt", processor_kwargs=padding)
