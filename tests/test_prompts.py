"""Prompt data: the authors' filtering, clear errors for unusable datasets, and no train/eval text overlap."""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from trl_retmask.prompts import first_user_turn, load_prompts, shipped_prompts

DATA = Path(__file__).resolve().parent.parent / "trl_retmask" / "data"
WINDOW = 50


def script_args(**kw):
    """The fields `load_prompts` reads (those of the recipes' script arguments), with their defaults."""
    base = dict(
        dataset_name=None,
        dataset_config=None,
        dataset_data_files=None,
        dataset_train_split="train",
        dataset_streaming=False,
        prompt_column=None,
        max_prompts=None,
        enable_thinking=None,
    )
    return SimpleNamespace(**{**base, **kw})


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def user(text):
    return [{"role": "user", "content": text}, {"role": "assistant", "content": "reply"}]


# Rows shaped like LMSYS-Chat-1M-Synth after the merge script: `conversation` plus the authors' flags.
SYNTH_ROWS = [
    {
        "conversation": user("keep me"),
        "redacted": False,
        "empty_user_instruction_ja": False,
        "duplicate_user_instruction_ja": None,
    },
    {
        "conversation": user("secret NAME_1"),
        "redacted": True,
        "empty_user_instruction_ja": False,
        "duplicate_user_instruction_ja": None,
    },
    {
        "conversation": user("   "),
        "redacted": False,
        "empty_user_instruction_ja": True,
        "duplicate_user_instruction_ja": None,
    },
    {
        "conversation": user("keep me"),
        "redacted": False,
        "empty_user_instruction_ja": False,
        "duplicate_user_instruction_ja": "conv-0",
    },
    {
        "conversation": user("also kept"),
        "redacted": False,
        "empty_user_instruction_ja": False,
        "duplicate_user_instruction_ja": None,
    },
    {
        "conversation": user("keep me"),
        "redacted": False,
        "empty_user_instruction_ja": False,
        "duplicate_user_instruction_ja": None,
    },  # same text but not flagged: the authors keep it
]


def authors_keep(record):
    """`synthesize_assistant_response.py`'s skip rule, verbatim, negated."""
    return not (
        record.get("empty_user_instruction_ja", False)
        or record.get("duplicate_user_instruction_ja") is not None
        or record.get("redacted", False)
    )


def contents(dataset):
    return [row["prompt"][0]["content"] for row in dataset]


def test_authors_filter_on_flagged_chat_logs(tmp_path, caplog):
    path = write_jsonl(tmp_path / "synth.jsonl", SYNTH_ROWS)
    expected = [r["conversation"][0]["content"] for r in SYNTH_ROWS if authors_keep(r)]
    with caplog.at_level(logging.INFO, logger="trl_retmask.prompts"):
        assert contents(load_prompts(script_args(dataset_name=path))) == expected == ["keep me", "also kept", "keep me"]
    assert "kept 3, dropped 1 empty, 1 redacted, 1 duplicate" in caplog.text
    # max_prompts counts kept prompts, after the filter
    assert contents(load_prompts(script_args(dataset_name=path, max_prompts=2))) == ["keep me", "also kept"]
    # the filter can be turned off; empty turns are dropped all the same
    unfiltered = load_prompts(script_args(dataset_name=path, filter_prompts=False))
    assert contents(unfiltered) == [
        first_user_turn(r["conversation"]) for r in SYNTH_ROWS if first_user_turn(r["conversation"])
    ]


def test_max_prompts_stops_reading_at_the_limit(tmp_path, caplog):
    """`max_prompts` is exact (N kept prompts, all when N equals or exceeds what there is) and reading stops at the
    N-th kept prompt: rows after it are neither kept nor counted as dropped."""
    path = write_jsonl(tmp_path / "synth.jsonl", SYNTH_ROWS)
    for limit, kept, dropped in (
        (1, ["keep me"], "none"),
        (2, ["keep me", "also kept"], "1 empty, 1 redacted, 1 duplicate"),
        (3, ["keep me", "also kept", "keep me"], "1 empty, 1 redacted, 1 duplicate"),
        (4, ["keep me", "also kept", "keep me"], "1 empty, 1 redacted, 1 duplicate"),
    ):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="trl_retmask.prompts"):
            assert contents(load_prompts(script_args(dataset_name=path, max_prompts=limit))) == kept, limit
        assert f"kept {len(kept)}, dropped {dropped}." in caplog.text, (limit, caplog.text)
    shipped = len(shipped_prompts())
    assert len(load_prompts(script_args(max_prompts=shipped))) == shipped
    assert len(load_prompts(script_args(max_prompts=shipped - 1))) == shipped - 1


