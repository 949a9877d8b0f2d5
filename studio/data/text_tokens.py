"""Text datasets, tokenized for LLM LoRA: chat template, assistant-only labels, truncation, packing, batching.

tokenize_records(records)   records (studio.data.text.read_dataset) → examples: token ids + labels (IGNORE where no
                            loss is computed)
pack(examples)              short examples → rows of up to max_length tokens (optional)
collate(examples)           examples → padded tensors for the model

Pure data code: it uses the tokenizer (for its chat template), never the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from jinja2 import TemplateError

from studio.data.text import DEFAULT_CHAT_TEMPLATE, IGNORE, Record

if TYPE_CHECKING:
    import torch


@dataclass
class Example:
    """A training row: token ids, labels (IGNORE = no loss), and positions (restarting at 0 per packed sample)."""
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TokenizedData:
    examples: list[Example] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    truncated: int = 0  # conversations cut at max_length
    split: int = 0  # documents longer than max_length, split into pieces
    dropped: int = 0  # samples with no loss tokens left (e.g. the answer lay beyond max_length)

    def summary(self, max_length: int) -> str | None:
        """A log line about what max_length did to the data, or None when it did nothing."""
        parts = []
        if self.truncated:
            parts.append(f"{self.truncated} conversation(s) were longer than max_length={max_length} tokens and "
                         "were truncated")
        if self.split:
            parts.append(f"{self.split} document(s) were longer than max_length and were split into pieces")
        if self.dropped:
            parts.append(f"{self.dropped} sample(s) had no answer tokens left and were skipped")
        return ("; ".join(parts) + ". Raise max_length to keep more.") if parts else None


def ensure_chat_template(tokenizer) -> bool:
    """Give a tokenizer without a chat template the default one; True if it was missing."""
    if tokenizer.chat_template:
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True


def tokenize_records(records: list[Record], tokenizer, max_length: int, train_on_prompt: bool = False) -> TokenizedData:
    """Records → examples of at most max_length tokens, with counts of what max_length cut and a problem per
    conversation the chat template cannot render."""
    data = TokenizedData()
    for record in records:
        try:
            if record.text is not None:
                pieces = _document_pieces(record.text, tokenizer, max_length)
                data.split += len(pieces) > 1
            else:
                ids, labels = _conversation_ids(record.messages, tokenizer, train_on_prompt)
                data.truncated += len(ids) > max_length
                pieces = [(ids[:max_length], labels[:max_length])]
        except TemplateError as exc:  # e.g. a template that insists on alternating user/assistant turns
            data.problems.append(f"{record.source}: the tokenizer's chat template rejected this conversation "
                                 f"({exc}).")
            continue
        except ValueError as exc:
            data.problems.append(f"{record.source}: {exc}")
            continue
        for ids, labels in pieces:
            # labels[0] is never a target: a causal LM predicts token t from the tokens before it.
            if all(label == IGNORE for label in labels[1:]):
                data.dropped += 1
            else:
                data.examples.append(Example(ids, labels, list(range(len(ids)))))
    return data


def _document_pieces(text: str, tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    ids = tokenizer(text).input_ids  # with the tokenizer's BOS (and EOS), if it adds them
    eos = tokenizer.eos_token_id
    if eos is not None and ids[-1:] != [eos]:
        ids = ids + [eos]  # documents end, so the model learns where
    return [(ids[i:i + max_length], ids[i:i + max_length]) for i in range(0, len(ids), max_length)]


def _conversation_ids(messages: list[dict], tokenizer, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    """Render with the tokenizer's chat template; label only tokens that start inside an assistant turn."""
    def render(msgs: list[dict], add_generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)

    text = render(messages)
    # The template already holds any BOS it wants; add_special_tokens would add a second one.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if train_on_prompt:
        return ids, ids
    spans = assistant_spans(messages, text, render)
    labels = [token if any(s <= start < e for s, e in spans) else IGNORE
              for token, (start, _) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def assistant_spans(messages: list[dict], text: str,
                    render: Callable[..., str]) -> list[tuple[int, int]]:
    """Character spans of `text` (the rendered conversation) that hold assistant replies, end-of-turn marker included.

    Reply i starts where the rendering of the turns before it plus the generation prompt ends, and ends where the
    rendering of the turns up to it ends. Templates that render an earlier turn differently once later turns follow
    (e.g. Qwen3 dropping its empty think block) break the second rule; then the reply's own text is located in
    `text` and the end-of-turn marker the template put after it is taken along.
    """
    unclear = ValueError("the chat template renders earlier turns differently once later turns follow, so the "
                         "answer tokens cannot be told apart; set train_on_prompt: true to train on every token")
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], add_generation_prompt=True)
        if not text.startswith(prompt):
            raise unclear
        upto = render(messages[:i + 1])
        if text.startswith(upto):
            spans.append((len(prompt), len(upto)))
            continue
        content = message["content"]
        found = text.find(content, len(prompt))
        if found < 0:
            raise unclear
        end = found + len(content)
        tail = upto[upto.rfind(content) + len(content):]  # the end-of-turn marker, e.g. "<|im_end|>\n"
        spans.append((len(prompt), end + len(tail) if text.startswith(tail, end) else end))
    return spans


# --- packing and batching ------------------------------------------------------------------------------------------

def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Pack examples into rows of at most max_length tokens (first-fit decreasing; deterministic).

    Each packed sample keeps its own positions (0, 1, ...): a position reset is a sample boundary that attention
    never crosses (the LLM engine attends each sample on its own, studio.engines.packed_attention; transformers'
    sdpa masks the row block-diagonally). The first label of each sample is IGNORE: it would otherwise be predicted
    from the sample before.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    rows: list[list[Example]] = []
    room: list[int] = []
    for i in order:
        example = examples[i]
        slot = next((r for r, free in enumerate(room) if free >= len(example)), None)
        if slot is None:
            rows.append([])
            room.append(max_length)
            slot = len(rows) - 1
        rows[slot].append(example)
        room[slot] -= len(example)
    return [_concat(row) for row in rows]


def _concat(row: list[Example]) -> Example:
    ids, labels, positions = [], [], []
    for example in row:
        ids += example.input_ids
        labels += [IGNORE] + example.labels[1:]
        positions += example.position_ids
    return Example(ids, labels, positions)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, labels and position_ids (no attention_mask, on purpose).

    With right padding a causal model never lets a real token attend to padding, so no mask is needed; and
    position_ids that restart mark packed samples, which transformers masks only when attention_mask is None.
    Padding continues the last sample's positions, so an unpacked batch stays one plain causal sequence per row
    (the fast is_causal attention path).
    """
    import torch  # here, not at the top: the studio's Dataset tab reads text datasets without torch

    width = max(len(e) for e in examples)
    ids, labels, positions = [], [], []
    for e in examples:
        pad = width - len(e)
        ids.append(e.input_ids + [pad_id] * pad)
        labels.append(e.labels + [IGNORE] * pad)
        positions.append(e.position_ids + list(range(e.position_ids[-1] + 1, e.position_ids[-1] + 1 + pad)))
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(positions)}
