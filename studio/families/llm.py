"""Causal language models (Llama, Qwen, Mistral, Gemma... anything transformers loads with AutoModelForCausalLM):
chat LoRA / QLoRA, trained by studio.engines.llm and exported as a peft adapter folder."""

from studio.families import Family, register
from studio.tasks import TEXT_TASK

register(Family(
    name="llm", label="causal LLM", task=TEXT_TASK, engine="studio.engines.llm:LLMEngine",
    config_dir="llama-3.1-8b", quantized_base=("nf4",), network_types=("lora", "dora"),  # the planner's reference when a model's config.json cannot be read offline
))
