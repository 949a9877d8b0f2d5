"""Preview tab: try the adapters of a run — its final one and each one saved along the way. Images: a base model plus
up to three LoRAs at chosen strengths, and a strength sweep: one seed, strengths across and checkpoints down, as one
labelled grid (click a tile for its prompt tag; download the grid as a PNG). Chat: replies with the adapter and
without it, side by side."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr

from studio.errors import StudioError
from studio.export.install import prompt_tag
from studio.fileio import atomic_path
from studio.preview.sweep_grid import SWEEP_STRENGTHS, GridLayout
from studio.run_adapters import RunAdapter, evenly_spaced
from studio.ui.common import choices_update, ok, reports_errors
from studio.ui.context import RunInfo, Studio

ADAPTER_SLOTS = 3
MAX_STRENGTH = 1.5
MAX_SWEEP_ROWS, MAX_SWEEP_COLUMNS = 8, 8  # 64 renders at most: minutes for SDXL on a consumer GPU
# An adapter picker's value is "<run>/<adapter file or folder>"; a bare run name (as scripts pass it) means the run's
# newest adapter, the final one once it has finished.
SEPARATOR = "/"


@dataclass
class AdapterSlot:
    run: gr.Dropdown
    strength: gr.Slider


@dataclass
class ImageControls:
    base: gr.Dropdown
    slots: list[AdapterSlot]
    checkpoints: gr.Dropdown  # the sweep's rows: adapters of LoRA 1's run


@dataclass
class SweepGrid:
    """The grid on screen (kept per browser session): which tile a click means."""
    layout: GridLayout
    files: list[str]  # each row's adapter file name
    png: str


def preview_tab(studio: Studio) -> None:
    with gr.Tab("Preview", id="preview") as tab:
        with gr.Tabs():
            with gr.Tab("Images", id="preview-images"):
                images = _image_section(studio)
            with gr.Tab("Chat (LLM)", id="preview-chat"):
                chat_base, chat_adapter = _chat_section(studio)
    pickers = [images.base, *[s.run for s in images.slots], chat_base, chat_adapter]
    tab.select(partial(refresh_choices, studio), pickers, pickers, api_visibility="private").then(
        partial(sweep_checkpoints, studio), [images.slots[0].run, images.checkpoints], images.checkpoints,
        api_visibility="private")


def _image_section(studio: Studio) -> ImageControls:
    base = gr.Dropdown(studio.model_choices(image=True), label="Base model (pick, or type a path / hub id)",
                       allow_custom_value=True, elem_id="preview-base")
    slots = []
    choices = adapter_choices(studio, image=True)
    for i in range(ADAPTER_SLOTS):
        with gr.Row(equal_height=True):
            slots.append(AdapterSlot(
                gr.Dropdown(choices, value=None, label=f"LoRA {i + 1} (a run's final LoRA, or one saved at a step)",
                            scale=3, allow_custom_value=True, elem_id=f"preview-adapter-{i + 1}"),
                gr.Slider(0, MAX_STRENGTH, value=1.0, step=0.05, label=f"Strength {i + 1}", scale=2)))
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", value="a pink circle, flat colour, white background", scale=3)
        negative = gr.Textbox(label="Negative prompt", scale=2)
    with gr.Row():
        seed = gr.Number(value=0, precision=0, label="Seed", minimum=0)
        steps = gr.Slider(0, 100, value=0, step=1, label="Steps (0 = the model's default)",
                          info="SD 20, Flux.1 dev 28, schnell 4")
        generate = gr.Button("Generate", variant="primary", elem_id="preview-generate")
    status = gr.Markdown(elem_id="preview-status")
    image = gr.Image(label="Result", type="pil", format="png", height=420, interactive=False,
                     elem_id="preview-image")
    with gr.Group():
        with gr.Row(equal_height=True):
            checkpoints = gr.Dropdown([], value=[], multiselect=True, allow_custom_value=True, scale=3,
                                      label=f"Sweep: checkpoints of LoRA 1's run (one row each, at most "
                                            f"{MAX_SWEEP_ROWS}; empty = spread over all)",
                                      elem_id="preview-sweep-checkpoints")
            strengths = gr.Textbox(", ".join(f"{s:g}" for s in SWEEP_STRENGTHS), scale=2,
                                   label=f"Strengths (one column each, 0 … {MAX_STRENGTH:g})",
                                   elem_id="preview-sweep-strengths")
            sweep = gr.Button("Strength sweep", scale=1, elem_id="preview-sweep")
        grid = gr.Image(label="Strength sweep: one seed; click a tile for its prompt tag", format="png",
                        interactive=False, elem_id="preview-sweep-image")
        with gr.Row(equal_height=True):
            tile = gr.Markdown(elem_id="preview-tile")
            download = gr.DownloadButton("⬇ Download the grid (PNG)", visible=False, scale=0,
                                         elem_id="preview-sweep-download")
    shown = gr.State(None)  # the SweepGrid on screen

    slots[0].run.change(partial(base_of_run, studio), [slots[0].run, base], base, api_visibility="private").then(
        partial(sweep_checkpoints, studio), [slots[0].run], checkpoints, api_visibility="private")
    mix = [x for slot in slots for x in (slot.run, slot.strength)]
    generate.click(partial(generate_image, studio), [base, *mix, prompt, negative, seed, steps], [status, image],
                   api_name="generate_image")
    sweep.click(partial(strength_sweep, studio), [base, slots[0].run, prompt, negative, seed, steps, checkpoints,
                                                  strengths], [status, grid, shown], api_name="strength_sweep").then(
        sweep_download, shown, [download, tile], api_visibility="private")
    grid.select(choose_tile, shown, tile, api_visibility="private")
    return ImageControls(base, slots, checkpoints)


def _chat_section(studio: Studio) -> tuple[gr.Dropdown, gr.Dropdown]:
    with gr.Row(equal_height=True):
        adapter = gr.Dropdown(adapter_choices(studio, image=False), label="Adapter (an LLM run's final one, or one "
                              "saved at a step)", scale=2, allow_custom_value=True, elem_id="chat-adapter")
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

def adapter_choices(studio: Studio, image: bool) -> list[tuple[str, str]]:
    """Every adapter of every run of the kind, e.g. ("style · step 400", "style/style-step000400.safetensors")."""
    return [(f"{run.name} · {adapter.label}", f"{run.name}{SEPARATOR}{adapter.path.name}")
            for run in studio.runs() if run.is_image == image for adapter in run.adapters]


def refresh_choices(studio: Studio, image_base, *values):
    """New runs and adapters appear in the pickers when the tab is opened (current picks are kept)."""
    *image_picks, chat_base, chat_pick = values
    image_choices, chat_choices = adapter_choices(studio, image=True), adapter_choices(studio, image=False)
    return (choices_update(studio.model_choices(image=True), keep=image_base),
            *[choices_update(image_choices, keep=v) for v in image_picks],
            choices_update(studio.model_choices(image=False), keep=chat_base),
            choices_update(chat_choices, keep=chat_pick))


def sweep_checkpoints(studio: Studio, pick: str | None, current: list[str] | None = None):
    """The sweep's row choices: the adapters of LoRA 1's run; picked: those of `current` still there, else an even
    spread over all of them."""
    try:
        info, _ = _picked(studio, pick) if pick else (None, None)
    except StudioError:
        info = None
    adapters = info.adapters if info else []
    choices = [(adapter.label, adapter.path.name) for adapter in adapters]
    kept = [name for name in current or [] if name in {value for _, value in choices}]
    return gr.update(choices=choices, value=kept or [a.path.name for a in evenly_spaced(adapters, MAX_SWEEP_ROWS)])


def base_of_run(studio: Studio, pick: str | None, current: str | None):
    """Picking an adapter selects the base model its run was trained on."""
    if not pick:
        return gr.skip()
    try:
        return _picked(studio, pick)[0].base_model or current
    except StudioError:
        return gr.skip()


def _steps(value) -> int | None:
    """The slider's steps; 0 (or empty) leaves them to the model family's sampling defaults."""
    return int(value or 0) or None


@reports_errors(outputs=2)
def generate_image(studio: Studio, base: str, lora1: str, strength1: float, lora2: str, strength2: float, lora3: str,
                   strength3: float, prompt: str, negative: str, seed, steps):
    mix = [(pick, float(s)) for pick, s in ((lora1, strength1), (lora2, strength2), (lora3, strength3)) if pick]
    picked = [(_image_adapter(studio, pick), s) for pick, s in mix]
    base = _base_model(studio, base, lora1 or (mix[0][0] if mix else None))
    image = studio.image_previewer.generate(base, [(str(a.path), s) for (_, a), s in picked], prompt or "",
                                            negative or "", seed=int(seed or 0), steps=_steps(steps),
                                            allow_unsafe_pickle=_pickle_allowed(base, [i for (i, _), _ in picked]))
    mixed = ", ".join(f"{info.name} · {a.label} × {s:g}" for (info, a), s in picked) or "no LoRA"
    return ok(f"{Path(base).name} with {mixed}, seed {int(seed or 0)}."), image


@reports_errors(outputs=3)
def strength_sweep(studio: Studio, base: str, lora1: str, prompt: str, negative: str, seed, steps,
                   checkpoints: list[str] | None = None, strengths: str = "", progress=gr.Progress()):
    """One seed: `strengths` across, `checkpoints` of LoRA 1's run down (default: spread over all of them)."""
    if not lora1:
        raise StudioError("Pick LoRA 1 for the sweep: the sweep shows the checkpoints of its run.")
    info, _ = _image_adapter(studio, lora1)
    rows = _sweep_rows(info, checkpoints or [])
    columns = _strengths(strengths)
    seed = int(seed or 0)
    base = _base_model(studio, base, lora1)
    image, layout = studio.image_previewer.strength_sweep(
        base, [(a.label, str(a.path)) for a in rows], prompt or "", negative or "", seed=seed, steps=_steps(steps),
        strengths=columns, on_tile=lambda done, total: progress(done / total, desc=f"tile {done} of {total}"),
        allow_unsafe_pickle=_pickle_allowed(base, [info]))
    png = info.folder / "sweeps" / f"{info.name}-sweep-seed{seed}.png"
    with atomic_path(png) as tmp:
        image.save(tmp, format="PNG")
    where = ", ".join(a.label for a in rows)
    return (ok(f"{info.name} at strengths {', '.join(f'{s:g}' for s in columns)} (left to right), {where} (top to "
               f"bottom), seed {seed}. Click a tile for its prompt tag."),
            str(png), SweepGrid(layout, [a.path.name for a in rows], str(png)))


