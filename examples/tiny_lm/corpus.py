"""A generated corpus of simple facts about made-up people, with known ground truth.

Every entity (a made-up one-word name) has one value for each relation (city, colour,
profession, pet). Each fact is stated by 1–3 *documents*; a document is a short "bio" of one
entity: one to three fact statements in varied templates, sometimes mixed with filler sentences
that mention the entity but state nothing the questions ask about. *Distractor* documents share
words with the questions (the entity's name, relation words such as "live", attribute values)
but state no fact: "zorblat visited oslo once ." or "kemiro wants to live by the sea .".

Questions ("where does zorblat live ?") are split per fact: the training questions (with their
answers) teach the model the question format; the held-out questions ask about facts stated
only in documents and are the attribution queries. The loss attributed is the loss of the
answer token(s) alone.

Tokenization is word level: lower-case words and punctuation split on spaces; the vocabulary
is every word of the corpus plus `<pad>` (id 0) and `<bos>`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

PAD, BOS = "<pad>", "<bos>"

VALUES = {
    "city": [
        "paris",
        "london",
        "tokyo",
        "cairo",
        "lima",
        "oslo",
        "delhi",
        "rome",
        "berlin",
        "sydney",
        "madrid",
        "dublin",
    ],
    "colour": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "grey"],
    "profession": [
        "baker",
        "doctor",
        "pilot",
        "farmer",
        "teacher",
        "painter",
        "sailor",
        "lawyer",
        "chemist",
        "tailor",
        "plumber",
        "poet",
    ],
    "pet": ["cat", "dog", "parrot", "rabbit", "hamster", "turtle", "goldfish", "snake", "horse", "ferret"],
}
RELATIONS = tuple(VALUES)

# How a document states a fact ({e}: the entity, {v}: the value).
STATEMENTS = {
    "city": [
        "{e} lives in {v} .",
        "{e} has a small house in {v} .",
        "the home of {e} is in {v} .",
        "{e} moved to {v} many years ago and lives there now .",
        "these days {e} lives in the city of {v} .",
    ],
    "colour": [
        "the favourite colour of {e} is {v} .",
        "{e} likes the colour {v} best .",
        "{e} loves everything that is {v} .",
        "of all colours , {e} prefers {v} .",
    ],
    "profession": [
        "{e} works as a {v} .",
        "{e} is a {v} by trade .",
        "by day , {e} earns a living as a {v} .",
        "the job of {e} is {v} .",
    ],
    "pet": [
        "{e} has a pet {v} .",
        "{e} owns a {v} and walks it every day .",
        "at home , {e} keeps a {v} .",
        "the pet of {e} is a {v} .",
    ],
}

# How a question asks for it; the answer follows the prompt.
QUESTIONS = {
    "city": "where does {e} live ?",
    "colour": "what is the favourite colour of {e} ?",
    "profession": "what is the job of {e} ?",
    "pet": "what pet does {e} have ?",
}

# Sentences about an entity that state none of its facts ({o}: another entity, {c}: a city,
# {j}: a profession, {a}: an animal, {k}: a colour; drawn at random, so they may mislead).
FILLERS = [
    "{e} was born on a rainy day .",
    "people say that {e} is very kind .",
    "{e} visited {c} once on holiday .",
    "{e} is a good friend of {o} .",
    "{e} wants to live near the sea one day .",
    "{e} once met a {j} on a train .",
    "{e} is afraid of the {a} next door .",
    "{e} painted a fence {k} for a neighbour .",
    "{e} and {o} often talk about the weather .",
    "{e} read a long book about {c} .",
    "a {j} from {c} wrote a letter to {e} .",
    "{e} does not like to live alone .",
]

STOPWORDS = frozenset(
    "a an the of is in to and on at by as for from it its that this these does do what where "
    "which who has have had was were be been are there now very one once all every ? . ,".split()
)

_SYLLABLES = [
    "ka",
    "zor",
    "mi",
    "blat",
    "ren",
    "tu",
    "vex",
    "lo",
    "quin",
    "dra",
    "sol",
    "pim",
    "ob",
    "nel",
    "gri",
    "fa",
    "ush",
    "tem",
    "yor",
    "bix",
    "ela",
    "mur",
    "ta",
    "wen",
]


@dataclass(frozen=True)
class Fact:
    entity: str
    relation: str
    value: str


@dataclass
class Document:
    doc_id: int
    text: str
    facts: tuple[Fact, ...]  # the facts this document states (empty for a distractor)


@dataclass
class Question:
    fact: Fact
    prompt: str  # "where does zorblat live ?"
    answer: str  # "paris"


@dataclass
class Corpus:
    entities: list[str]
    facts: list[Fact]
    documents: list[Document]
    train_questions: list[Question]  # answered in training: they teach the question format
    test_questions: list[Question]  # held out: their facts are stated only in documents
    vocab: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.vocab:
            words = set()
            for d in self.documents:
                words.update(d.text.split())
            for q in self.train_questions + self.test_questions:
                words.update(q.prompt.split())
                words.update(q.answer.split())
            self.vocab = [PAD, BOS] + sorted(words)
        self.index = {w: i for i, w in enumerate(self.vocab)}

    def fact_documents(self, fact: Fact) -> list[int]:
        """The ids of the documents that state `fact` (the ground truth of its question)."""
        return [d.doc_id for d in self.documents if fact in d.facts]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (space-separated words), preceded by `<bos>`."""
        return [self.index[BOS]] + [self.index[w] for w in text.split()]


