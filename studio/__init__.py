"""LoRA Studio: train LoRA adapters for Stable Diffusion and causal LLMs (see README.md)."""