def sweep_download(shown: SweepGrid | None):
    """The download button offers the grid on screen; the tag of a tile of an earlier grid goes."""
    if shown is None:
        return gr.update(visible=False), gr.skip()
    return gr.update(value=shown.png, visible=True), ""


def choose_tile(shown: SweepGrid | None, evt: gr.SelectData):
    """The clicked tile's adapter at its strength, as the prompt tag WebUIs read."""
    if shown is None or not evt.index:
        return ""
    tile = shown.layout.tile_at(*evt.index[:2])
    if tile is None:
        return gr.skip()  # a click between tiles
    return tile_tag(shown, *tile)


def tile_tag(shown: SweepGrid, row: int, column: int) -> str:
    checkpoint, strength = shown.layout.label(row, column)
    tag = prompt_tag(shown.files[row], shown.layout.strengths[column])
    return ok(f"`{tag}` — {checkpoint}, {strength}: paste it into an A1111 / Forge prompt, with the file in "
              "`models/Lora` (Export tab).")


@reports_errors(outputs=4)
def chat(studio: Studio, base: str, pick: str, strength: float, message: str, with_history: list,
         without_history: list):
    if not (message or "").strip():
        raise StudioError("Type a message first.")
    info, adapter = _picked(studio, pick)
    if info.is_image or not adapter.path.is_dir():
        raise StudioError(f"'{pick}' is not an LLM adapter. Pick one from the list (or train one with the LLM "
                          "presets).")
    conversation = [_plain(m) for m in with_history or []] + [{"role": "user", "content": message.strip()}]
    preview = studio.chat_previewer(base or info.base_model, str(adapter.path))
    reply_with, reply_without = preview.reply(conversation, adapter_strength=float(strength))
    user = {"role": "user", "content": message.strip()}
    return (ok(f"Adapter {info.name} · {adapter.label} at strength {float(strength):g}."),
            [*conversation, {"role": "assistant", "content": reply_with}],
            [*[_plain(m) for m in without_history or []], user, {"role": "assistant", "content": reply_without}], "")


