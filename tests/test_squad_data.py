"""Synthetic mini-SQuAD generator and the SQuAD loader (datasets JSON path + validation)."""

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from bert_squad import make_mini_squad as mms
from bert_squad.squad_data import load_squad, minilm_path, references
from common.runs import DataError


@pytest.fixture(scope="module")
def default_splits():
    """The default-size data the mini runs use (seed 0)."""
    return {"train": mms.generate_split("train", 4000, 0), "dev": mms.generate_split("dev", 600, 0)}


def _questions(squad):
    for art in squad["data"]:
        for para in art["paragraphs"]:
            for qa in para["qas"]:
                yield para["context"], qa


_QUESTION_PATTERNS = [
    (re.compile("^" + re.escape(t).replace(re.escape("{s}'s"), ".+'s?").replace(re.escape("{s}"), ".+") + "$"), k)
    for k, templates in mms.QUESTIONS.items() for t in templates]


def _fact_kind(question):
    """(entity kind, fact) of a generated question, recovered from its template."""
    return next(k for p, k in _QUESTION_PATTERNS if p.match(question))


def test_deterministic_and_seeded():
    a, _ = mms.generate_split("dev", 120, seed=3)
    b, _ = mms.generate_split("dev", 120, seed=3)
    c, _ = mms.generate_split("dev", 120, seed=4)
    assert json.dumps(a) == json.dumps(b) and json.dumps(a) != json.dumps(c)
    assert mms.count(a)[1] == 120


def test_entities_disjoint_and_unseen(default_splits):
    (train, train_names), (_, dev_names) = default_splits["train"], default_splits["dev"]
    assert not set(train_names) & set(dev_names)
    train_text = " ".join(c + " " + q["question"] for c, q in _questions(train))
    # every dev entity is a new string (the bare word, without a shared suffix like "River")
    dev_words = {w for n in dev_names for w in n.split() if w[0].isupper() and len(w) > 3} - {
        "River", "Lake", "Sea", "Mountains", "Hills", *mms.COMPANY_SUFFIXES}
    assert dev_words and not any(w in train_text for w in dev_words)


def test_answers_exact_distractors_and_token_budget(default_splits):
    tok = AutoTokenizer.from_pretrained(minilm_path())
    for split, (squad, _) in default_splits.items():
        n_q = 0
        for ctx, qa in _questions(squad):
            n_q += 1
            (ans,) = qa["answers"]
            assert ctx[ans["answer_start"]:ans["answer_start"] + len(ans["text"])] == ans["text"]
        assert n_q == {"train": 4000, "dev": 600}[split]
        assert mms.max_pair_tokens(squad, tok) <= 128
        # not answerable by answer type alone: most questions have a rival fact of the same kind in the context
        rivals = total = 0
        for art in squad["data"]:
            kinds = [_fact_kind(qa["question"]) for qa in art["paragraphs"][0]["qas"]]
            rivals += sum(kinds.count(k) >= 2 for k in kinds)
            total += len(kinds)
        assert rivals / total > 0.8
    ids = [q["id"] for _, q in _questions(default_splits["train"][0])]
    assert len(ids) == len(set(ids))


