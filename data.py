"""
data.py - the default's data: a made-up world, its tokenizer, synthesised speech, Whisper log-mels, manifests and
batches (real weights: real.py). The LLM learns ALL facts from text (`pretrain`); spoken training questions ask about
HALF the entities (`speech_train`; its ASR rows serve `align`); `test` (`val`: for settings) asks about the OTHER, text-
only half in unseen phrasings, spoken (S2T) or typed (T2T): S2T needs the LLM's text knowledge, T2T shows what is left.
    python data.py build runs/data/world        # world + tokenizer + audio + manifest.jsonl (~20 s)
"""
import hashlib, importlib, importlib.util, itertools, json, multiprocessing, os, random, sys, tempfile, wave
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torchaudio

SAMPLE_RATE = 16000  # audio constants as in openai/whisper/audio.py
N_FFT = 400          # 25 ms window
HOP_LENGTH = 160     # 10 ms hop -> 100 mel frames/s; the encoder's stride-2 conv -> 50 frames/s
N_MELS = 80

# -----------------------------------------------------------------------------
ATTRIBUTES = {  # the synthetic world: attribute -> its values (single words, so the answer is one word)
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
    "city": ["where does {e} live", "which city is {e} from", "tell me the city of {e}", "what is the city of {e}",
             "where is {e} from", "say the city of {e}", "name the city of {e}", "what city does {e} live in"],
    "food": ["what does {e} eat", "which food does {e} like", "tell me the food of {e}", "what is the food of {e}",
             "what food does {e} like", "say the food of {e}", "name the food of {e}", "what does {e} like to eat"],
    "number": ["what number does {e} have", "which number is {e}", "tell me the number of {e}",
               "what is the number of {e}", "which number does {e} have", "say the number of {e}",
               "name the number of {e}", "what number is {e}"],
}
# Spoken fine-tuning (and so calibration) is never typed in pretraining: as in the paper, not memorised LLM text
PHRASINGS = {"pretrain": (0, 1, 6, 7), "speech_train": (2, 5), "val": (3, 4), "test": (3, 4), "pretrain_val": (3, 4)}
ASR_PER_ENTITY = 40  # ASR utterances per entity for `align` (random 1-4 word strings); fine-tuning is QA only
COPY_PER_ENTITY = 16  # typed 'repeat after me' rows per entity in pretraining (the ASR task in text form)
ASR_INSTRUCTION = "repeat after me: "  # the ASR task's user turn is this + the utterance
MAX_SECONDS = 30  # the encoder's window: Whisper's 1500 positions at 50 Hz
WORLD_VERSION = 6  # bump when make_world / make_splits / the synthesiser change: cached worlds are keyed by it
N_ENTITIES = 128  # the default world: more facts than the tiny LLM learns perfectly (README: why 128)
VAL_FRACTION = 0.25  # of the text-only entities: questions for choosing settings (world size, steps, LRs)

def make_world(n_entities=N_ENTITIES, seed=0):
    """Pronounceable made-up names (consonant-vowel syllables), each with one value per attribute."""
    rng, names = random.Random(seed), set()
    while len(names) < n_entities:
        names.add("".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.choice((2, 3)))))
    names = sorted(names)
    rng.shuffle(names)
    return [{"name": n, **{a: rng.choice(vs) for a, vs in ATTRIBUTES.items()}} for n in names]

