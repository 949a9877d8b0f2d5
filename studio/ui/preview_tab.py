"""Preview tab: try the fresh adapters. Images: a base model plus up to three LoRAs at chosen strengths, and a
strength sweep (same seed at 0 … 1 in one grid). Chat: replies with the adapter and without it, side by side."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr

from studio.errors import StudioError
from studio.ui.common import choices_update, ok, reports_errors
from studio.ui.context import Studio

ADAPTER_SLOTS = 3
MAX_STRENGTH = 1.5


@dataclass
class AdapterSlot:
    run: gr.Dropdown
    strength: gr.Slider


def preview_tab(studio: Studio) -> None:
    with gr.Tab("Preview", id="preview") as tab:
        with gr.Tabs():
            with gr.Tab("Images", id="preview-images"):
                image_controls = _image_section(studio)
            with gr.Tab("Chat (LLM)", id="preview-chat"):
                chat_controls = _chat_section(studio)
    tab.select(partial(refresh_choices, studio), [image_controls[0], *[s.run for s in image_controls[1]],
                                                  chat_controls[0], chat_controls[1]],
               [image_controls[0], *[s.run for s in image_controls[1]], chat_controls[0], chat_controls[1]],
               api_visibility="private")


def _image_section(studio: Studio) -> tuple[gr.Dropdown, list[AdapterSlot]]:
    base = gr.Dropdown(studio.model_choices(image=True), label="Base model (pick, or type a path / hub id)",
                       allow_custom_value=True, elem_id="preview-base")
    slots = []
    runs = studio.run_choices(image=True, finished=True)
    for i in range(ADAPTER_SLOTS):
        with gr.Row(equal_height=True):
            slots.append(AdapterSlot(
                gr.Dropdown(runs, value=None, label=f"LoRA {i + 1} (a finished run)", scale=3, allow_custom_value=True,
                            elem_id=f"preview-adapter-{i + 1}"),
                gr.Slider(0, MAX_STRENGTH, value=1.0, step=0.05, label=f"Strength {i + 1}", scale=2)))
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", value="a red circle, flat colour, white background", scale=3)
        negative = gr.Textbox(label="Negative prompt", scale=2)
    with gr.Row():
        seed = gr.Number(value=0, precision=0, label="Seed", minimum=0)
        steps = gr.Slider(0, 100, value=0, step=1, label="Steps (0 = the model's default)",
                          info="SD 20, Flux.1 dev 28, schnell 4")
        generate = gr.Button("Generate", variant="primary", elem_id="preview-generate")
        sweep = gr.Button("Strength sweep (LoRA 1 at 0 … 1)", elem_id="preview-sweep")
    status = gr.Markdown(elem_id="preview-status")
    image = gr.Image(label="Result", type="pil", format="png", height=420, interactive=False,
                     elem_id="preview-image")

    slots[0].run.change(partial(base_of_run, studio), [slots[0].run, base], base, api_visibility="private")
    mix = [x for slot in slots for x in (slot.run, slot.strength)]
    generate.click(partial(generate_image, studio), [base, *mix, prompt, negative, seed, steps], [status, image],
                   api_name="generate_image")
    sweep.click(partial(strength_sweep, studio), [base, slots[0].run, prompt, negative, seed, steps],
                [status, image], api_name="strength_sweep")
    return base, slots


def _chat_section(studio: Studio) -> tuple[gr.Dropdown, gr.Dropdown]:
    with gr.Row(equal_height=True):
        adapter = gr.Dropdown(studio.run_choices(image=False, finished=True), label="Adapter (a finished LLM run)",
                              scale=2, allow_custom_value=True, elem_id="chat-adapter")
        base = gr.Dropdown(studio.model_choices(image=False), label="Base model (default: the run's)",
                           allow_custom_value=True, scale=2)
        strength = gr.Slider(0, MAX_STRENGTH, value=1.0, step=0.05, label="Adapter strength", scale=2)
    with gr.Row():
        with_adapter = gr.Chatbot(label="With the adapter", height=360, elem_id="chat-with")
        without = gr.Chatbot(label="Base model alone (same conversation)", height=360, elem_id="chat-without")
    with gr.Row():
        message = gr.Textbox(label="Message", placeholder="What do bees make?", scale=4, elem_id="chat-message")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        clear = gr.Button("Clear", scale=0)
    status = gr.Markdown(elem_id="chat-status")

    adapter.change(partial(base_of_run, studio), [adapter, base], base, api_visibility="private")
    inputs = [base, adapter, strength, message, with_adapter, without]
    outputs = [status, with_adapter, without, message]
    send.click(partial(chat, studio), inputs, outputs, api_name="chat")
    message.submit(partial(chat, studio), inputs, outputs, api_visibility="private")
    clear.click(lambda: ([], [], ""), None, [with_adapter, without, status], api_visibility="private")
    return base, adapter


# --- handlers --------------------------------------------------------------------------------------------------------

def refresh_choices(studio: Studio, image_base, *values):
    """New runs appear in the pickers when the tab is opened (current picks are kept)."""
    *image_runs, chat_base, chat_run = values
    image_choices, chat_choices = studio.run_choices(image=True, finished=True), studio.run_choices(False, True)
    return (choices_update(studio.model_choices(image=True), keep=image_base),
            *[choices_update(image_choices, keep=v) for v in image_runs],
            choices_update(studio.model_choices(image=False), keep=chat_base),
            choices_update(chat_choices, keep=chat_run))


def base_of_run(studio: Studio, run: str | None, current: str | None):
    """Picking a run selects the base model it was trained on."""
    if not run:
        return gr.skip()
    try:
        return studio.run(run).base_model or current
    except StudioError:
        return gr.skip()


def _steps(value) -> int | None:
    """The slider's steps; 0 (or empty) leaves them to the model family's sampling defaults."""
    return int(value or 0) or None


@reports_errors(outputs=2)
def generate_image(studio: Studio, base: str, lora1: str, strength1: float, lora2: str, strength2: float, lora3: str,
                   strength3: float, prompt: str, negative: str, seed, steps):
    mix = [(run, float(s)) for run, s in ((lora1, strength1), (lora2, strength2), (lora3, strength3)) if run]
    adapters = [(str(_image_adapter(studio, run)), s) for run, s in mix]
    base = _base_model(studio, base, lora1 or (mix[0][0] if mix else None))
    image = studio.image_previewer.generate(base, adapters, prompt or "", negative or "", seed=int(seed or 0),
                                            steps=_steps(steps))
    mixed = ", ".join(f"{run} × {s:g}" for run, s in mix) or "no LoRA"
    return ok(f"{Path(base).name} with {mixed}, seed {int(seed or 0)}."), image


@reports_errors(outputs=2)
def strength_sweep(studio: Studio, base: str, run: str, prompt: str, negative: str, seed, steps):
    if not run:
        raise StudioError("Pick LoRA 1 for the sweep.")
    adapter = str(_image_adapter(studio, run))
    base = _base_model(studio, base, run)
    image = studio.image_previewer.strength_sweep(base, adapter, prompt or "", negative or "", seed=int(seed or 0),
                                                  steps=_steps(steps))
    return ok(f"{run} at strengths 0, 0.25, 0.5, 0.75, 1 (left to right), seed {int(seed or 0)}."), image


@reports_errors(outputs=4)
def chat(studio: Studio, base: str, run: str, strength: float, message: str, with_history: list, without_history: list):
    if not (message or "").strip():
        raise StudioError("Type a message first.")
    info = studio.run(run)
    if info.is_image or info.adapter is None or not info.adapter.is_dir():
        raise StudioError(f"'{run}' is not a finished LLM run. Pick one from the list (or train one with the "
                          "LLM presets).")
    conversation = [_plain(m) for m in with_history or []] + [{"role": "user", "content": message.strip()}]
    preview = studio.chat_previewer(base or info.base_model, str(info.adapter))
    reply_with, reply_without = preview.reply(conversation, adapter_strength=float(strength))
    user = {"role": "user", "content": message.strip()}
    return (ok(f"Adapter {run} at strength {float(strength):g}."),
            [*conversation, {"role": "assistant", "content": reply_with}],
            [*[_plain(m) for m in without_history or []], user, {"role": "assistant", "content": reply_without}], "")


# --- helpers ---------------------------------------------------------------------------------------------------------

def _image_adapter(studio: Studio, run: str):
    info = studio.run(run)
    if not info.is_image:
        raise StudioError(f"'{run}' is an LLM run; use the Chat preview for it.")
    if info.adapter is None or info.adapter.suffix != ".safetensors":
        raise StudioError(f"'{run}' has no finished LoRA yet ({info.status}). Wait for the run to finish.")
    return info.adapter


def _base_model(studio: Studio, base: str | None, run: str | None) -> str:
    if base:
        return base
    if run:
        return studio.run(run).base_model
    raise StudioError("Pick a base model.")


def _plain(message: dict) -> dict:
    """A Chatbot message as {role, content: str} (gradio may hand content over as a list of parts)."""
    content = message.get("content")
    if isinstance(content, list):
        content = " ".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    elif isinstance(content, dict):
        content = content.get("text", "")
    return {"role": message.get("role", "user"), "content": str(content or "")}
