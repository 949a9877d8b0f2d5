"""The two things LoRA Studio trains adapters for (the config's `task_type`), in a module with no imports so the
config schema and the family registry can both name them."""

IMAGE_TASK = "image-generation"
TEXT_TASK = "text-generation"
