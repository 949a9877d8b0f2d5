"""Text datasets for LLM LoRA: formats, assistant-only masking, every bad case's message, truncation, packing."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from studio.data.text import IGNORE, TextDatasetError, raise_problems, read_dataset
from studio.data.text_tokens import collate, ensure_chat_template, pack, tokenize_records
from studio.engines.packed_attention import GROUPED

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What do bees make?"},
        {"role": "assistant", "content": "Honey."}]


@pytest.fixture(scope="module")
def tok(demo):
    return AutoTokenizer.from_pretrained(demo.llama)


def write(folder, name, content):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if isinstance(content, list):
        content = "\n".join(json.dumps(c) if not isinstance(c, str) else c for c in content) + "\n"
    path.write_text(content, encoding="utf-8")
    return path


def trained_text(tok, example):
    """The text of the tokens that carry loss."""
    return tok.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE])


# --- formats -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("record", [
    {"messages": CHAT},
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What do bees make?"},
                       {"from": "gpt", "value": "Honey."}]},
    {"system": "Be brief.", "conversations": [{"from": "human", "value": "What do bees make?"},
                                              {"from": "gpt", "value": "Honey."}]},
    {"instruction": "What do bees make?", "input": "", "output": "Honey.", "system": "Be brief."},
])
def test_chat_formats_parse_to_the_same_conversation(tmp_path, record):
    write(tmp_path, "data.jsonl", [record])
    report = read_dataset(tmp_path)
    assert report.problems == []
    assert [(r.source, r.messages) for r in report.records] == [("data.jsonl line 1", CHAT)]


def test_alpaca_input_joins_the_instruction(tmp_path):
    write(tmp_path, "a.jsonl", [{"instruction": "Translate to French.", "input": "cat", "output": "chat"}])
    assert read_dataset(tmp_path).records[0].messages == [
        {"role": "user", "content": "Translate to French.\n\ncat"}, {"role": "assistant", "content": "chat"}]


def test_folder_mixes_txt_json_jsonl_and_formats(tmp_path):
    write(tmp_path, "notes.txt", "First document,\nstill first.\n\n\n  Second document.\r\n\r\nThird.\n")
    write(tmp_path, "list.json", '[\n  {"messages": [{"role": "user", "content": "hi"},\n'
                                 '   {"role": "assistant", "content": "hello"}]},\n  {"text": "plain"}\n]')
    write(tmp_path, "chat.jsonl", [{"messages": CHAT}, "", {"instruction": "q", "output": "a"}])
    write(tmp_path, "ignored.csv", "not,read\n")
    report = read_dataset(tmp_path)
    assert report.problems == []
    got = [(r.source, r.text) for r in report.records]
    assert got == [("chat.jsonl line 1", None), ("chat.jsonl line 3", None), ("list.json line 2", None),
                   ("list.json line 4", "plain"), ("notes.txt line 1", "First document,\nstill first."),
                   ("notes.txt line 5", "Second document."), ("notes.txt line 7", "Third.")]


def test_single_file_path_is_accepted(tmp_path):
    path = write(tmp_path, "one.jsonl", [{"messages": CHAT}])
    assert len(read_dataset(path).records) == 1


def test_system_prompt_is_added_only_when_missing(tmp_path):
    write(tmp_path, "c.jsonl", [{"messages": CHAT}, {"messages": CHAT[1:]}])
    records = read_dataset(tmp_path, system_prompt="You are a pirate.").records
    assert records[0].messages[0]["content"] == "Be brief."
    assert records[1].messages[0] == {"role": "system", "content": "You are a pirate."}


# --- bad data: one message each, all at once ------------------------------------------------------------------------

@pytest.mark.parametrize("lines,expected", [
    (['{"messages": [}'], "d.jsonl line 1: not valid JSON"),
    ([{"question": "q", "answer": "a"}], "d.jsonl line 1: unknown record format (keys: question, answer). Expected "
                                         "one of: messages"),
    ([[1, 2]], "d.jsonl line 1: expected a JSON object, found list"),
    ([{"messages": []}], "d.jsonl line 1: 'messages' must be a non-empty list"),
    ([{"messages": [{"role": "user"}]}], 'turn 1 of \'messages\' must be an object with "role" and "content"'),
    ([{"messages": [{"role": "bot", "content": "x"}]}], "turn 1: role 'bot' is not one of system, user, assistant"),
    ([{"messages": CHAT[1:2]}], "d.jsonl line 1: the conversation has no assistant reply to learn from"),
    ([{"messages": CHAT[1:] + CHAT[:1]}], "a system message may only come first"),
    ([{"conversations": [{"from": "tool", "value": "x"}]}], 'turn 1: "from": "tool" is not supported'),
    ([{"instruction": "q", "input": "x"}], "an alpaca record needs 'output'"),
    ([{"instruction": "", "output": "a"}], "'instruction' is empty"),
    ([{"text": 3}], "'text' must be text, found int"),
    (["", {"messages": CHAT}, "", "{oops"], "d.jsonl line 4: not valid JSON"),
])
def test_each_jsonl_problem_names_file_line_and_expectation(tmp_path, lines, expected):
    write(tmp_path, "d.jsonl", lines)
    report = read_dataset(tmp_path)
    assert len(report.problems) == 1 and expected in report.problems[0], report.problems


@pytest.mark.parametrize("name,content,expected", [
    ("d.json", '{"messages": []}', "d.json line 1: a .json file must hold a list of objects"),
    ("d.json", '[\n {"messages": ' + json.dumps(CHAT) + '},\n\n {"bad": 1}\n]', "d.json line 4: unknown record format"),
    ("d.json", '[\n {"text": "a"}\n {"text": "b"}]', "d.json line 3: expected ',' or ']'"),
    ("d.json", '[\n {"text": "a",,}]', "d.json line 2: not valid JSON"),
])
def test_json_list_problems_name_the_line(tmp_path, name, content, expected):
    write(tmp_path, name, content)
    report = read_dataset(tmp_path)
    assert len(report.problems) == 1 and expected in report.problems[0], report.problems


def test_folder_level_problems(tmp_path):
    assert "holds no .txt/.jsonl/.json files" in read_dataset(tmp_path).problems[0]
    assert "does not exist" in read_dataset(tmp_path / "nope").problems[0]
    write(tmp_path, "empty.jsonl", "\n\n")
    assert "holds no training samples" in read_dataset(tmp_path).problems[0]
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert "latin1.txt: not UTF-8 text" in read_dataset(tmp_path).problems[0]


def test_explicit_format_is_enforced(tmp_path):
    write(tmp_path, "d.jsonl", [{"messages": CHAT}])
    write(tmp_path, "n.txt", "plain")
    problems = read_dataset(tmp_path, data_format="alpaca").problems
    assert "d.jsonl line 1: data_format is alpaca, so a record must look like {\"instruction\"" in problems[0]
    assert "n.txt: a .txt file is plain text, but data_format is alpaca" in problems[1]


def test_all_problems_reported_in_one_error(tmp_path):
    write(tmp_path, "d.jsonl", ["{bad", {"messages": CHAT}, {"x": 1}])
    write(tmp_path, "e.jsonl", [{"messages": []}])
    report = read_dataset(tmp_path)
    with pytest.raises(TextDatasetError) as err:
        report.raise_if_problems()
    message = str(err.value)
    assert message.startswith("The dataset has 3 problem(s)")
    assert all(where in message for where in ("d.jsonl line 1", "d.jsonl line 3", "e.jsonl line 1"))
    assert len(report.records) == 1  # the good line still parsed


# --- tokenization: chat template and assistant-only loss -----------------------------------------------------------

def test_loss_only_on_assistant_tokens(tmp_path, tok):
    convo = CHAT + [{"role": "user", "content": "And cows?"}, {"role": "assistant", "content": "Milk."}]
    write(tmp_path, "c.jsonl", [{"messages": convo}])
    data = tokenize_records(read_dataset(tmp_path).records, tok, max_length=256)
    example = data.examples[0]
    assert tok.decode(example.input_ids) == tok.apply_chat_template(convo, tokenize=False)
    # The replies and their end-of-turn markers; never the system prompt, the questions or the role headers.
    assert trained_text(tok, example) == "Honey.<|end|>\nMilk.<|end|>\n"
    assert example.position_ids == list(range(len(example.input_ids)))

    everything = tokenize_records(read_dataset(tmp_path).records, tok, 256, train_on_prompt=True).examples[0]
    assert everything.labels == everything.input_ids


def test_templates_that_rewrite_history_still_mask_correctly(tmp_path, tok):
    """Like Qwen3: the last assistant turn gets an (empty) think block, earlier ones do not."""
    rewriting = AutoTokenizer.from_pretrained(tok.name_or_path)
    rewriting.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' }}"
        "{% if m['role'] == 'assistant' and loop.last %}{{ '<think></think>' }}{% endif %}"
        "{{ m['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
    convo = CHAT + [{"role": "user", "content": "And cows?"}, {"role": "assistant", "content": "Milk."}]
    write(tmp_path, "c.jsonl", [{"messages": convo}])
    example = tokenize_records(read_dataset(tmp_path).records, rewriting, 256).examples[0]
    assert trained_text(rewriting, example) == "Honey.<|end|>\n<think></think>Milk.<|end|>\n"


def test_default_template_for_tokenizers_without_one(tmp_path, tok):
    base = AutoTokenizer.from_pretrained(tok.name_or_path)
    base.chat_template = None
    assert ensure_chat_template(base) and not ensure_chat_template(base)
    write(tmp_path, "c.jsonl", [{"messages": CHAT}])
    example = tokenize_records(read_dataset(tmp_path).records, base, 256).examples[0]
    assert tok.decode(example.input_ids) == ("<|system|>\nBe brief.\n<|user|>\nWhat do bees make?\n"
                                             "<|assistant|>\nHoney.<|end|>\n")
    assert trained_text(base, example) == "Honey.<|end|>\n"  # the reply ends with EOS: the model learns to stop


def test_template_errors_are_reported_per_sample(tmp_path, tok):
    strict = AutoTokenizer.from_pretrained(tok.name_or_path)
    strict.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                            "supported') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    write(tmp_path, "c.jsonl", [{"messages": CHAT[1:]}, {"messages": CHAT}])
    data = tokenize_records(read_dataset(tmp_path).records, strict, 256)
    assert data.problems == ["c.jsonl line 2: the tokenizer's chat template rejected this conversation "
                             "(System role not supported)."]
    with pytest.raises(TextDatasetError, match="c.jsonl line 2"):
        raise_problems(data.problems)


def test_truncation_is_counted_and_answerless_samples_dropped(tmp_path, tok):
    long_question = {"role": "user", "content": "What do bees make? " * 20}
    write(tmp_path, "c.jsonl", [{"messages": CHAT}, {"messages": [long_question, CHAT[2]]},
                                {"messages": CHAT[1:] + [long_question, CHAT[2]]}])
    data = tokenize_records(read_dataset(tmp_path).records, tok, max_length=40)
    assert (data.truncated, data.dropped, len(data.examples)) == (2, 1, 2)
    assert all(len(e) <= 40 for e in data.examples)
    assert trained_text(tok, data.examples[1]) == "Honey.<|end|>\n"  # the first reply survived the cut
    assert data.summary(40) == ("2 conversation(s) were longer than max_length=40 tokens and were truncated; 1 "
                                "sample(s) had no answer tokens left and were skipped. Raise max_length to keep more.")


def test_long_documents_are_split_not_cut(tmp_path, tok):
    text = "The quick brown fox jumps over the lazy dog. " * 10
    write(tmp_path, "d.txt", text)
    data = tokenize_records(read_dataset(tmp_path).records, tok, max_length=32)
    assert data.split == 1 and data.truncated == 0 and len(data.examples) > 1
    ids = [t for e in data.examples for t in e.input_ids]
    assert tok.decode(ids) == text.rstrip() + tok.eos_token
    assert all(e.labels == e.input_ids and len(e) <= 32 for e in data.examples)


# --- packing and batching ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def examples(tok, tmp_path_factory):
    from studio.demo.datasets import DEMO_QA
    folder = tmp_path_factory.mktemp("qa")
    write(folder, "qa.jsonl", [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                               for q, a in DEMO_QA])
    return tokenize_records(read_dataset(folder).records, tok, 64).examples


def test_packing_fills_rows_and_keeps_every_token(examples):
    rows = pack(examples, 64)
    assert len(rows) < len(examples) and all(len(r) <= 64 for r in rows)
    assert sorted(t for r in rows for t in r.input_ids) == sorted(t for e in examples for t in e.input_ids)
    row = next(r for r in rows if r.position_ids.count(0) > 1)
    starts = [i for i, p in enumerate(row.position_ids) if p == 0]
    assert all(row.labels[i] == IGNORE for i in starts)  # never predict a sample from the one before it
    assert sum(label != IGNORE for r in rows for label in r.labels) == sum(
        label != IGNORE for e in examples for label in e.labels[1:])


@pytest.mark.parametrize("attention", ["sdpa", GROUPED])  # transformers' block mask; ours
def test_packed_samples_do_not_attend_to_each_other(demo, examples, attention):
    """The logits of a sample inside a packed row equal its logits alone: attention stops at the boundary."""
    model = AutoModelForCausalLM.from_pretrained(demo.llama, attn_implementation=attention).eval()
    row = next(r for r in pack(examples, 64) if r.position_ids.count(0) > 1)
    second = [i for i, p in enumerate(row.position_ids) if p == 0][1]
    alone = collate([next(e for e in examples if e.input_ids == row.input_ids[second:second + len(e)])], 0)
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in collate([row], 0).items() if k != "labels"}, use_cache=False).logits
        alone_logits = model(**{k: v for k, v in alone.items() if k != "labels"}, use_cache=False).logits
    n = alone["input_ids"].shape[1]
    torch.testing.assert_close(packed_logits[0, second:second + n], alone_logits[0], atol=1e-5, rtol=1e-5)


def test_collate_pads_right_without_loss(examples):
    short, long = sorted(examples[:2], key=len)
    batch = collate([short, long], pad_id=2)
    width = len(long)
    assert batch["input_ids"].shape == (2, width)
    pad = width - len(short)
    assert batch["input_ids"][0, len(short):].tolist() == [2] * pad
    assert batch["labels"][0, len(short):].tolist() == [IGNORE] * pad
    assert batch["position_ids"][0].tolist() == list(range(width))  # one causal sequence: the fast attention path