def make_splits(world, seed=0):
    """Manifest rows (no audio yet). The first half of the entities are spoken about in fine-tuning; of the text-only
    half, VAL_FRACTION go to `val`, the rest to `test`. `pretrain_val` (unused): the first half, typed, as in `test`."""
    rng, rows = random.Random(seed + 1), []
    half = len(world) // 2
    n_val = round(VAL_FRACTION * (len(world) - half))
    def qa(e, split):
        for attr, p in itertools.product(ATTRIBUTES, PHRASINGS[split]):
            q = QUESTIONS[attr][p].format(e=e["name"])
            rows.append(dict(id=f"{split}-{e['name']}-{attr}-{p}", transcript=q, question=q, answer=e[attr],
                             task="qa", split=split, relation=attr, entity=e["name"]))
    for e in world:  # pretrain: every fact, as statements and as typed QA in the pretraining phrasings
        for attr in ATTRIBUTES:
            for j, f in enumerate(FACTS[attr]):
                rows.append(dict(id=f"fact-{e['name']}-{attr}-{j}", transcript="", question="",
                                 answer=f.format(e=e["name"], v=e[attr]), task="lm", split="pretrain"))
        qa(e, "pretrain")
    vocab = [e["name"] for e in world] + [v for vs in ATTRIBUTES.values() for v in vs]
    def words(n, rng=rng, vocab=vocab):  # a random word string
        return " ".join(rng.choice(vocab) for _ in range(n))
    for i in range(COPY_PER_ENTITY * len(world)):  # the ASR task in text form ("repeat after me"), so the LLM knows it
        w = words(rng.randint(1, 4))
        rows.append(dict(id=f"pretrain-copy-{i}", transcript=w, question=ASR_INSTRUCTION + w, answer=w,
                         task="copy", split="pretrain"))
    for e in world[:half]:  # speech_train: spoken questions about the speech entities only
        qa(e, "speech_train")
        qa(e, "pretrain_val")
    # ASR: random names, values and question words (else the encoder never hears "what"); no entity beside its value
    heard, facts = vocab + question_words(), {(e["name"], e[a]) for e in world for a in ATTRIBUTES}
    def asr(n, rng, low, name, split):
        for i in range(n):
            w = words(rng.randint(low, 4), rng, heard)
            while any((a, b) in facts for a in w.split() for b in w.split()):  # it states a fact: draw again
                w = words(rng.randint(low, 4), rng, heard)
            rows.append(dict(id=f"asr-{name}-{i}", transcript=w, question="", answer=w, task="asr", split=split))
    asr(ASR_PER_ENTITY * len(world), random.Random(seed + 4), 1, "train", "speech_train")  # own rng: same LLM text
    for k, e in enumerate(world[half:]):  # val and test: text-only entities, phrasings never trained on
        qa(e, "val" if k < n_val else "test")
    asr(2 * len(world), random.Random(seed + 3), 2, "test", "asr_test")  # not dependent on the ASR training set's size
    return rows

def question_words():  # every word of every question phrasing (the entity slot left out): what the tests say
    return sorted({w for qs in QUESTIONS.values() for q in qs for w in q.replace("{e}", "").split()})

def finetune_rows(rows):
    """The speech fine-tuning data (and calibration pool): the spoken-QA training rows, else all speech_train."""
    train = [r for r in rows if r["split"] == "speech_train"]
    return [r for r in train if r["task"] == "qa"] or train

# -----------------------------------------------------------------------------
# Tokenizer: sentencepiece trained on the world, behind a small interface that HF tokenizers share
SPECIALS = ["<user>", "<assistant>", "<speech>"]

class Tokenizer:
    """encode/decode plus the prompt format. `<speech>` is one token that the model replaces by audio."""
    answer_tokens = 16  # the most tokens an answer is generated to in evaluation (the world's answers: 1-3)
    def __init__(self, model_file):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        self.speech_id, self.vocab_size = self.sp.piece_to_id("<speech>"), self.sp.get_piece_size()

    def encode(self, text):
        return self.sp.encode(text)
    def decode(self, ids):
        return self.sp.decode([i for i in ids if i not in (self.eos_id, self.pad_id, self.bos_id)])

    def prompt(self, user):
        """<s> <user> {typed question | <speech>} [instruction] <assistant>; then encode(answer) + [eos]."""
        speech = user.split("<speech>")  # the placeholder is spliced in by id, never tokenised as text
        ids = self.encode(speech[0]) if speech[0].strip() else []
        if len(speech) == 2:
            ids += [self.speech_id] + (self.encode(speech[1]) if speech[1].strip() else [])
        return [self.bos_id, self.sp.piece_to_id("<user>")] + ids + [self.sp.piece_to_id("<assistant>")]