def test_prompt_column_chooses_the_column(tmp_path):
    path = write_jsonl(tmp_path / "two.jsonl", [{"prompt": f"p{i}", "question": f"q{i}"} for i in range(3)])
    assert contents(load_prompts(script_args(dataset_name=path))) == ["p0", "p1", "p2"]  # auto: `prompt` first
    assert contents(load_prompts(script_args(dataset_name=path, prompt_column="question"))) == ["q0", "q1", "q2"]


def test_authors_flags_at_their_edges(tmp_path):
    """The authors' rule verbatim: any duplicate flag that is not None (even "" or False) drops the row; a falsy
    empty/redacted flag (False, None, 0) keeps it."""
    edges = [
        ("dup empty string", {"duplicate_user_instruction_ja": ""}),
        ("dup false", {"duplicate_user_instruction_ja": False}),
        ("dup none", {"duplicate_user_instruction_ja": None}),
        ("empty zero", {"empty_user_instruction_ja": 0}),
        ("empty none", {"empty_user_instruction_ja": None}),
        ("redacted none", {"redacted": None}),
        ("redacted one", {"redacted": 1}),
    ]
    base = {"redacted": False, "empty_user_instruction_ja": False, "duplicate_user_instruction_ja": None}
    rows = [{**base, "conversation": user(text), **flags} for text, flags in edges]
    path = write_jsonl(tmp_path / "edges.jsonl", rows)
    kept = contents(load_prompts(script_args(dataset_name=path)))
    assert kept == [r["conversation"][0]["content"] for r in rows if authors_keep(r)]
    assert kept == ["dup none", "empty zero", "empty none", "redacted none"]


def test_chat_logs_without_flags_are_deduplicated_on_text(tmp_path):
    rows = [{"messages": user(t)} for t in ["a", "b", "a", " ", "c", "b"]]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    assert contents(load_prompts(script_args(dataset_name=path))) == ["a", "b", "c"]
    assert contents(load_prompts(script_args(dataset_name=path, filter_prompts=False))) == ["a", "b", "a", "c", "b"]


def test_plain_prompt_columns_keep_duplicates_and_drop_blanks(tmp_path, caplog):
    path = write_jsonl(tmp_path / "p.jsonl", [{"instruction": t} for t in ["x", "", "x", "  \n", "y"]])
    with caplog.at_level(logging.INFO, logger="trl_retmask.prompts"):
        assert contents(load_prompts(script_args(dataset_name=path))) == ["x", "x", "y"]
    assert "dropped 2 empty" in caplog.text


def test_synth_without_user_turns_says_how_to_get_them(tmp_path):
    rows = [
        {k: v for k, v in r.items() if k != "conversation"} | {"conversation_id": str(i)}
        for i, r in enumerate(SYNTH_ROWS)
    ]
    path = write_jsonl(tmp_path / "lmsys-chat-1m-synth.jsonl", rows)
    with pytest.raises(ValueError, match="No user turns.*lmsys/lmsys-chat-1m.*exec_merge_lmsys-chat-1m_json_files"):
        load_prompts(script_args(dataset_name=path))


def test_conversations_without_user_messages_fail_clearly(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "assistant", "content": "hi"}]}] * 2)
    with pytest.raises(ValueError, match="No non-empty prompt in column 'messages'.*role 'user'.*--prompt_column"):
        load_prompts(script_args(dataset_name=path))


def test_no_prompt_column_names_columns_and_flag(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"foo": "x", "bar": 1}])
    with pytest.raises(ValueError, match=r"No prompt column.*\['foo', 'bar'\].*--prompt_column"):
        load_prompts(script_args(dataset_name=path))
    with pytest.raises(ValueError, match="not a column"):
        load_prompts(script_args(dataset_name=path, prompt_column="missing"))


def test_shipped_prompts_load_without_filtering_losses():
    shipped = shipped_prompts()
    assert len(load_prompts(script_args())) == len(shipped) == 224


# ------------------------------------------------------------------------------------ no train/eval overlap
def normalised(text):
    return " ".join(text.split())


