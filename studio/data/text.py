"""Text datasets for LLM LoRA: reading, chat rendering, loss masking, truncation, packing, batching.

read_dataset(path)          files → records (conversations or plain documents), every problem reported at once
tokenize_records(records)   records → examples: token ids + labels (IGNORE where no loss is computed)
pack(examples)              short examples → rows of up to max_length tokens (optional)
collate(examples)           examples → padded tensors for the model

Accepted files (a folder holds any mix; each record's format is detected from its keys unless data_format is set):
  .txt     plain text; each blank-line-separated block is one document, trained on every token. A document longer
           than max_length is split into max_length pieces rather than truncated, so no text is lost.
  .jsonl   one JSON object per line;  .json  a list of JSON objects. Objects are one of
           alpaca    {"instruction", "input" (optional), "output", "system" (optional)}
           sharegpt  {"conversations": [{"from": "system"|"human"|"gpt", "value"}], "system" (optional)}
           messages  {"messages": [{"role": "system"|"user"|"assistant", "content"}]}
           text      {"text"}  (a plain document, as in a .txt file)

Pure data code: it uses the tokenizer (for its chat template), never the model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from jinja2 import TemplateError

from studio.errors import StudioError

if TYPE_CHECKING:
    import torch

IGNORE = -100  # label of a token that carries no loss (torch's cross_entropy ignore_index)
TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
FORMAT_KEYS = {  # format → the key that identifies it, and what a record of it looks like (for error messages)
    "messages": ("messages", '{"messages": [{"role": ..., "content": ...}]}'),
    "sharegpt": ("conversations", '{"conversations": [{"from": ..., "value": ...}]}'),
    "alpaca": ("instruction", '{"instruction": ..., "input": ..., "output": ...}'),
    "text": ("text", '{"text": ...}'),
}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant"}
CHAT_ROLES = ("system", "user", "assistant")

# Used when a tokenizer has no chat template (base models). Ends each assistant turn with the EOS token so the
# trained model learns to stop; Zephyr-style role markers read fine as plain text to any tokenizer.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token or '' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


class TextDatasetError(StudioError):
    """A text dataset with problems; the message lists every one."""


def raise_problems(problems: list[str]) -> None:
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise TextDatasetError(f"The dataset has {len(problems)} problem(s); fix them and start again:\n"
                               f"{listing}{more}")


# --- reading -------------------------------------------------------------------------------------------------------

@dataclass
class Record:
    """One training sample before tokenization: a conversation or a plain document."""
    source: str  # "chat.jsonl line 3": where a problem with it is reported
    messages: list[dict] | None = None  # [{"role": "system"|"user"|"assistant", "content": str}, ...]
    text: str | None = None


@dataclass
class TextReport:
    records: list[Record] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def raise_if_problems(self) -> None:
        raise_problems(self.problems)


def list_text_files(path: str | Path) -> list[Path]:
    """The dataset's files: `path` itself if it is a file, else every .txt/.jsonl/.json in the folder."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)


def read_dataset(path: str | Path, data_format: str = "auto", system_prompt: str | None = None) -> TextReport:
    """Parse every file; collect the records and one message per problem (file, line, what was expected)."""
    path = Path(path)
    report = TextReport()
    if not path.exists():
        report.problems.append(f"{path} does not exist. Set train_data_dir to a folder of .txt/.jsonl/.json files.")
        return report
    files = list_text_files(path)
    if not files:
        report.problems.append(f"{path} holds no {'/'.join(TEXT_SUFFIXES)} files. Add your training data there.")
    for file in files:
        _read_file(file, data_format, report)
    if system_prompt:
        for record in report.records:
            if record.messages is not None and record.messages[0]["role"] != "system":
                record.messages.insert(0, {"role": "system", "content": system_prompt})
    if files and not report.records and not report.problems:
        report.problems.append(f"{path} holds no training samples (the files are empty). Add some.")
    return report


def _read_file(file: Path, data_format: str, report: TextReport) -> None:
    suffix = file.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        report.problems.append(f"{file.name}: {suffix or 'files without a suffix'} cannot be read; use "
                               f"{', '.join(TEXT_SUFFIXES)}.")
        return
    try:
        content = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        report.problems.append(f"{file.name}: not UTF-8 text ({exc.reason} at byte {exc.start}). Save it as UTF-8.")
        return
    if suffix == ".txt":
        if data_format not in ("auto", "text"):
            report.problems.append(f"{file.name}: a .txt file is plain text, but data_format is {data_format}. "
                                   "Use data_format: auto, or convert the file to .jsonl.")
            return
        report.records += [Record(f"{file.name} line {line}", text=block) for line, block in _text_blocks(content)]
        return
    items = _jsonl_items(content) if suffix == ".jsonl" else _json_items(content)
    for line, obj, error in items:
        where = f"{file.name} line {line}"
        if error:
            report.problems.append(f"{where}: {error}")
            continue
        try:
            report.records.append(parse_record(obj, data_format, where))
        except ValueError as exc:
            report.problems.append(f"{where}: {exc}")


