"""Deterministic synthetic SQuAD v1.1 ("mini-SQuAD") for CPU-sized runs.

The real SQuAD1.1 cannot be downloaded here, so the mini pipeline trains on a templated
reading-comprehension set written in the official nested JSON format. Each paragraph
describes one entity of a small generated knowledge base (people, companies, cities,
rivers) plus two *distractor* entities of the same kind stating the same kinds of facts,
so the answer type alone never identifies the span: the model has to match the question's
entity to the right sentence. Dev entities are built from a syllable pool disjoint from
train's, so every dev name is a string never seen in training.

Our choice (not from the paper): sizes, templates and the 128-token budget are sized for
a 6-layer MiniLM fine-tuned a few epochs on CPU.

    python -m bert_squad.make_mini_squad --out_dir data/mini_squad [--seed 0 --n_train 4000 --n_dev 600]
"""

import argparse
import json
import os
import random
import re
import sys

GENERATOR_VERSION = 1  # bump when the output for a given seed changes (invalidates params.json)

# Syllable = onset + one vowel, so a name splits uniquely after each vowel; two disjoint
# syllable pools therefore can never spell the same name.
ONSETS = ["b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
          "br", "dr", "gr", "kr", "tr", "st", "sh", "th", "ch"]
VOWELS = "aeiou"
CODAS = ["", "", "", "n", "r", "s", "l", "m"]

OCCUPATIONS = ["marine biologist", "jazz pianist", "civil engineer", "architect", "novelist",
               "pediatric surgeon", "software developer", "landscape painter", "war correspondent",
               "high school teacher", "airline pilot", "pastry chef", "tax lawyer", "film director",
               "geologist", "veterinarian", "opera singer", "police detective", "economist",
               "museum curator"]
PRODUCTS = ["solar panels", "frozen food", "electric bicycles", "medical scanners", "video games",
            "office furniture", "running shoes", "cloud software", "wind turbines", "wooden toys",
            "kitchen appliances", "sports cars", "organic tea", "industrial robots", "paper goods",
            "hearing aids", "fishing boats", "luxury watches"]
COMPANY_SUFFIXES = ["Systems", "Foods", "Motors", "Labs", "Holdings", "Industries", "Group", "Works"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]

# Sentence templates: {s} is the entity, every other {field} is one stated fact.
SENTENCES = {
    "person": [
        "{s} was born in {birth_city}.", "{s} is a native of {birth_city}.",
        "{s} was born on {birth_date}.", "{s} was born in {birth_city} on {birth_date}.",
        "{s} was born on {birth_date} in {birth_city}.",
        "{s} works as {occupation}.", "{s} is {occupation}.", "By profession, {s} is {occupation}.",
        "{s} works for {employer}.", "{s} is employed by {employer}.",
        "{s} works as {occupation} at {employer}.",
    ],
    "company": [
        "{s} is headquartered in {hq}.", "{s} is based in {hq}.", "The headquarters of {s} are in {hq}.",
        "{s} was founded in {founded}.", "{s} was established in {founded}.",
        "{s} was founded by {founder}.", "{founder} founded {s}.",
        "{s} was founded by {founder} in {founded}.", "{founder} established {s} in {founded}.",
        "{s} employs {employees} people.", "{s} has {employees} employees.",
        "{s} makes {product}.", "{s} produces {product}.", "{s} is best known for its {product}.",
    ],
    "city": [
        "{s} lies on {river}.", "{s} is located on the banks of {river}.", "{river} flows through {s}.",
        "{s} has a population of {population}.", "About {population} people live in {s}.",
        "{s} is home to {population} people.",
        "The mayor of {s} is {mayor}.", "{mayor} is the mayor of {s}.", "{s} is governed by mayor {mayor}.",
        "{s} was founded in {founded}.", "{s} dates back to {founded}.",
        "Founded in {founded}, {s} lies on {river}.",
    ],
    "river": [
        "{s} is {length} long.", "{s} runs for {length}.",
        "{s} flows into {mouth}.", "{s} empties into {mouth}.",
        "{s} rises in {source}.", "The source of {s} is in {source}.", "{s} begins in {source}.",
        "{s} rises in {source} and flows into {mouth}.", "{s} runs for {length} before emptying into {mouth}.",
    ],
}