# --- helpers ---------------------------------------------------------------------------------------------------------

def _picked(studio: Studio, pick: str | None) -> tuple[RunInfo, RunAdapter]:
    """The run and the adapter a picker value names (only adapters the run lists are accepted)."""
    name, _, adapter_name = (pick or "").partition(SEPARATOR)
    info = studio.run(name)
    if not info.adapters:
        raise StudioError(f"'{name}' has no adapter yet ({info.status}). Wait for its first saved step or for the "
                          "run to finish.")
    if not adapter_name:
        return info, info.adapters[-1]
    chosen = next((a for a in info.adapters if a.path.name == adapter_name), None)
    if chosen is None:
        raise StudioError(f"'{name}' has no adapter called {adapter_name}. Pick one from the list.")
    return info, chosen


def _image_adapter(studio: Studio, pick: str) -> tuple[RunInfo, RunAdapter]:
    info, adapter = _picked(studio, pick)
    if not info.is_image:
        raise StudioError(f"'{info.name}' is an LLM run; use the Chat preview for it.")
    if adapter.path.suffix != ".safetensors":
        raise StudioError(f"{adapter.path.name} is not a LoRA file. Pick one of '{info.name}' from the list.")
    return info, adapter


def _sweep_rows(info: RunInfo, names: list[str]) -> list[RunAdapter]:
    """The sweep's checkpoints, oldest first; none picked: an even spread over all of them."""
    if not names:
        return evenly_spaced(info.adapters, MAX_SWEEP_ROWS)
    missing = sorted(set(names) - {a.path.name for a in info.adapters})
    if missing:
        raise StudioError(f"'{info.name}' has no adapter {', '.join(missing)}. Pick the sweep's checkpoints from the "
                          "list: it shows those of LoRA 1's run.")
    if len(set(names)) > MAX_SWEEP_ROWS:
        raise StudioError(f"{len(set(names))} checkpoints are picked for the sweep; pick at most {MAX_SWEEP_ROWS} "
                          "(one row each).")
    return [a for a in info.adapters if a.path.name in names]