def test_cli_writes_once_then_skips(tmp_path, capsys):
    args = ["--out_dir", str(tmp_path), "--n_train", "60", "--n_dev", "30", "--max_tokens", "0"]
    assert mms.main(args) == 0
    mtime = (tmp_path / "train.json").stat().st_mtime_ns
    assert json.loads((tmp_path / "params.json").read_text())["n_train"] == 60
    assert mms.main(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert (tmp_path / "train.json").stat().st_mtime_ns == mtime
    mms.main(args[:-2] + ["--n_dev", "31"])  # different params: rewritten (with the token check)
    assert json.loads((tmp_path / "params.json").read_text())["n_dev"] == 31


def test_load_squad_nested_and_flat(tmp_path):
    mms.main(["--out_dir", str(tmp_path), "--n_train", "50", "--n_dev", "20", "--max_tokens", "0"])
    d = load_squad(train_file=tmp_path / "train.json", validation_file=tmp_path / "dev.json",
                   cache_dir=str(tmp_path / "cache"))
    assert set(d) == {"train", "validation"}
    assert d["train"].column_names == ["id", "title", "context", "question", "answers"]
    assert (d["train"].num_rows, d["validation"].num_rows) == (50, 20)
    raw = json.loads((tmp_path / "dev.json").read_text())
    ctx, qa = next(_questions(raw))
    row = d["validation"][0]
    assert (row["id"], row["context"], row["question"], row["title"]) == (
        qa["id"], ctx, qa["question"], raw["data"][0]["title"])
    assert row["answers"] == {"text": [qa["answers"][0]["text"]], "answer_start": [qa["answers"][0]["answer_start"]]}
    assert references(d["validation"])[qa["id"]] == [qa["answers"][0]["text"]]

    # the flat one-record-per-question layout (JSON Lines) loads to the same rows
    flat = tmp_path / "dev.jsonl"
    flat.write_text("\n".join(json.dumps(r) for r in d["validation"]))
    d2 = load_squad(validation_file=str(flat), cache_dir=str(tmp_path / "cache"))
    assert list(d2) == ["validation"] and d2["validation"].to_list() == d["validation"].to_list()


def _nested(answers, context="Ana lives in Lyon."):
    qa = {"id": "q7", "question": "Where does Ana live?"}
    if answers is not None:
        qa["answers"] = answers
    return {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": [qa]}]}]}


@pytest.mark.parametrize("content, split, problem", [
    (_nested(None), "train", "missing 'answers'"),
    (_nested([]), "train", "empty 'answers'"),
    (_nested([{"text": "Lyon", "answer_start": 3}]), "validation", "not at answer_start=3"),
    (_nested([{"text": "Paris", "answer_start": 12}]), "train", "not at answer_start=12"),
    ("{not json", "train", "not valid JSON"),
    ({"version": "1.1", "articles": []}, "validation", "wrong structure"),
    ([{"question": "q?", "context": "c", "answers": {"text": ["c"], "answer_start": [0]}}], "train", "needs 'id'"),
])
def test_malformed_files_raise(tmp_path, content, split, problem):
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataError) as err:  # a RunError: the scripts end with this one line (common.runs.cli)
        load_squad(**{f"{split}_file": str(path)}, cache_dir=str(tmp_path / "cache"))
    assert str(path) in str(err.value) and problem in str(err.value)
    if "answer" in problem:
        assert "id=q7" in str(err.value)


def test_missing_file_and_empty_dev_answers_ok(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_squad(train_file=str(tmp_path / "nope.json"))
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(_nested([{"text": "Lyon", "answer_start": 13}])))
    d = load_squad(validation_file=str(path), cache_dir=str(tmp_path / "cache"))
    assert d["validation"][0]["answers"] == {"text": ["Lyon"], "answer_start": [13]}


def test_the_suite_caches_loaded_files_outside_the_users_home(tmp_path):
    """conftest points the datasets cache at a directory of the suite's own before datasets is imported: a file
    loaded without a cache_dir (as the pipeline stages do) is cached there, not in ~/.cache/huggingface."""
    import os

    import datasets
    cache = Path(os.environ["HF_DATASETS_CACHE"])
    assert Path(datasets.config.HF_DATASETS_CACHE) == cache
    assert not cache.is_relative_to(Path.home() / ".cache" / "huggingface")
    mms.main(["--out_dir", str(tmp_path), "--n_train", "5", "--n_dev", "5", "--max_tokens", "0"])
    before = set(cache.rglob("*.arrow"))
    load_squad(validation_file=str(tmp_path / "dev.json"))
    assert set(cache.rglob("*.arrow")) - before


def test_the_mini_generator_never_overwrites_a_users_files(tmp_path):
    """The mini config generates train.json/dev.json beside data.train_file: a user's own files there (no
    params.json of the generator) are refused and kept; files of other names are read as they are, nothing
    generated beside them."""
    from bert_squad.train import ensure_mini_data
    from common.runs import RunError
    gen = {"seed": 0, "n_train": 8, "n_dev": 4}
    own = {tmp_path / "train.json": "mine", tmp_path / "dev.json": "mine too"}
    for path, text in own.items():
        path.write_text(text)
    with pytest.raises(RunError, match=f"{tmp_path / 'train.json'}, {tmp_path / 'dev.json'}: not made by the mini"):
        ensure_mini_data({"generate_mini": gen, "train_file": str(tmp_path / "train.json"),
                          "validation_file": str(tmp_path / "dev.json")})
    with pytest.raises(FileExistsError, match="not made by this script"):
        mms.main(["--out_dir", str(tmp_path), "--n_train", "8", "--n_dev", "4", "--max_tokens", "0"])
    built = tmp_path / "built"  # a build of its own interrupted before params.json (its mark comes first): rebuilt
    mms.main(["--out_dir", str(built), "--n_train", "8", "--n_dev", "4", "--max_tokens", "0"])
    (built / "params.json").unlink()
    ensure_mini_data({"generate_mini": gen, "train_file": str(built / "train.json"),
                      "validation_file": str(built / "dev.json")})
    assert (built / "params.json").is_file()
    other = tmp_path / "other"
    other.mkdir()
    ensure_mini_data({"generate_mini": gen, "train_file": str(other / "a.json"),
                      "validation_file": str(other / "b.json")})
    assert not any(other.iterdir()) and all(p.read_text() == t for p, t in own.items())