# Several paraphrases per (kind, fact); {s} is always the full name.
QUESTIONS = {
    ("person", "birth_city"): ["Where was {s} born?", "In which city was {s} born?",
                               "What is the birthplace of {s}?", "Which city is {s} a native of?",
                               "{s} was born in which city?"],
    ("person", "birth_date"): ["When was {s} born?", "What is the date of birth of {s}?",
                               "On what date was {s} born?", "What is {s}'s birth date?"],
    ("person", "occupation"): ["What is {s}'s profession?", "What does {s} do for a living?",
                               "What is the occupation of {s}?", "What job does {s} have?"],
    ("person", "employer"): ["Which company does {s} work for?", "Who employs {s}?",
                             "What company employs {s}?", "{s} is employed by which company?"],
    ("company", "hq"): ["Where is {s} headquartered?", "In which city is {s} based?",
                        "Where are the headquarters of {s}?", "What city is home to {s}?"],
    ("company", "founded"): ["When was {s} founded?", "In what year was {s} established?",
                             "What year was {s} founded?", "{s} was founded in which year?"],
    ("company", "founder"): ["Who founded {s}?", "Who is the founder of {s}?", "Who started {s}?",
                             "By whom was {s} founded?"],
    ("company", "employees"): ["How many people does {s} employ?", "How many employees does {s} have?",
                               "What is the size of {s}'s workforce?"],
    ("company", "product"): ["What does {s} make?", "What does {s} produce?",
                             "What products is {s} known for?", "What kind of goods does {s} manufacture?"],
    ("city", "river"): ["Which river does {s} lie on?", "On what river is {s} located?",
                        "What river flows through {s}?", "Which river passes through {s}?"],
    ("city", "population"): ["What is the population of {s}?", "How many people live in {s}?",
                             "How many inhabitants does {s} have?"],
    ("city", "mayor"): ["Who is the mayor of {s}?", "Who serves as mayor of {s}?",
                        "Who governs {s} as mayor?", "Which person is the mayor of {s}?"],
    ("city", "founded"): ["When was {s} founded?", "In what year was {s} founded?",
                          "Since what year has {s} existed?"],
    ("river", "length"): ["How long is {s}?", "What is the length of {s}?", "How far does {s} run?"],
    ("river", "mouth"): ["Where does {s} flow into?", "Into which body of water does {s} empty?",
                         "What does {s} drain into?", "Where does {s} end?"],
    ("river", "source"): ["Where does {s} rise?", "Where is the source of {s}?", "Where does {s} begin?",
                          "In which range does {s} have its source?"],
}
PRONOUNS = {"company": ["The company", "It"], "city": ["The city", "It"], "river": ["The river", "It"]}
CONNECTORS = ["By contrast, ", "Meanwhile, ", "In comparison, "]
KINDS = ["person", "company", "city", "river"]
MAX_MAIN_FACTS = 4
# Context budget in characters (before pronouns/connectors): these contexts tokenize to at most
# ~0.35 WordPiece/char, so with the longest question (17 tokens) pairs stay well under 128 tokens.
MAX_CONTEXT_CHARS = 290


def syllable_pools():
    """Fixed (seed-independent) split of the syllable inventory into disjoint train/dev pools."""
    syllables = [o + v for o in ONSETS for v in VOWELS]
    random.Random("mini-squad-syllables").shuffle(syllables)
    half = len(syllables) // 2
    return {"train": sorted(syllables[:half]), "dev": sorted(syllables[half:])}


class _Namer:
    """Makes unique capitalised pseudo-words from one syllable pool."""

    def __init__(self, rng, pool):
        self.rng, self.pool, self.used = rng, pool, set()

    def word(self, min_syl=2, max_syl=3):
        while True:
            n = self.rng.randint(min_syl, max_syl)
            w = ("".join(self.rng.choice(self.pool) for _ in range(n)) + self.rng.choice(CODAS)).capitalize()
            if w not in self.used and len(w) >= 4:
                self.used.add(w)
                return w


def _count(rng, lo, hi):
    return f"{rng.randrange(lo, hi) * 10:,}"


