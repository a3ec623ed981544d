"""Real data (../shared/data beside the repo): document counts, BigBench first prompts, token split."""

from pathlib import Path

import pytest

from parity.tasks.docs import count_docs, load_docs
from parity.tasks.registry import TESTS

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
TOKENIZER = SHARED / "tokenizers" / "llama2-tokenizer.model"

REAL_COUNTS = {
    "bigbench_date_understanding": 369, "bigbench_general_knowledge": 70, "bigbench_human_organs_senses": 42,
    "bigbench_intent_recognition": 693, "bigbench_riddle_sense": 49, "bigbench_similarities_abstraction": 76,
    "bigbench_simple_arithmetic_json_multiple_choice": 8, "bigbench_undo_permutation": 300,
    **{f"xcopa_{lang}": 500 for lang in ("et", "ht", "id", "it", "qu", "sw", "th", "tr", "vi", "zh", "ta")},
    "xcopa_en": 100, "boolq": 3270, "piqa": 1838, "winogrande": 1267, "hellaswag": 10042,
}


@pytest.mark.parametrize("test_id", list(REAL_COUNTS))
def test_real_document_counts(test_id):
    source, n, n_bad = count_docs(test_id, SHARED)
    assert (n, n_bad) == (REAL_COUNTS[test_id], 0)
    assert source.startswith(str(SHARED))


def test_real_mmlu_counts():
    total = sum(count_docs(t, SHARED)[1] for t in TESTS if t.startswith("mmlu_"))
    assert total == 14042


def test_undo_permutation_subtask_ids():
    docs = load_docs("bigbench_undo_permutation", SHARED).docs
    ids = [d.doc_id for d in docs]
    assert ids[0] == "reorder_byswap/0" and ids[100] == "reorder_chars/0" and ids[-1] == "reorder_words/99"


def test_permutation_is_numpy_seed_42():
    """The choice orders below were derived from these permutations of the sorted keys."""
    import numpy as np

    assert list(np.random.RandomState(42).permutation(4)) == [1, 3, 0, 2]
    assert list(np.random.RandomState(42).permutation(5)) == [1, 4, 2, 0, 3]
    assert list(np.random.RandomState(42).permutation(6)) == [0, 1, 5, 2, 4, 3]


# First prompt of each task, written out from its task.json and BIG-bench's json-task rules:
# task_prefix + example_input_prefix ("\nQ: ") + input [+ choice_prefix ("\n  choice: ") joined over the
# sorted keys permuted by RandomState(42)] + example_output_prefix ("\nA: ").
FIRST_PROMPTS = {
    # append_choices_to_input false
    "date_understanding": "\nQ: Yesterday was April 30, 2021. What is the date today in MM/DD/YYYY?\nA: ",
    # sorted: four none one six three two; permutation(6) = 0 1 5 2 4 3
    "general_knowledge": "\nQ: How many legs do horses have?\n  choice: four\n  choice: none\n  choice: two"
                         "\n  choice: one\n  choice: three\n  choice: six\nA: ",
    # no append key (default true); sorted: ear eye lip mouth; permutation(4) = 1 3 0 2
    "human_organs_senses": "\nQ: Which organ is for seeing?\n  choice: eye\n  choice: mouth\n  choice: ear"
                           "\n  choice: lip\nA: ",
    # its own prefixes: input "" and output "\nIntent: "; no choices appended
    "intent_recognition": "Predict the intent of the utterance. The possible choices for the intents are: "
                          "add_to_playlist, book_restaurant, get_weather, play_music, search_screening_event, "
                          "search_creative_work, and rate_book.\n\nUtterance: Add Sabrina Salerno to the grime "
                          "instrumentals playlist.\nIntent: ",
    # sorted: dollar landfill sanctuary scale table; permutation(5) = 1 4 2 0 3
    "riddle_sense": "\nQ: I have more than two legs, but no arms or body. A lot of pressure is put on me. I'm used "
                    "regularly and for a number of purposes. What exactly am I?\n  choice: landfill\n  choice: table"
                    "\n  choice: sanctuary\n  choice: dollar\n  choice: scale\nA: ",
    # task_prefix is a worked example ending in "\n"; no choices appended
    "similarities_abstraction": "Q: Tell me how an apple and a banana are alike. \nA: Both are fruit.\n"
                                "\nQ: Tell me how a wristwatch and a digital thermometer are alike.\nA: ",
    # choice_prefix " option: "; sorted: 3 4 5 6; permutation(4) = 1 3 0 2
    "simple_arithmetic_json_multiple_choice": "\nQ: 1 + 4 = option: 4 option: 6 option: 3 option: 5\nA: ",
    # first subtask (reorder_byswap), append true; 5 keys sorted then permutation(5) = 1 4 2 0 3
    "undo_permutation": "In the following sentences with shuffled words, find the correct order of word swaps to "
                        "unscramble the sentence.\n\nQ: in voice always father my very loud a speaks."
                        "\n  choice: 5-3, 1-0, 6-5, 8-3, 8-1, 6-1, 4-8, 3-4, 5-7, 3-4, 8-0"
                        "\n  choice: 8-6, 8-4, 4-5, 6-8, 8-5, 2-4, 4-6, 8-1, 0-6, 5-2, 5-2, 3-6, 6-4"
                        "\n  choice: 7-1, 1-8, 7-6, 4-3, 4-1, 0-5, 8-0, 5-4, 7-4"
                        "\n  choice: 3-8, 8-1, 5-1, 4-8, 8-3, 2-1"
                        "\n  choice: 7-3, 5-2, 0-8, 7-1, 3-6, 1-4\nA: ",
}