class HFTokenizer:
    """A pretrained LLM's transformers tokenizer (dir or .gguf) as a Tokenizer: chat template, `<speech>` as id -1."""
    answer_tokens = 48  # an instruct LLM may answer in a sentence: generated to 48 tokens, as self targets, none cut
    def __init__(self, path):
        from transformers import AutoTokenizer
        gguf = dict(gguf_file=os.path.basename(path)) if path.endswith(".gguf") else {}
        self.tok = t = AutoTokenizer.from_pretrained(os.path.dirname(path) if gguf else path, **gguf)
        self.eos_id, self.bos_id, self.speech_id, self.vocab_size = t.eos_token_id, t.bos_token_id, -1, len(t)
        self.pad_id = self.eos_id if t.pad_token_id is None else t.pad_token_id
        self.encode = lambda text: self.tok.encode(text, add_special_tokens=False)
        self.decode = lambda ids: self.tok.decode(ids, skip_special_tokens=True)

    def prompt(self, user):
        t, turn = self.tok, [{"role": "user", "content": user}]
        text = t.apply_chat_template(turn, tokenize=False, add_generation_prompt=True) if t.chat_template else (
            (t.bos_token or "") + user + "\n")
        before, *after = text.split("<speech>")
        return self.encode(before) + ([self.speech_id] + self.encode(after[0]) if after else [])

def train_tokenizer(texts, model_prefix, vocab_size=256):
    import sentencepiece as spm
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(texts))
    try:
        spm.SentencePieceTrainer.train(input=f.name, model_prefix=model_prefix, vocab_size=vocab_size, model_type="bpe",
                                       character_coverage=1.0, user_defined_symbols=SPECIALS, pad_id=0, unk_id=1,
                                       bos_id=2, eos_id=3, hard_vocab_limit=False, num_threads=1, minloglevel=2)
    finally:
        os.unlink(f.name)

# -----------------------------------------------------------------------------
# A deterministic formant synthesiser (letters -> formants -> harmonics + noise; varied speakers). Every consonant
# also gets its own noise band, 20 log-spaced 400 Hz-7.6 kHz, like bursts and frication: it tells b/d/g, p/t/k apart.
VOWELS = {"a": (730, 1090), "e": (530, 1840), "i": (270, 2290), "o": (570, 840), "u": (300, 870), "y": (440, 2000)}
VOICED = {"b": (200, 900), "d": (250, 1700), "g": (250, 2300), "l": (360, 1300), "m": (250, 1100), "n": (250, 1600),
          "r": (420, 1300), "v": (220, 1400), "z": (250, 1900), "w": (300, 600), "j": (280, 2200)}
