"""What stands between the Config tab's YAML and the buttons that replace it (Fill, Load) or train it (Start, Add to
queue): the user's own edits are replaced only on a second press, and a YAML whose replacement was refused is not
trained as if it were what the user picked.

Only the user's own edits count — what they typed and what they changed in the form. A YAML the studio wrote (Fill,
Load, a restored draft, Duplicate into Config) is replaced at once, and so are edits that were saved. A refusal is a
message next to the button pressed, not a toast, and stops the event chain silently: a refusal is no error.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from studio.ui.common import error, note

PRIVATE = dict(api_visibility="private", show_progress="hidden")


@dataclass
class ReplaceGuard:
    edited: gr.State  # the YAML as the user's own last edit left it (None: no edit since the studio last wrote it)
    pending: gr.State  # the YAML a Fill / Load refused to replace (None: none)
    go: gr.State  # whether the chain being checked goes on

    @classmethod
    def create(cls) -> "ReplaceGuard":
        return cls(gr.State(None), gr.State(None), gr.State(False))

    def track_edits(self, yaml_box: gr.Code) -> None:
        """Typing in the editor makes its YAML the user's own edits (a form edit says so itself: form_edit)."""
        yaml_box.input(lambda text: text, yaml_box, self.edited, trigger_mode="always_last", **PRIVATE)

    def replacing(self, button: gr.Button, yaml_box: gr.Code, message: gr.Markdown):
        """`button`'s click, checked: continue the returned chain with `.success(...)` to replace the YAML."""
        return button.click(check_replace, [yaml_box, self.edited, self.pending], [message, self.pending, self.go],
                            **PRIVATE).then(None, js=reveal(message)).then(go_on, self.go, None, **PRIVATE)

    def training(self, chain, yaml_box: gr.Code, message: gr.Markdown):
        """`chain` (a Start / Add to queue click), checked: continue it with `.success(...)` to train the YAML."""
        return chain.then(check_train, [yaml_box, self.pending], [message, self.go], **PRIVATE).then(
            None, js=reveal(message)).then(go_on, self.go, None, **PRIVATE)


def check_replace(text: str, edited: str | None, pending: str | None):
    """(message, pending, go): go on unless the YAML holds the user's own edits and this is the first press for them."""
    text = (text or "").strip()
    if not text or text != (edited or "").strip() or text == pending:
        return "", None, True
    return (note("The YAML holds edits of yours that this would replace. Press the button again to replace them, or "
                 "save them first (Config name → Save)."), text, False)


def check_train(text: str, pending: str | None):
    """(message, go): refused while the Config tab's YAML is one that a Fill / Load was refused to replace — the
    user picked something else, and would train their old edits under it."""
    if pending is None or (text or "").strip() != pending:
        return gr.skip(), True
    return (error("Not started: the YAML in the Config tab still holds your edits — the last Fill or Load did not "
                  "replace them. Press that button again to replace them, or save them (Config name → Save) to "
                  "train them as they are."), False)


def reveal(message: gr.Markdown) -> str:
    """JS that scrolls the page just enough to show `message` (under a button at the window's bottom edge)."""
    return f"() => document.getElementById('{message.elem_id}')?.scrollIntoView({{block: 'nearest'}})"


def go_on(go: bool) -> None:
    if not go:
        raise gr.Error("refused", visible=False, print_exception=False)  # the message is already next to the button