@pytest.mark.parametrize("task", list(FIRST_PROMPTS))
def test_bigbench_first_prompt(task):
    doc = load_docs(f"bigbench_{task}", SHARED, limit=1).docs[0]
    assert {ctx for ctx, _ in doc.requests} == {FIRST_PROMPTS[task]}
    scores = doc.scores
    assert max(scores) == 1 and [scores[i] for i in ([doc.gold] if isinstance(doc.gold, int) else doc.gold)] == [1.0]


def test_bigbench_continuations_are_keys_in_file_order():
    doc = load_docs("bigbench_general_knowledge", SHARED, limit=1).docs[0]
    assert [c for _, c in doc.requests] == ["two", "four", "six", "three", "one", "none"]
    assert doc.gold == [1] and doc.scores == [0, 1, 0, 0, 0, 0]


@pytest.mark.skipif(not TOKENIZER.is_file(), reason="no Llama-2 tokenizer")
def test_answer_letter_split_with_llama2_tokenizer():
    import sentencepiece as spm

    from parity.tasks.tokenize import build_requests

    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    assert sp.EncodeAsIds(" A") == [29871, 319]  # what encoding the continuation alone would give
    doc = load_docs("mmlu_anatomy", SHARED, limit=1).docs[0]
    reqs = build_requests([doc], TOKENIZER)[0]
    assert [r.continuation for r in reqs] == [(319,), (350,), (315,), (360,)]
    assert reqs[0].context[0] == 1 and reqs[0].context[1:] == tuple(sp.EncodeAsIds(doc.requests[0][0]))
    # BigBench "\nA: " + "four": the trailing space moves into the continuation
    bb = load_docs("bigbench_general_knowledge", SHARED, limit=1).docs[0]
    r = build_requests([bb], TOKENIZER)[0][1]
    assert r.continuation == tuple(sp.EncodeAsIds(bb.requests[1][0] + "four"))[len(r.context) - 1:]
    assert sp.DecodeIds(list(r.continuation)) == "four"


def test_hellaswag_text_format_prompts():
    doc = load_docs("hellaswag", SHARED, limit=1).docs[0]
    assert doc.requests[3] == ("Roof shingle removal: A man is sitting on a roof. he",
                               " starts pulling up roofing on a roof.")
    assert doc.gold == 3 and len(doc.requests) == 4