def windows(texts):
    out = set()
    for t in map(normalised, texts):
        out.update(t[i : i + WINDOW] for i in range(len(t) - WINDOW + 1))
    return out


def read(paths):
    return [p.read_text(encoding="utf-8") for p in paths]


def detection_texts():
    from trl_retmask.niah_samples import load_haystack

    return [load_haystack()] + read(sorted((DATA / "haystack").glob("*.txt")))


def evaluation_texts():
    """What the evaluation suite and the general check draw from."""
    suite = read(sorted((DATA / "eval" / "suite").glob("*.txt")))
    short_answer = [
        json.loads(line)["question"] for line in (DATA / "eval" / "short_answer.jsonl").open() if line.strip()
    ]
    return suite + [(DATA / "eval" / "heldout_pg19.txt").read_text(encoding="utf-8")] + short_answer


def training_texts():
    return [row["prompt"] for row in map(json.loads, (DATA / "prompts" / "prompts.jsonl").open()) if row]


def shared_windows(texts, banned):
    return sorted(
        {w for t in map(normalised, texts) for i in range(len(t) - WINDOW + 1) if (w := t[i : i + WINDOW]) in banned}
    )


def test_no_evaluation_or_detection_text_in_training_prompts():
    hits = shared_windows(training_texts(), windows(detection_texts() + evaluation_texts()))
    assert not hits, f"{len(hits)} 50-character windows of evaluation/detection text in training prompts: {hits[:3]}"


# The PG-19 excerpts end each chapter with this fixed question (and a chapter summary): a template line, not text.
SUMMARY_QUESTION = "Q: Can you write an appropriate summary of the above paragraphs?"


def test_suite_text_is_disjoint_from_detection_haystack():
    suite = read(sorted((DATA / "eval" / "suite").glob("*.txt")))
    assert suite and sum(map(len, suite)) > 40_000  # enough sentences for 2048-token contexts
    no_template = [
        [t.replace(SUMMARY_QUESTION, "\n") for t in texts] for texts in (evaluation_texts(), detection_texts())
    ]
    assert not shared_windows(no_template[0], windows(no_template[1]))


# ---------------------------------------------------------------------------------------- bundled scores
def test_olmo3_think_scores_are_bundled_with_46_heads_over_threshold():
    from trl_retmask.scores import HeadScores

    path = DATA / "head_scores" / "Olmo-3-7B-Think.json"
    raw = json.loads(path.read_text())
    expected = {tuple(map(int, k.split("-"))) for k, v in raw.items() if np.mean(v) >= 0.1}
    assert len(expected) == 46
    scores = HeadScores.load(path)
    assert set(scores.select(threshold=0.1)) == expected


def test_dataset_folder_options_reach_load_dataset(tmp_path, monkeypatch):
    """`dataset_data_files`, `dataset_streaming` and `dataset_config` are passed to `datasets.load_dataset` and
    change what is read: only the named file, streamed (read lazily, stopped at `max_prompts`), same prompts."""
    import datasets

    folder = tmp_path / "prompts"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"prompt": f"from a {i}"} for i in range(2)])
    write_jsonl(folder / "b.jsonl", [{"prompt": f"from b {i}"} for i in range(3)])
    calls = []
    real = datasets.load_dataset

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", recording)
    everything = load_prompts(script_args(dataset_name=str(folder)))
    assert sorted(contents(everything)) == ["from a 0", "from a 1", "from b 0", "from b 1", "from b 2"]
    only_b = load_prompts(script_args(dataset_name=str(folder), dataset_data_files="b.jsonl"))
    assert contents(only_b) == ["from b 0", "from b 1", "from b 2"]
    streamed = load_prompts(
        script_args(dataset_name=str(folder), dataset_data_files="b.jsonl", dataset_streaming=True, max_prompts=2)
    )
    assert contents(streamed) == ["from b 0", "from b 1"]
    assert [(c["data_files"], c["streaming"]) for c in calls] == [(None, False), ("b.jsonl", False), ("b.jsonl", True)]
    assert isinstance(
        real(str(folder), data_files="b.jsonl", split="train", streaming=True), datasets.IterableDataset
    )  # what `streaming` gives load_prompts to iterate
    with pytest.raises(Exception, match="my_config"):  # a folder has no configurations: the name reaches the builder
        load_prompts(script_args(dataset_name=str(folder), dataset_config="my_config"))
    assert calls[-1]["name"] == "my_config"