def make_name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice([2, 2, 3])))


def generate(
    n_entities: int = 120, n_distractors: int | None = None, seed: int = 0, filler_rate: float = 0.5
) -> Corpus:
    """A deterministic corpus: same arguments, same corpus.

    n_distractors: documents that state no fact (default: a quarter of the fact documents).
    filler_rate: chance that a document carries a filler sentence (tried up to twice).
    Half the facts of each entity (rounded, at random) are asked in training questions, the rest
    are held out as test questions.
    """
    rng = random.Random(seed)
    entities: list[str] = []
    while len(entities) < n_entities:
        name = make_name(rng)
        if name not in entities and name not in STOPWORDS:
            entities.append(name)
    facts = [Fact(e, r, rng.choice(VALUES[r])) for e in entities for r in RELATIONS]

    def fill(template: str, entity: str) -> str:
        others = [o for o in entities if o != entity]
        return template.format(
            e=entity,
            o=rng.choice(others),
            c=rng.choice(VALUES["city"]),
            j=rng.choice(VALUES["profession"]),
            a=rng.choice(VALUES["pet"]),
            k=rng.choice(VALUES["colour"]),
        )

    bodies: list[tuple[list[str], tuple[Fact, ...]]] = []
    for entity in entities:
        # One statement per (fact, repetition), in a random template; shuffled, then cut into
        # documents of 1-3 statements that never state the same fact twice.
        statements = []
        for fact in (f for f in facts if f.entity == entity):
            for _ in range(rng.choice([1, 2, 3])):
                text = rng.choice(STATEMENTS[fact.relation]).format(e=entity, v=fact.value)
                statements.append((fact, text))
        rng.shuffle(statements)
        while statements:
            size = rng.choice([1, 2, 3])
            chosen: list[tuple[Fact, str]] = []
            for item in list(statements):
                if len(chosen) == size:
                    break
                if all(item[0] != c[0] for c in chosen):
                    chosen.append(item)
                    statements.remove(item)
            sentences = [text for _, text in chosen]
            for template in rng.sample(FILLERS, 2):
                if rng.random() < filler_rate:
                    sentences.insert(rng.randrange(len(sentences) + 1), fill(template, entity))
            bodies.append((sentences, tuple(f for f, _ in chosen)))

    if n_distractors is None:
        n_distractors = len(bodies) // 4
    for _ in range(n_distractors):
        entity = rng.choice(entities)
        sentences = [fill(t, entity) for t in rng.sample(FILLERS, rng.choice([1, 2, 3]))]
        bodies.append((sentences, ()))

    rng.shuffle(bodies)
    documents = [Document(i, " ".join(s), f) for i, (s, f) in enumerate(bodies)]

    train_q, test_q = [], []
    for entity in entities:
        own = [f for f in facts if f.entity == entity]
        rng.shuffle(own)
        for i, fact in enumerate(own):
            q = Question(fact, QUESTIONS[fact.relation].format(e=entity), fact.value)
            (train_q if i < len(own) // 2 else test_q).append(q)
    return Corpus(entities, facts, documents, train_q, test_q)


def content_words(text: str) -> set[str]:
    """The words of `text` that are not stopwords (for the word-overlap baseline)."""
    return {w for w in text.split() if w not in STOPWORDS}


def overlap_scores(corpus: Corpus, queries: list[str]) -> torch.Tensor:
    """Word-overlap baseline: [n_query, n_docs] count of shared non-stopword words, with ties
    broken towards shorter documents (a tiny penalty per word) so that ranks are deterministic."""
    doc_words = [content_words(d.text) for d in corpus.documents]
    lengths = torch.tensor([len(d.text.split()) for d in corpus.documents], dtype=torch.float64)
    out = torch.zeros(len(queries), len(corpus.documents), dtype=torch.float64)
    for i, q in enumerate(queries):
        words = content_words(q)
        out[i] = torch.tensor([float(len(words & dw)) for dw in doc_words], dtype=torch.float64)
    return out - 1e-3 * lengths[None, :]


def pad_batch(sequences: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists: (tokens [B, T] int64, mask [B, T] int64, 1 = real token)."""
    length = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return tokens, mask