def build_kb(rng, split, n_per_kind):
    """Generate entities with mutually consistent facts. Fact values are (surface_prefix, answer)."""
    namer = _Namer(rng, syllable_pools()[split])
    names = {
        "person": [f"{namer.word(2, 2)} {namer.word(2, 3)}" for _ in range(n_per_kind)],
        "company": [f"{namer.word()} {rng.choice(COMPANY_SUFFIXES)}" for _ in range(n_per_kind)],
        "city": [namer.word() for _ in range(n_per_kind)],
        "river": [f"{namer.word(2, 2)} River" for _ in range(n_per_kind)],
    }
    waters = [("", f"Lake {namer.word()}") if rng.random() < 0.5 else ("the ", f"{namer.word()} Sea")
              for _ in range(max(6, n_per_kind // 2))]
    ranges = [("the ", f"{namer.word()} {rng.choice(['Mountains', 'Hills'])}") for _ in range(max(6, n_per_kind // 2))]
    kb = []
    for name in names["person"]:
        occ = rng.choice(OCCUPATIONS)
        kb.append({"kind": "person", "name": name, "gender": rng.choice(["She", "He"]), "facts": {
            "birth_city": ("", rng.choice(names["city"])),
            "birth_date": ("", f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1920, 2001)}"),
            "occupation": ("an " if occ[0] in "aeiou" else "a ", occ),
            "employer": ("", rng.choice(names["company"]))}})
    for name in names["company"]:
        kb.append({"kind": "company", "name": name, "facts": {
            "hq": ("", rng.choice(names["city"])), "founded": ("", str(rng.randint(1850, 2015))),
            "founder": ("", rng.choice(names["person"])), "employees": ("", _count(rng, 4, 9800)),
            "product": ("", rng.choice(PRODUCTS))}})
    for name in names["city"]:
        pop = (_count(rng, 1200, 99000) if rng.random() < 0.7
               else f"{rng.randint(11, 98) / 10:.1f} million")
        kb.append({"kind": "city", "name": name, "facts": {
            "river": ("the ", rng.choice(names["river"])), "population": ("", pop),
            "mayor": ("", rng.choice(names["person"])), "founded": ("", str(rng.randint(1050, 1890)))}})
    for name in names["river"]:
        kb.append({"kind": "river", "name": name, "facts": {
            "length": ("", f"{rng.randrange(40, 2900):,} kilometers"),
            "mouth": rng.choice(waters), "source": rng.choice(ranges)}})
    return kb


def _subject(ent):
    return "the " + ent["name"] if ent["kind"] == "river" else ent["name"]


def _fields(template):
    return set(re.findall(r"\{(\w+)\}", template)) - {"s"}


def _render(template, ent, subject, prefix=""):
    """Fill a template; return (sentence, {fact: offset of the answer inside the sentence})."""
    out, offsets, pos = prefix, {}, 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out += template[pos:m.start()]
        if m.group(1) == "s":
            out += subject
        else:
            det, answer = ent["facts"][m.group(1)]
            offsets[m.group(1)] = len(out) + len(det)
            out += det + answer
        pos = m.end()
    out += template[pos:]
    return out[0].upper() + out[1:], offsets


def _cover(rng, kind, facts):
    """Pick templates that state exactly the given facts (sometimes two facts per sentence)."""
    left, chosen = set(facts), []
    while left:
        fits = [t for t in SENTENCES[kind] if _fields(t) and _fields(t) <= left]
        multi = [t for t in fits if len(_fields(t)) > 1]
        t = rng.choice(multi if multi and rng.random() < 0.35 else [t for t in fits if len(_fields(t)) == 1])
        chosen.append(t)
        left -= _fields(t)
    return chosen


def make_paragraph(rng, main, others, split, p_idx):
    """One SQuAD paragraph: main entity + two same-kind distractors, questions on every stated fact."""
    kind = main["kind"]
    main_facts = rng.sample(sorted(main["facts"]), min(MAX_MAIN_FACTS, len(main["facts"])))
    distractors = rng.sample(others, 2)
    # distractors restate the main entity's fact kinds so every answer type has a rival span
    shuffled = rng.sample(main_facts, len(main_facts))
    cut = (len(shuffled) + 1) // 2
    d_facts = [shuffled[:cut][:2], shuffled[cut:][:2] or shuffled[:1]]
    main_sents = [(main, t) for t in _cover(rng, kind, main_facts)]
    d_sents = [(d, t) for d, fs in zip(distractors, d_facts) for t in _cover(rng, kind, fs)]
    # first sentence introduces the main entity; the rest is a random interleaving
    rest = main_sents[1:] + d_sents
    rng.shuffle(rest)
    order = [main_sents[0]] + rest
    while sum(len(_render(t, e, _subject(e))[0]) + 1 for e, t in order) > MAX_CONTEXT_CHARS:
        # over budget: drop a random later sentence (and so its questions)
        del order[rng.randrange(1, len(order))]

    context, qas, prev_main_subject = "", [], False
    for ent, t in order:
        subject, prefix = _subject(ent), ""
        if ent is main and prev_main_subject and t.startswith("{s}") and rng.random() < 0.4:
            # a pronoun only right after a sentence whose subject is the main entity, so it is unambiguous
            subject = main["gender"] if kind == "person" else rng.choice(PRONOUNS[kind])
        elif ent is not main and t.startswith("{s}") and rng.random() < 0.25:
            prefix = rng.choice(CONNECTORS)
        sent, offs = _render(t, ent, subject, prefix)
        base = len(context) + (1 if context else 0)
        context = f"{context} {sent}" if context else sent
        prev_main_subject = ent is main and t.startswith("{s}")
        for fact, off in offs.items():
            answer = ent["facts"][fact][1]
            start = base + off
            assert context[start:start + len(answer)] == answer
            q = rng.choice(QUESTIONS[(kind, fact)]).replace("{s}'s", "{poss}")
            subj = _subject(ent)
            q = q.format(s=subj, poss=subj + ("'" if subj.endswith("s") else "'s"))
            question = q[0].upper() + q[1:]
            qas.append({"id": f"mini-{split}-{p_idx:05d}-{len(qas):02d}", "question": question,
                        "answers": [{"text": answer, "answer_start": start}]})
    return {"context": context, "qas": qas}


def generate_split(split, n_questions, seed=0):
    """Return (official-format SQuAD dict, sorted entity names) with exactly n_questions questions."""
    assert split in ("train", "dev")
    rng = random.Random(f"mini-squad/{split}/{seed}")
    kb = build_kb(rng, split, n_per_kind=max(6, n_questions // 40))
    by_kind = {k: [e for e in kb if e["kind"] == k] for k in KINDS}
    data, total, p_idx = [], 0, 0
    while total < n_questions:
        mains = rng.sample(kb, len(kb))
        for main in mains:
            if total >= n_questions:
                break
            others = [e for e in by_kind[main["kind"]] if e is not main]
            para = make_paragraph(rng, main, others, split, p_idx)
            para["qas"] = para["qas"][: n_questions - total]
            total += len(para["qas"])
            data.append({"title": main["name"], "paragraphs": [para]})
            p_idx += 1
    names = sorted({e["name"] for e in kb}
                   | {v[1] for e in kb for f, v in e["facts"].items() if f in ("mouth", "source")})
    return {"version": "1.1", "data": data}, names


def count(squad):
    """(number of paragraphs, number of questions)."""
    paras = [p for a in squad["data"] for p in a["paragraphs"]]
    return len(paras), sum(len(p["qas"]) for p in paras)


def max_pair_tokens(squad, tokenizer):
    """Longest [CLS] question [SEP] context [SEP] in tokens, as BERT QA fine-tuning sees it."""
    pairs = [(q["question"], p["context"]) for a in squad["data"] for p in a["paragraphs"] for q in p["qas"]]
    enc = tokenizer([q for q, _ in pairs], [c for _, c in pairs])
    return max(len(ids) for ids in enc["input_ids"])


def output_files(out_dir) -> dict:
    return {s: os.path.join(out_dir, f"{s}.json") for s in ("train", "dev")}


def foreign_files(out_dir) -> list[str]:
    """The train.json/dev.json in out_dir that this script did not write (common.runs.foreign_outputs): a user's
    own SQuAD files, which a rebuild would overwrite."""
    from common.runs import foreign_outputs
    return foreign_outputs(out_dir, output_files(out_dir).values())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out_dir", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n_train", type=int, default=4000)
    ap.add_argument("--n_dev", type=int, default=600)
    ap.add_argument("--force", action="store_true", help="rewrite even if params.json matches")
    ap.add_argument("--max_tokens", type=int, default=128,
                    help="fail if a question+context pair exceeds this many MiniLM tokens (0: skip the check)")
    args = ap.parse_args(argv)

    params = {"generator_version": GENERATOR_VERSION, "seed": args.seed,
              "n_train": args.n_train, "n_dev": args.n_dev}
    paths = output_files(args.out_dir)
    p_file = os.path.join(args.out_dir, "params.json")
    if not args.force and all(os.path.exists(p) for p in [p_file, *paths.values()]):
        with open(p_file) as f:
            if json.load(f) == params:
                print(f"mini-SQuAD up to date in {args.out_dir} ({params}); use --force to rewrite")
                return 0
    if not args.force and (foreign := foreign_files(args.out_dir)):
        raise FileExistsError(f"{', '.join(foreign)}: not made by this script; kept: pass --force to replace them")
    tokenizer = None
    if args.max_tokens:
        from transformers import AutoTokenizer

        from bert_squad.squad_data import minilm_path
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    from common.runs import mark_generated
    mark_generated(args.out_dir, "bert_squad/make_mini_squad.py")
    if os.path.exists(p_file):
        os.remove(p_file)  # written last: an interrupted rebuild is never taken as complete
    for split, n in (("train", args.n_train), ("dev", args.n_dev)):
        squad, _ = generate_split(split, n, args.seed)
        n_par, n_q = count(squad)
        longest = max_pair_tokens(squad, tokenizer) if tokenizer else None
        if longest is not None and longest > args.max_tokens:
            raise SystemExit(f"{split}: a question+context pair has {longest} > {args.max_tokens} tokens")
        with open(paths[split], "w") as f:
            json.dump(squad, f)
        print(f"{split}: {n_par} paragraphs, {n_q} questions, longest pair {longest} tokens -> {paths[split]}")
    with open(p_file, "w") as f:  # written last: its presence means both splits are complete
        json.dump(params, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