def _text_blocks(content: str) -> Iterator[tuple[int, str]]:
    """(first line number, text) of each blank-line-separated block."""
    for match in re.finditer(r"\S(?:.|\n(?![ \t\r]*\n))*", content):
        yield content.count("\n", 0, match.start()) + 1, match.group().rstrip()


def _jsonl_items(content: str) -> Iterator[tuple[int, object, str | None]]:
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line), None
        except json.JSONDecodeError as exc:
            yield number, None, f"not valid JSON ({exc.msg} at column {exc.colno}). Each line must be one object."


def _json_items(content: str) -> Iterator[tuple[int, object, str | None]]:
    """The elements of a top-level JSON list, each with the line it starts on (so problems can name the line)."""
    decoder = json.JSONDecoder()
    start = len(content) - len(content.lstrip())
    if content[start:start + 1] != "[":
        yield content.count("\n", 0, start) + 1, None, "a .json file must hold a list of objects: [{...}, {...}]."
        return
    pos = start + 1
    while True:
        pos = _skip(content, pos, " \t\r\n")
        if content[pos:pos + 1] == "]":
            return
        line = content.count("\n", 0, pos) + 1
        try:
            obj, pos = decoder.raw_decode(content, pos)
        except json.JSONDecodeError as exc:
            yield exc.lineno, None, f"not valid JSON ({exc.msg} at column {exc.colno})."
            return
        yield line, obj, None
        pos = _skip(content, pos, " \t\r\n")
        if content[pos:pos + 1] == ",":
            pos += 1
        elif content[pos:pos + 1] != "]":
            yield content.count("\n", 0, pos) + 1, None, "expected ',' or ']' after an object."
            return


def _skip(text: str, pos: int, chars: str) -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def parse_record(obj: object, data_format: str, where: str) -> Record:
    """One JSON object → a Record; ValueError says what was expected."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, found {type(obj).__name__}.")
    fmt = data_format if data_format != "auto" else detect_format(obj)
    key, shape = FORMAT_KEYS[fmt]
    if key not in obj:
        raise ValueError(f"data_format is {fmt}, so a record must look like {shape}; found keys: "
                         f"{', '.join(obj) or 'none'}.")
    if fmt == "text":
        return Record(where, text=_string(obj, "text", required=True))
    messages = {"messages": _messages, "sharegpt": _sharegpt, "alpaca": _alpaca}[fmt](obj)
    _check_conversation(messages)
    return Record(where, messages=messages)


def detect_format(obj: dict) -> str:
    for fmt, (key, _) in FORMAT_KEYS.items():
        if key in obj:
            return fmt
    shapes = "; ".join(f"{fmt} {shape}" for fmt, (_, shape) in FORMAT_KEYS.items())
    raise ValueError(f"unknown record format (keys: {', '.join(obj) or 'none'}). Expected one of: {shapes}.")


def _string(obj: dict, key: str, required: bool = False) -> str:
    value = obj.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be text, found {type(value).__name__}.")
    if required and not value.strip():
        raise ValueError(f"'{key}' is empty.")
    return value


def _turns(obj: dict, key: str, role_key: str, text_key: str) -> list[dict]:
    turns = obj[key]
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"'{key}' must be a non-empty list of {{\"{role_key}\": ..., \"{text_key}\": ...}} objects.")
    for n, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise ValueError(f"turn {n} of '{key}' must be an object with \"{role_key}\" and \"{text_key}\".")
        if not isinstance(turn[text_key], str):
            raise ValueError(f"turn {n} of '{key}': \"{text_key}\" must be text.")
    return turns


def _messages(obj: dict) -> list[dict]:
    turns = _turns(obj, "messages", "role", "content")
    for n, turn in enumerate(turns, 1):
        if turn["role"] not in CHAT_ROLES:
            raise ValueError(f"turn {n}: role '{turn['role']}' is not one of {', '.join(CHAT_ROLES)}.")
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def _sharegpt(obj: dict) -> list[dict]:
    turns = _turns(obj, "conversations", "from", "value")
    system = _string(obj, "system")
    messages = [{"role": "system", "content": system}] if system else []
    for n, turn in enumerate(turns, 1):
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise ValueError(f"turn {n}: \"from\": \"{turn['from']}\" is not supported; use one of "
                             f"{', '.join(SHAREGPT_ROLES)}.")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _alpaca(obj: dict) -> list[dict]:
    instruction, extra = _string(obj, "instruction", required=True), _string(obj, "input")
    if "output" not in obj:
        raise ValueError("an alpaca record needs 'output' (the answer to learn).")
    system = _string(obj, "system")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}, {"role": "assistant", "content": _string(obj, "output", required=True)}]


def _check_conversation(messages: list[dict]) -> None:
    if any(m["role"] == "system" for m in messages[1:]):
        raise ValueError("a system message may only come first.")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise ValueError("the conversation has no assistant reply to learn from.")


# --- tokenization: chat template, assistant-only labels, truncation ------------------------------------------------

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