NOISY = {c: tuple(np.geomspace(400, 7600, 21)[i:i + 2].tolist()) for i, c in enumerate("bcdfghjklmnpqrstvwxz")}
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
    """text -> float32 waveform at 16 kHz: vowels and voiced consonants as harmonics of f0 shaped by two formants,
    the other consonants as band-limited noise, spaces as pauses."""
    rng, seg = np.random.default_rng(spk.seed), int(LETTER_S * SAMPLE_RATE / spk.rate)
    segs = []  # one per letter: (samples, F1, F2, voicing, noise band or None)
    for ch in text.lower():
        if ch in VOWELS or ch in VOICED:
            a, b = VOWELS.get(ch) or VOICED[ch]
            segs.append((seg if ch in VOWELS else int(seg * 0.8), a * spk.tract, b * spk.tract,
                         1.0 if ch in VOWELS else 0.4, NOISY.get(ch)))  # no noise band for vowels
        else:  # the other consonants: noise only; space, digits, punctuation: a pause
            segs.append((int(seg * (0.8 if ch in NOISY else 0.6)), 500.0, 1500.0, 0.0, NOISY.get(ch)))
    n = [s[0] for s in segs]
    N = sum(n)
    glide = lambda i: np.convolve(np.repeat([s[i] for s in segs], n), np.ones(80) / 80, mode="same")  # 5 ms glides
    F1, F2, V = (glide(i).astype(np.float32) for i in (1, 2, 3))
    t = np.arange(N, dtype=np.float32) / SAMPLE_RATE
    f0 = spk.f0 * (1 + 0.08 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)) - 0.1 * t / max(t[-1], 1e-3))
    phase = 2 * np.pi * np.cumsum(f0, dtype=np.float64) / SAMPLE_RATE
    # harmonics below 4.5 kHz, each weighted by the formant resonances. The gains change slowly: computed every
    # D-th sample and held; sin(h·phase) by the recurrence sin((h+1)x) = 2 cos(x) sin(hx) - sin((h-1)x)
    D, y, s_prev, s_cur, c2 = 8, np.zeros(N), np.zeros(N), np.sin(phase), 2 * np.cos(phase)
    F1d, F2d, f0d = F1[::D], F2[::D], f0[::D]
    for h in range(1, int(4500 / spk.f0)):
        fh = h * f0d
        gain = np.exp(-0.5 * ((fh - F1d) / 110) ** 2) + 0.7 * np.exp(-0.5 * ((fh - F2d) / 150) ** 2) + 1e-3
        y += np.repeat(gain, D)[:N] * s_cur
        s_prev, s_cur = s_cur, c2 * s_cur - s_prev
    y *= V
    for start, (m, *_, band) in zip(itertools.accumulate([0] + n), segs):  # band-limited noise for each noisy letter
        if band is not None:
            spec = np.fft.rfft(rng.standard_normal(m))
            freqs = np.fft.rfftfreq(m, 1 / SAMPLE_RATE)
            spec[(freqs < band[0] * spk.tract) | (freqs > band[1] * spk.tract)] = 0
            y[start:start + m] += 0.8 * np.fft.irfft(spec, n=m) * np.hanning(m)
    y = np.pad(y, int(0.1 * SAMPLE_RATE))  # 100 ms of silence either side
    y /= np.abs(y).max() + 1e-9
    y += rng.standard_normal(len(y)) * 10 ** (-spk.snr_db / 20) * 0.3
    return (0.5 * y / (np.abs(y).max() + 1e-9)).astype(np.float32)

def _save_speech(job):  # (path, synthesiser, its arguments)
    save_wav(job[0], job[1](*job[2]))

