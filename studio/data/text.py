"""Text datasets for LLM LoRA, read: files → records (conversations or plain documents), every problem reported
at once (`read_dataset`). Tokenizing, packing and batching them: studio.data.text_tokens.

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
from typing import Iterator

from studio.errors import StudioError

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