def _strengths(text: str | None) -> tuple[float, ...]:
    """The sweep's columns from "0, 0.5, 1"; empty: SWEEP_STRENGTHS."""
    parts = re.split(r"[,;\s]+", (text or "").strip())
    if parts == [""]:
        return SWEEP_STRENGTHS
    try:
        values = tuple(float(part) for part in parts if part)
    except ValueError:
        values = ()
    if not values or len(values) > MAX_SWEEP_COLUMNS or not all(0 <= v <= MAX_STRENGTH for v in values):
        raise StudioError(f"Strengths '{text}': give 1 to {MAX_SWEEP_COLUMNS} numbers from 0 to {MAX_STRENGTH:g}, "
                          "separated by commas, e.g. 0, 0.5, 1.")
    return values


def _pickle_allowed(base: str, runs: list[RunInfo]) -> bool:
    """A pickle (.ckpt) base loads only for a run that opted in to it with `allow_unsafe_pickle` and trained on it."""
    return any(info.allow_unsafe_pickle and info.base_model == base for info in runs)


def _base_model(studio: Studio, base: str | None, pick: str | None) -> str:
    if base:
        return base
    if pick:
        return _picked(studio, pick)[0].base_model
    raise StudioError("Pick a base model.")


def _plain(message: dict) -> dict:
    """A Chatbot message as {role, content: str} (gradio may hand content over as a list of parts)."""
    content = message.get("content")
    if isinstance(content, list):
        content = " ".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    elif isinstance(content, dict):
        content = content.get("text", "")
    return {"role": message.get("role", "user"), "content": str(content or "")}