def save_speech(jobs, per_worker=512):
    """Synthesise and save every job, on every core given per_worker jobs each (the default's 6400: 37 s on 2 cores),
    each seeded by its arguments: the same audio on any number of processes. Forked workers run one torch thread each
    (as DataLoader's: a forked OpenMP pool is not safe to use)."""
    if (workers := min(os.cpu_count() or 1, len(jobs) // per_worker + 1)) == 1:
        return [_save_speech(j) for j in jobs]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                             initializer=torch.set_num_threads, initargs=(1,)) as ex:
        list(ex.map(_save_speech, jobs, chunksize=64))

# -----------------------------------------------------------------------------
# Audio I/O and features
def save_wav(path, wav):
    """float32 [-1, 1] mono at 16 kHz -> 16-bit PCM WAV, written atomically (two runs may build one cache at once)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with wave.open(tmp, "wb") as w:
        w.setparams((1, 2, SAMPLE_RATE, 0, "NONE", "not compressed"))  # mono, 16-bit
        w.writeframes((np.clip(wav, -1, 1) * 32767).astype("<i2").tobytes())
    os.replace(tmp, path)

def load_audio(path):
    """Any WAV (8/16/32-bit PCM, any rate and channels; others with soundfile) -> mono float32 at 16 kHz."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        raise ValueError(f"{path}: " + ("empty audio file (0 bytes)" if os.path.exists(path) else "audio not found"))
    try:
        if path.lower().endswith(".wav"):
            with wave.open(path, "rb") as w:
                ch, width, sr, n = w.getparams()[:4]
                raw = w.readframes(n)
            if width not in (1, 2, 4):
                raise ValueError(f"{path}: unsupported WAV sample width ({8 * width} bit; 8, 16 or 32-bit PCM)")
            x = np.frombuffer(raw, dtype={1: np.uint8, 2: "<i2", 4: "<i4"}[width]).astype(np.float32)
            x = (x - 128) / 128 if width == 1 else x / float(2 ** (8 * width - 1))
            x = x.reshape(-1, ch).mean(axis=1)  # downmix
        elif importlib.util.find_spec("soundfile") is None:  # optional: FLAC/OGG
            raise ValueError(f"{path}: non-WAV audio needs the optional soundfile package (pip install soundfile)")
        else:
            x, sr = importlib.import_module("soundfile").read(path, dtype="float32", always_2d=True)
            x = x.mean(axis=1)
    except (wave.Error, EOFError, RuntimeError) as e:
        raise ValueError(f"{path}: unreadable audio ({type(e).__name__}: {e or 'truncated file'})")
    if len(x) == 0:
        raise ValueError(f"{path}: empty audio")
    x = torch.from_numpy(np.ascontiguousarray(x))
    return x if sr == SAMPLE_RATE else torchaudio.functional.resample(x, sr, SAMPLE_RATE)

_MEL_FILTERS = {}
def log_mel(wav, n_mels=N_MELS):
    """(samples,) -> (n_mels, samples // 160) as Whisper: |STFT|^2 (Hann 400, hop 160), Slaney mels, log10 >= max-8."""
    if n_mels not in _MEL_FILTERS:
        _MEL_FILTERS[n_mels] = torchaudio.functional.melscale_fbanks(
            N_FFT // 2 + 1, 0.0, SAMPLE_RATE / 2, n_mels, SAMPLE_RATE, norm="slaney", mel_scale="slaney")  # (201, M)
    stft = torch.stft(wav, N_FFT, HOP_LENGTH, window=torch.hann_window(N_FFT), return_complex=True)
    power = stft[..., :-1].abs() ** 2                               # (201, frames); drop the last frame as Whisper does
    logm = torch.clamp(_MEL_FILTERS[n_mels].T @ power, min=1e-10).log10()  # (n_mels, frames)
    logm = torch.maximum(logm, logm.max() - 8.0)
    return (logm + 4.0) / 4.0

# -----------------------------------------------------------------------------
# Manifest: one JSON object a line: id, audio, transcript, question, answer, task, split
TASKS = {"qa": ("id", "transcript", "question", "answer"), "asr": ("id", "transcript", "answer"),  # and what each
         "lm": ("id", "answer"), "copy": ("id", "question", "answer")}  # task needs: non-empty strings
TEXT = ("audio", "transcript", "question", "answer", "relation", "entity", "instruction")  # strings where given
SPLITS = ("pretrain", "pretrain_val", "speech_train", "val", "test", "asr_test")

def read_manifest(path):
    """JSONL -> rows, each line checked: a bad one stops with `file:line: what is wrong`, before any work."""
    rows, ids = [], {}
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                r = json.loads(line)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{i}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: malformed JSON ({e.msg})")
            if not isinstance(r, dict) or r.get("task") not in TASKS:
                raise ValueError(f"{path}:{i}: each line must be an object with task in {tuple(TASKS)}")
            if bad := [k for k in TASKS[r["task"]] if not isinstance(r.get(k), str) or not r[k].strip()]:
                raise ValueError(f"{path}:{i}: {r['task']} rows need a non-empty string {bad[0]}, got {r.get(bad[0])!r}")
            if bad := [k for k in TEXT if r.get(k) is not None and not isinstance(r[k], str)]:
                raise ValueError(f"{path}:{i}: {bad[0]} must be a string, got {r[bad[0]]!r}")
            if r.get("split") not in SPLITS:
                raise ValueError(f"{path}:{i}: split {r.get('split')!r} is not one of {SPLITS}")
            if r.get("audio"):  # relative to the manifest
                r["audio"] = os.path.join(os.path.dirname(os.path.abspath(path)), r["audio"])
            if r.get("audio") and not os.path.isfile(r["audio"]):
                raise ValueError(f"{path}:{i}: audio file {r['audio']} not found")
            if r.get("audio") and (sec := seconds(r["audio"], path, i)) > MAX_SECONDS:
                raise ValueError(f"{path}:{i}: {r['audio']} lasts {sec:.1f} s, longer than the encoder's "
                                 f"{MAX_SECONDS} s window; split or crop it")
            if r["id"] in ids:  # features are stored by id: a second row would be answered from the first's audio
                raise ValueError(f"{path}:{i}: id {r['id']!r} is also line {ids[r['id']]}'s; ids must be unique")
            ids[r["id"]] = i
            rows.append(r)
    asked = {r["question"].lower() for r in rows if r["split"] == "speech_train" and r["task"] == "qa"}
    if leak := [r["id"] for r in rows if r["split"] in ("val", "test") and r.get("question", "").lower() in asked]:
        print(f"warning: {path}: {len(leak)} val/test questions also in speech_train (e.g. {leak[0]}): memory, not S2T")
    return rows

def seconds(audio, path, line):  # an utterance's length from its header (non-WAV: with soundfile, or unchecked)
    if not audio.lower().endswith(".wav"):
        return importlib.import_module("soundfile").info(audio).duration if importlib.util.find_spec("soundfile") else 0
    try:
        with wave.open(audio) as w:
            return w.getnframes() / w.getframerate()
    except (wave.Error, EOFError) as e:
        raise ValueError(f"{path}:{line}: {audio}: unreadable WAV ({e or 'truncated file'})")

def check_rows(rows, needed, path, batch_size):
    """Every split the run needs has rows, and one batch fits in each split it trains on: one line if not."""
    if missing := [s for s in needed if not any(r["split"] == s for r in rows)]:
        raise ValueError(f"{path}: no rows with split {', '.join(missing)} (needed: {', '.join(needed)})")
    for name, s in (("pretrain", [r for r in rows if r["split"] == "pretrain"]), ("speech_train", finetune_rows(rows))):
        if 0 < len(s) < batch_size:
            raise SystemExit(f"--batch-size {batch_size}: larger than the {name} split ({len(s)} rows in {path})")

def fingerprint(path):
    """A manifest's content hash with its audio files' sizes and mtimes (run.json): changed data is another run."""
    h, base = hashlib.sha256(), os.path.dirname(os.path.abspath(path))
    for raw in open(path, "rb"):
        h.update(raw)
        try:
            audio = json.loads(raw).get("audio")
        except (ValueError, AttributeError):  # read_manifest reports it
            continue
        if isinstance(audio, str) and os.path.isfile(a := os.path.join(base, audio)):
            h.update(f"{os.path.getsize(a)}:{os.stat(a).st_mtime_ns}".encode())
    return h.hexdigest()[:16]

def write_jsonl(path, rows):  # atomically, as every file here
    with open(f"{path}.{os.getpid()}.tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(f"{path}.{os.getpid()}.tmp", path)

def make_batch(rows, tok, speech, features=None, encoded=False):
    """Rows -> the dict SpeechLLM takes. speech=True: as audio (<speech>, features[id] = mel (n_mels, T), or encoder
    states (C, T/2) when encoded); speech=False: the transcript typed in its place."""
    prompts, answers, mels, transcripts = [], [], [], []
    for r in rows:
        if r["task"] == "lm":                        # plain text: loss on every token
            prompts.append([tok.bos_id])
        elif r["task"] == "copy":                    # typed "repeat after me: ..." (ASR in text form)
            prompts.append(tok.prompt(r["question"]))
        else:
            spoken = speech and bool(r.get("audio"))  # a row without audio is typed, also in a speech batch (replay)
            said = "<speech>" if spoken else (r["question"] if r["task"] == "qa" else r["transcript"])
            said += r.get("instruction", "") if r["task"] == "qa" else ""  # e.g. real.INSTRUCTION, typed or spoken
            prompts.append(tok.prompt((ASR_INSTRUCTION if r["task"] == "asr" else "") + said))
            if spoken:
                mels.append(features[r["id"]])
                transcripts.append(tok.encode(r["transcript"]))
        answers.append(tok.encode(r.get("target", r["answer"])) + [tok.eos_id])  # target: self_targets, own_answers
    batch = dict(prompts=prompts, answers=answers, speech_id=tok.speech_id, speech=None, encoded=encoded,
                 transcripts=transcripts, blank_id=tok.pad_id)
    if mels:
        lens = torch.tensor([m.shape[-1] for m in mels])
        batch["speech"] = torch.stack([torch.nn.functional.pad(m, (0, int(lens.max()) - m.shape[-1])) for m in mels])
        batch["speech_lens"] = lens                  # (B, n_mels or C, T_max), right-padded with zeros
    return batch

def load_features(rows, n_mels=N_MELS):  # id -> log-mel (n_mels, T) of every row with audio, kept in memory
    return {r["id"]: log_mel(load_audio(r["audio"]), n_mels) for r in rows if r.get("audio")}

def build(data_dir, seed=0, n_entities=N_ENTITIES, rows=None):
    """World -> tokenizer -> audio -> manifest.jsonl in data_dir, cached; rows (yours): only their text's tokenizer."""
    manifest, tok = os.path.join(data_dir, "manifest.jsonl"), os.path.join(data_dir, "tokenizer")
    if rows is not None and not os.path.exists(tok + ".model"):
        os.makedirs(data_dir, exist_ok=True)
        train_tokenizer([r[k] for r in rows if r["split"] == "pretrain" for k in ("question", "answer") if r[k]], tok)
    if rows is not None or os.path.exists(manifest):
        return manifest
    os.makedirs(os.path.join(data_dir, "audio"), exist_ok=True)
    world = make_world(n_entities, seed)
    rows = make_splits(world, seed)
    pre = [r for r in rows if r["split"] == "pretrain"]  # the text corpus: what the LLM reads
    train_tokenizer([r["answer"] for r in pre] + [r["question"] for r in pre if r["question"]], tok)
    rng, jobs = random.Random(seed + 2), []
    for r in rows:
        if r["task"] in ("qa", "asr") and r["split"] not in ("pretrain", "pretrain_val"):  # those two are typed
            r["audio"] = f"audio/{r['id']}.wav"
            jobs.append((os.path.join(data_dir, r["audio"]), synthesize, (r["transcript"], random_speaker(rng))))
    save_speech(jobs)
    with open(os.path.join(data_dir, "world.json"), "w") as f:
        json.dump(world, f, indent=1)
    write_jsonl(manifest, rows)  # last, so a manifest means the build finished
    return manifest

@dataclass
class Data:
    rows: list              # manifest rows (read_manifest)
    tok: object             # Tokenizer, or HFTokenizer of a pretrained LLM
    features: dict          # id -> log-mel (n_mels, T); after align, `encoded` holds the frozen encoder's outputs
    calib: list             # calibration rows of the importance analysis
    calib2: list            # a second, disjoint set of the same size: the noise floor of every shift
    encoded: dict = None

    def split(self, name):
        return [r for r in self.rows if r["split"] == name]
    def text_batch(self, rows):    # the transcript typed in place of the audio ("T2T", textual importance)
        return make_batch(rows, self.tok, speech=False)
    def speech_batch(self, rows):  # mel features through encoder and adaptor
        return make_batch(rows, self.tok, speech=True, features=self.features)
    def ft_batch(self, rows):      # the frozen encoder's outputs, computed once after align
        return make_batch(rows, self.tok, speech=True, features=self.encoded, encoded=True)

def calibration_sets(rows, at_least, frac=1 / 30, seed=0):
    """Two disjoint calibration sets from the fine-tuning data, frac·N rows as the paper's 1/30 but at least at_least
    (1/30 of ours is 17 rows, an estimate of mostly noise). The second set measures the noise floor of every shift."""
    pool = finetune_rows(rows)
    n = min(len(pool), max(at_least, round(frac * len(pool))))
    order = random.Random(seed).sample(range(len(pool)), len(pool))
    return [pool[i] for i in order[:n]], [pool[i] for i in order[n:2 * n]]

if __name__ == "__main__":
    print(build(sys.argv[2]) if len(sys.argv) == 3 and sys.argv[1] == "build" else "usage: python data.py build DIR")
