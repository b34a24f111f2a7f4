"""
train.py - the paper's pipeline, a function per stage, one training loop: data -> pretrain (every fact as text: the
original) -> align (no fine-tuning) -> analyse (importance, Table 1, noise floor) -> per METHODS row: finetune, measure.

    python train.py --quick                    # every stage, tiny: ~30 s on 2 CPU cores
    python train.py                            # the default comparison (README: Results)
    python train.py --real                     # SmolLM2-135M + Whisper tiny.en (real.py; README: Real weights)
    torchrun --nproc_per_node 2 train.py --device cuda ...   # DDP: one process per GPU (gloo on CPU)
"""
import argparse, copy, json, math, os, random, re, sys, time
from contextlib import closing, nullcontext
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data, evaluate, importance as imp, lora
from model import ModelConfig, autocast, build_model, count, mel_bins, path_problem, set_trainable, trainable_state
from rundir import (RunDir, barrier, check_init_from, eta_line, init_from, merge, read_record, resume, save_checkpoint,
                    save_json, train_plan)

# ---- Settings. Sizes that are not flags: --quick and --real set their own, and Python callers main(argv, **sizes)
SIZES = dict(n_entities=data.N_ENTITIES, n_layers=ModelConfig.n_layers, d_llm=ModelConfig.d_llm, compress_steps=150,
             calib_min=256, data_dir="", log_every=100, stop_every=0)  # compress: align's 2nd phase (below)
QUICK = dict(out="runs/quick", n_entities=16, n_layers=4, d_llm=64, batch_size=16, pretrain_steps=400,
             align_steps=100, compress_steps=40, steps=30, calib_min=16, log_every=50)  # numbers mean little
FINE_TUNING = {"steps", "lr", "lora_lr", "lora_r", "lam", "seed", "data_dir", "init_from"}  # --init-from may change

def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=type(
        "F", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {}))
    g = p.add_argument_group("Run: what to run and where (not part of a run's settings)")
    g.add_argument("--out", default="runs/default", help="run directory: checkpoints, results.json, importance.json")
    g.add_argument("--method", default="full,layer_lr,lora", help=f"comma list of {', '.join(METHODS)}, lora_r<N>")
    g.add_argument("--seeds", default="", help="comma list: the pipeline per seed in OUT/seed<N>, then mean ± sd")
    g.add_argument("--quick", action="store_true", help=f"a tiny run of every stage: {QUICK}")
    g.add_argument("--resume", action="store_true", help="continue an interrupted stage from its last checkpoint")
    g.add_argument("--reanalyse", action="store_true", help="measure again from the checkpoints (run.json's settings)")
    g.add_argument("--force", action="store_true", help="OUT holds a run with other settings: delete it, start over")
    g.add_argument("--init-from", default="", help="a run with these settings: its aligned model (fine-tuning seeds)")
    g = p.add_argument_group(f"Data, model, hardware (sizes, not flags: {SIZES})")
    g.add_argument("--seed", type=int, default=0, help="training seed (the synthetic world has its own, 0)")
    g.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (under torchrun: each rank its own GPU)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast dtype of the forward passes; auto: bf16 on CUDA, fp32 on CPU; weights stay fp32")
    g.add_argument("--real", action="store_true", help="SmolLM2-135M + Whisper tiny.en, real questions: real.py")
    g.add_argument("--manifest", default="", help="your own JSONL manifest instead of the world (README)")
    g.add_argument("--llm", default="", help="a pretrained causal LM (local dir or .gguf): no pretraining")
    g.add_argument("--encoder", default="", help="a pretrained Whisper (transformers dir), frozen")
    g.add_argument("--targets", default="gold", choices=["gold", "self"], help="gold answers or the LLM's own (--real)")
    g = p.add_argument_group("Training (AdamW, 5% warmup, cosine decay to 10%, clip 1); fine-tuning and importance")
    g.add_argument("--batch-size", type=int, default=32, help="sequences per micro-batch and process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--pretrain-steps", type=int, default=1000, help="text LM steps of the tiny LLM (LR 3e-3)")
    g.add_argument("--align-steps", type=int, default=2000, help="align: encoder + adaptor, LLM frozen (LR 3e-3)")
    g.add_argument("--steps", type=int, default=100, help="speech fine-tuning steps, the same for every method")
    g.add_argument("--lr", type=float, default=3e-4, help="peak LR of the methods that train the LLM's weights")
    g.add_argument("--lora-lr", type=float, default=6e-4, help="peak LR of the LoRA methods")
    g.add_argument("--lora-r", type=int, default=8, help="LoRA rank r, alpha = 2r (the paper: 8 for 1B)")
    g.add_argument("--lam", type=float, default=0.4, help="λ of Eq. 3: the most important layer trains at 1-λ")
    g.add_argument("--importance-kind", default="taylor_sample", choices=list(imp.KINDS),
                   help="taylor: the paper's |ḡ·θ|; taylor_sample: mean_i |g_i·θ| (the toy's; README)")
    return p

def get_args(argv=None, preset=None, **sizes):  # preset: defaults of a mode (real.py's), as --quick's
    p, argv = get_parser(), list(sys.argv[1:] if argv is None else argv)
    p.set_defaults(**{**SIZES, **(QUICK if "--quick" in argv else {}), **(preset or {}), **sizes})
    args = p.parse_args(argv)
    unset = argparse.Namespace(**dict.fromkeys(vars(args)))  # None: parse_args sets only the flags given (--reanalyse)
    args.given = {k for k, v in vars(p.parse_args(argv, unset)).items() if v is not None} | set(sizes)
    for k, low in dict(batch_size=1, grad_accum=1, steps=1, lora_r=1, pretrain_steps=0, align_steps=0).items():
        if getattr(args, k) < low: p.error(f"--{k.replace('_', '-')}: must be >= {low}, got {getattr(args, k)}")
    if not (args.lr > 0 and args.lora_lr > 0 and 0 <= args.lam <= 1):
        p.error(f"--lr, --lora-lr: must be > 0; --lam: in [0, 1]; got {args.lr}, {args.lora_lr}, {args.lam}")
    try:
        args.methods = list(dict.fromkeys(method_row(m) and m for m in args.method.split(",") if m))  # once each
        args.seed_list = [int(s) for s in args.seeds.split(",") if s]
    except ValueError as e:
        p.error(str(e) if "--method" in str(e) else "--seeds: comma-separated integers expected")
    if not args.methods: p.error("--method: give at least one method, e.g. --method full")
    if len(set(args.seed_list)) < len(args.seed_list):
        p.error(f"--seeds {args.seeds}: a seed given twice would count twice in the mean ± sd")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA GPU is visible to torch here; use --device cpu")
    if os.path.exists(args.out) and not os.path.isdir(args.out): p.error(f"--out {args.out}: is a file; give a directory")
    args.dtype = {"auto": "bf16" if args.device.startswith("cuda") else "fp32"}.get(args.dtype, args.dtype)
    if args.real and not (args.llm and args.encoder and args.manifest): p.error("--real: runs as python real.py")
    for flag, path in (("--llm", args.llm), ("--encoder", args.encoder)):  # before any work
        if path and (problem := path_problem(path)): raise SystemExit(f"{flag} {path}: {problem}")
    world = f"formant-e{args.n_entities}-s0-v{data.WORLD_VERSION}"  # one cache beside OUT for every run
    args.data_dir = args.data_dir or (os.path.join(args.out, "data") if args.manifest else
                                      os.path.join(os.path.dirname(os.path.abspath(args.out)), "data", world))
    for k in ("data_dir", "manifest", "init_from"):  # absolute: a run can be re-read from anywhere
        setattr(args, k, getattr(args, k) and os.path.abspath(getattr(args, k)))
    return args

# ---- The fine-tuning methods: one row each. The encoder is always frozen and the adaptor always trains
@dataclass(frozen=True)
class Method:
    llm: bool = False       # the LLM's own weights train (full fine-tuning)
    lora: bool = False      # LoRA adapters on the LLM's linears train instead, the LLM frozen (Hu et al. 2021)
    layer_lr: bool = False  # Eq. (3): per-layer LRs from the original LLM's textual importance
    r: int = 0              # LoRA rank; 0 = --lora-r (Table 3's rows lora_r<N> set it)
    kl: bool = False        # distillation: match the original LLM fed the transcript as text (BLSP-KD, Ultravox)
    replay: float = 0.0     # this share of every batch is typed QA from the LLM's own text data (rehearsal)
    freeze: str = ""        # "top" / "random": 3% of the LLM's weights get no gradient (ours)

METHODS = {
    "frozen": Method(),                                    # adaptor only: the LLM is untouched
    "full": Method(llm=True),                              # the paper's baseline: text ability degrades
    "layer_lr": Method(llm=True, layer_lr=True),           # the paper's first mitigation
    "lora": Method(lora=True),                             # the paper's second mitigation
    "lora_layer_lr": Method(lora=True, layer_lr=True),     # ours: Eq. (3) on the LoRA parameters
    # the field's other mitigations, on the same loop, data, steps and schedule (not run by default)
    "kl": Method(llm=True, kl=True),                       # full FT, loss = KL to the text teacher
    "lora_kl": Method(lora=True, kl=True),
    "replay": Method(llm=True, replay=0.25),               # full FT with text replay
    "freeze_top": Method(llm=True, freeze="top"),          # full FT, the most text-important weights frozen
    "freeze_random": Method(llm=True, freeze="random"),    # ... or as many random ones: the control
}

def method_row(name):  # a METHODS row, or the LoRA row at rank N for lora_r<N> (Table 3: the rank ablation)
    m = re.fullmatch(r"lora_r(\d+)", name)
    if name not in METHODS and not (m and int(m.group(1)) >= 1):
        raise ValueError(f"--method: unknown method {name!r} (choose from {', '.join(METHODS)}, or lora_r<N>)")
    return METHODS.get(name) or replace(METHODS["lora"], r=int(m.group(1)))

# ---- The training loop: every stage, every method
@dataclass
class TrainConfig:
    name: str = "train"        # stage name: log lines and the resume checkpoint OUT/<name>.partial.pt
    out: str = ""              # where the resume checkpoint is written ("" = nowhere)
    batch_size: int = 32       # rows per micro-batch and process
    grad_accum: int = 1        # micro-batches per optimizer step
    ctc_weight: float = 0.0    # weight of the auxiliary CTC loss (model.py: ctc_loss)
    ctc_only: bool = False     # the CTC loss alone, the LLM not run (align's first phase with CTC compression)
    log_every: int = 100       # steps between log lines and resume checkpoints
    stop_every: int = 0        # early stopping (align's CTC phase): a held-out loss every N steps; 3 without a new best
    seed: int = 0              # the order of the batches
    device: str = "cpu"
    dtype: str = "fp32"        # autocast dtype of the forward passes
    resume: bool = False       # continue from OUT/<name>.partial.pt
    rank: int = 0              # DDP: this process, and how many there are
    world: int = 1
    plan: tuple = ()           # (name, steps) of the run's stages still to train: the whole run's ETA (train_plan)

def get_lr(it, total, warmup):  # LR multiplier at step it: linear warmup, then cosine decay to 10% of the peak
    if it < warmup:
        return (it + 1) / warmup
    progress = min(1.0, (it - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

def batch_rows(rows, batch_size, step, seed):  # epochs are seeded permutations: any step's rows can be rebuilt (resume)
    start, out = step * batch_size, []
    while len(out) < batch_size:
        epoch, i = divmod(start + len(out), len(rows))
        perm = list(range(len(rows)))
        random.Random(seed * 100003 + epoch).shuffle(perm)
        out += [rows[j] for j in perm[i:i + batch_size - len(out)]]
    return out

def batches_of(rows, make_batch, cfg, replay_rows=(), replay_frac=0.0):
    """step -> this rank's micro-batches m·world + rank of the step; replay_frac of each from replay_rows."""
    k = round(replay_frac * cfg.batch_size) if replay_rows else 0  # replayed rows per micro-batch
    n, A, W = cfg.batch_size - k, cfg.grad_accum, cfg.world  # n: the rows' own per micro-batch
    def batches(step):
        glob = batch_rows(rows, n * A * W, step, cfg.seed)
        text = batch_rows(replay_rows, k * A * W, step, cfg.seed + 1) if k else []
        return [make_batch(glob[i * n:(i + 1) * n] + text[i * k:(i + 1) * k]) for i in range(cfg.rank, A * W, W)]
    return batches

def train(model, param_groups, batches, steps, cfg, teacher=None, held_out=None, held=None):
    """One loop for every stage: AdamW groups with their own `initial_lr`, batches(step) -> micro-batches. teacher:
    the loss is KL to its answer distribution on the same rows typed (batch["typed"]). held_out() -> a held-out loss
    every cfg.stop_every steps, appended to held; stop once 3 in a row beat no earlier one. -> every step's loss"""
    opt = torch.optim.AdamW(param_groups, betas=(0.9, 0.95), fused=True)  # fused: one kernel for every param
    A, W, cuda = cfg.grad_accum, cfg.world, cfg.device.startswith("cuda")
    # DDP broadcasts rank 0's weights, then averages gradients in backward; fp16 needs loss scaling (else a no-op)
    fwd = DDP(model, device_ids=[torch.device(cfg.device).index] if cuda else None) if W > 1 else model.loss
    scaler = torch.amp.GradScaler(cfg.device.split(":")[0], enabled=cfg.dtype == "fp16")
    partial = os.path.join(cfg.out, f"{cfg.name}.partial.pt") if cfg.out else ""  # the resume file
    held = [] if held is None else held  # the caller's list: it reads the curve
    start, losses = resume(partial, model, opt, cfg.resume, held)
    model.train()
    t0 = time.time()
    for step in (bar := tqdm(range(start, steps), desc=cfg.name, leave=False, disable=None if cfg.rank == 0 else True)):
        for g in opt.param_groups:  # each group's peak LR x the schedule (warmup: 5% of the stage's steps)
            g["lr"] = g["initial_lr"] * get_lr(step, steps, max(1, int(0.05 * steps)))
        micro = batches(step)
        # summed CE / answer tokens of the WHOLE step (all micro-batches and ranks; / W: DDP averages) = one big batch
        n_tok = torch.tensor(float(sum(len(a) for b in micro for a in b["answers"])), device=cfg.device)
        if W > 1: dist.all_reduce(n_tok)
        total = 0.0
        for m, batch in enumerate(micro):
            with fwd.no_sync() if W > 1 and m < A - 1 else nullcontext():  # all-reduce on the last micro-batch only
                with autocast(cfg.device, cfg.dtype):  # ctc_weight / A: the CTC loss is a mean per micro-batch
                    kl = {} if teacher is None else {"teacher_logits": teacher.answer_logits(batch["typed"])}  # T = 1
                    loss = fwd(batch, n_tokens=n_tok / W, ctc_weight=cfg.ctc_weight / A, ctc_only=cfg.ctc_only, **kl)
                scaler.scale(loss).backward()
            total += loss.detach()
        if W > 1: dist.all_reduce(total)
        total /= W  # the mean over ranks
        if not torch.isfinite(total):  # all ranks see the same reduced loss, so all stop together
            raise SystemExit(f"{cfg.name}: loss is {total.item()} at step {step}; stopped (last good checkpoint kept)")
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_([p for g in param_groups for p in g["params"]], 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(total.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if held_out and (step + 1) % cfg.stop_every == 0:  # early stopping, checked before the resume file is written
            held.append(held_out()), model.train()
            steps = step + 1 if len(held) > 3 and min(held[-3:]) >= min(held[:-3]) else steps  # stop: this step the last
            tqdm.write(f"{cfg.name} step {step + 1}: held-out loss {held[-1]:.4f}" + " (3 without a new best: stop)" * (
                steps == step + 1))
        ms = 1000 * (time.time() - t0) / (step + 1 - start)  # a step's mean time so far
        if step + 1 - start == min(10, steps - start) and cfg.name in dict(cfg.plan):  # 10 steps timed: the run's ETA
            tqdm.write(eta_line(cfg.plan, cfg.name, steps - step - 1, ms / 1000))
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            tqdm.write(f"{cfg.name} step {step + 1}/{steps} | loss {losses[-1]:.4f} | lr {opt.param_groups[0]['lr']:.2e}"
                       f" | norm {norm:.2f} | {ms:.0f} ms | {ms * (steps - step - 1) / 6e4:.1f} min left of {cfg.name}")
            if cfg.rank == 0 and partial:
                save_checkpoint(partial, {"model": trainable_state(model), "optimizer": opt.state_dict(),
                                          "step": step + 1, "rng": torch.get_rng_state(), "losses": losses, "held": held})
        if step + 1 == steps:
            break
    if cfg.rank == 0 and partial and os.path.exists(partial): os.remove(partial)
    return losses

def param_groups(model, base_lr, scales=None):  # AdamW groups; with scales, one per LLM layer (Eq. 3), printed
    groups = imp.layer_param_groups(model.named_parameters(), scales, base_lr)
    print(imp.format_lr_table(groups) if scales is not None else "", end="\n" if scales is not None else "")
    return groups

def setup_method(model, method, scales, lr, lora_lr, lora_r=8, importance=None, seed=0):
    """Freeze / wrap the model for a METHODS row (the adaptor always trains); -> its AdamW param groups."""
    if method.lora:
        r = method.r or lora_r
        lora.inject_lora(model.llm, lora.TARGETS, r, 2.0 * r)  # alpha = 2r, as the paper
        lora.mark_only_lora_as_trainable(model, also=("adaptor.",))
    else:
        set_trainable(model, ["adaptor."] + (["llm."] if method.llm else []))
    if not model.cfg.ctc_compress:  # the CTC blank is then never used: frozen, or DDP would wait for its gradient
        model.adaptor.blank.requires_grad_(False)
    if method.freeze:  # a gradient mask on 3% (as Table 1's): AdamW without weight decay never moves those entries
        params = imp.importance_params(model)
        for k, frozen in imp.global_mask(importance, 0.03, method.freeze, seed).items():
            params[k].register_hook(lambda g, free=~frozen.to(params[k].device): g * free)
    return param_groups(model, lora_lr if method.lora else lr, scales if method.layer_lr else None)

# ---- The stages: values in, a checkpoint dict out (its "results" and "report" go to results.json, importance.json)
def load_data(args, master, world, rows, splits):
    """The manifest (the world built, or yours: rows), its tokenizer (trained, or --llm's), log-mels, calibration."""
    if master and not (rows and args.llm): data.build(args.data_dir, n_entities=args.n_entities, rows=rows)
    barrier(world)
    rows = rows or data.read_manifest(os.path.join(args.data_dir, "manifest.jsonl"))
    tok = data.HFTokenizer(args.llm) if args.llm else data.Tokenizer(os.path.join(args.data_dir, "tokenizer.model"))
    data.check_rows(rows, splits, args.manifest or args.data_dir, args.batch_size)
    n_mels = mel_bins(args.encoder)
    return data.Data(rows, tok, data.load_features(rows, n_mels), *data.calibration_sets(rows, args.calib_min)), n_mels

def pretrain(model, d, tc, steps, lr=3e-3):
    """Stage 1: the tiny LLM learns the whole world from text -> "the original LLM" (a pretrained --llm: 0 steps)."""
    set_trainable(model, [] if model.cfg.llm else ["llm."])  # a pretrained LLM's weights are not ours to save
    print(f"pretrain: {count(model)}")
    losses = train(model, param_groups(model, lr), batches_of(d.split("pretrain"), d.text_batch, tc), steps,
                   replace(tc, name="pretrain")) if steps else []
    with autocast(tc.device, tc.dtype):  # T2T of the original LLM, on test and (for choosing settings) val
        acc = {k: evaluate.accuracy(model, d.split(s), d.text_batch, d.tok)[0]
               for k, s in (("t2t_acc", "test"), ("val_t2t_acc", "val")) if d.split(s)}
    return {"config": vars(model.cfg), "model": trainable_state(model),
            "results": {"pretrain": {**acc, "steps": steps}, "train_loss": {"pretrain": loss_summary(losses)}}}

def align(model, d, tc, steps, compressed, lr=3e-3):
    """Stage 2: encoder + adaptor learn to feed the frozen LLM (ASR + spoken QA, + CTC: ours). align_raw.pt: CTC
    alone on the raw 10 Hz frames, the LLM not run (--real: stopped by the val questions' CTC loss); align.pt: CTC
    compression on, the LLM's loss too, LR / 3 (--real: 0 steps; its loss rose). The last: no fine-tuning."""
    set_trainable(model, ["adaptor."] + ([] if model.cfg.encoder else ["encoder."]))  # a real Whisper stays frozen
    print(f"align: {count(model)}")
    rows, make, val, held = d.split("speech_train"), d.speech_batch, d.split("val"), []
    if model.cfg.encoder:  # a frozen pretrained encoder: its outputs once, not at every step
        d.encoded, make = d.encoded or model.precompute_encoder(d.features, by_length=True), d.ft_batch
    name = "align_compress" if compressed else "align"
    stop = tc.stop_every and not compressed and val and (lambda: evaluate.ctc_loss(model, val, make))
    losses = train(model, param_groups(model, lr / 3 if compressed else lr), batches_of(rows, make, tc), steps,
                   replace(tc, name=name, ctc_weight=1.0, ctc_only=not compressed), held_out=stop, held=held)
    res = {"train_loss": {name: loss_summary(losses)}, **({"held_out_ctc": held} if held else {})}
    if compressed:
        with autocast(tc.device, tc.dtype):
            res["no_ft"] = evaluate.evaluate_all(model, d.rows, d.tok, d.text_batch, make)
    return {"config": vars(model.cfg), "model": trainable_state(model), "results": res}

def finetune(model, groups, d, tc, steps, teacher=None, replay_frac=0.0):
    """Stage 4, one method, from the align checkpoint (compression's CTC loss stays on, for every method)."""
    make = d.ft_batch if teacher is None else lambda rows: {**d.ft_batch(rows), "typed": d.text_batch(rows)}
    replay, t = replay_rows(d.rows) if replay_frac else (), time.time()
    losses = train(model, groups, batches_of(data.finetune_rows(d.rows), make, tc, replay, replay_frac), steps,
                   replace(tc, ctc_weight=1.0 if model.cfg.ctc_compress else 0.0), teacher)
    return {"config": vars(model.cfg), "model": trainable_state(model), "losses": losses,
            "trainable": lora.count_parameters(model)[0], "ms_per_step": 1000 * (time.time() - t) / steps}

def self_targets(model, d, tc, max_new_tokens=48):  # --targets self: each training QA's original LLM's typed answer
    with autocast(tc.device, tc.dtype):  # as the style control's (evaluate.own_answers); cut: ran out before EOS
        own = evaluate.own_answers(model, data.finetune_rows(d.rows), d.text_batch, d.tok, max_new_tokens, cut := [])
    return {"targets": {r["id"]: r["target"] for r in own}, "results": {"self_targets_cut": sum(cut) / len(cut)}}

def replay_rows(rows):  # typed QA of the LLM's own text data; a real LLM's is not ours: its fine-tuning rows, typed
    return [r for r in rows if r["split"] == "pretrain" and r["task"] == "qa"] or \
        [{**r, "audio": None} for r in data.finetune_rows(rows)]

def analyse(run, args, model, d, tc):
    """Stage 3: the original LLM's textual importance, Table 1, the noise floor and the style control."""
    if d.encoded is None:  # the encoder is frozen from here on: its outputs once (align computed them already)
        later = {r["id"] for r in data.finetune_rows(d.rows) + [r for r in d.rows if r["split"] != "speech_train"]}
        d.encoded = model.precompute_encoder({k: v for k, v in d.features.items() if k in later},
                                             by_length=bool(args.encoder))
    per_row = [] if args.importance_kind != "taylor" else None  # the per-row importances: the noise floor's draws
    how = (args.importance_kind, args.seed, tc.batch_size, per_row)
    work = lambda: evaluate.original_controls(model, d, evaluate.analyse_original(model, d, *how), *how)
    with autocast(tc.device, tc.dtype):  # --reanalyse measures it again
        return stage(run, "importance_original", None, work, redo=args.reanalyse)

def measure(run, model, name, w0, original, d, tc, args, ck):
    """Stage 5, a fine-tuned model (ck: its stage): T2T / S2T / WER, what it reads, how its textual importance moved."""
    with autocast(tc.device, tc.dtype):
        m = evaluate.evaluate_all(model, d.rows, d.tok, d.text_batch, d.ft_batch)
    lora.merge_lora(model)  # the weights the model uses, W + BA; in fp32, outside autocast
    with autocast(tc.device, tc.dtype):
        shift, rep = evaluate.measure_shift(model, w0, original, d, args.importance_kind, name, tc.batch_size)
        more, rep2 = evaluate.shift_controls(model, original, d, args.importance_kind, name, tc.batch_size)  # ours
    merge(run.report, {**rep, **rep2})
    if run.master:  # Fig. 1/4 as pictures: the original's most important matrix, and each method's ΔW there
        evaluate.save_matrices(run.path("matrices.pt"), original["text"], name, imp.importance_params(model), w0)
    print(f"{name}: " + " | ".join(f"{k} {v:.3f}" for k, v in m.items()))
    return {**m, **shift, **more, "ms_per_step": ck["ms_per_step"], "trainable": ck["trainable"],
            "train_loss": loss_summary(ck["losses"])}

def settings(args):  # every flag outside the "Run" group, the sizes, the DDP world size: another value, another run
    run = {a.dest for a in get_parser()._action_groups[2]._group_actions} | {"log_every"}
    mine = {k: v for k, v in vars(args).items() if k not in run | {"help", "given", "methods", "seed_list"}}
    if args.manifest and os.path.isfile(args.manifest):  # a run knows its data: changed data is another run
        mine["data_fingerprint"] = data.fingerprint(args.manifest)
    return mine

def loss_summary(losses):  # mean training loss over the first and the last 10% of a stage's steps
    n = max(1, len(losses) // 10)
    return {"first": sum(losses[:n]) / n, "last": sum(losses[-n:]) / n} if losses else {}

def stage(run, name, model, work, redo=False):  # the one skip: OUT/<name>.pt loaded (into model), else work() saved
    if run.done(name) and not redo: return run.load(name, model)
    try:
        return run.finish(name, work)
    except KeyboardInterrupt:  # Ctrl-C: one line naming the stage, not a traceback
        raise SystemExit(f"{name}: interrupted; finished stages are kept; rerun with --resume to go on") from None

# ---- main: the pipeline, one call per stage
def run_pipeline(args, seeds_after=0):  # seeds_after: how many --seeds follow this one (the ETA)
    rank, world = setup_ddp(args)
    if args.reanalyse: read_record(args)
    splits = ("speech_train", "test") + (() if args.llm else ("pretrain",))  # what the stages read
    rows = data.read_manifest(args.manifest) if args.manifest else None  # your data, checked before any write
    if rows: data.check_rows(rows, splits, args.manifest, args.batch_size)
    mine = settings(args)  # (a manifest's fingerprint read once)
    src = check_init_from(args.init_from, mine, FINE_TUNING) if args.init_from else None
    with closing(RunDir(args.out, mine, args.force, args.reanalyse, rank == 0, world, FINE_TUNING)) as run:
        if src: init_from(run, args.init_from, src)
        t = time.time()
        d, n_mels = load_data(args, rank == 0, world, rows, splits)
        run.results["timing_s"].setdefault("data", round(time.time() - t, 1))
        run.results["planned"] = sorted(set(run.results["methods"]) | set(args.methods))  # evaluate.py checks it
        run.results["s2t_chance"] = evaluate.chance(d.split("test"))  # beside every S2T
        print(f"data: {len(d.rows)} rows, {len(d.features)} spoken, vocab {d.tok.vocab_size} ({time.time() - t:.1f}s)")
        tc = TrainConfig(out=args.out, batch_size=args.batch_size, grad_accum=args.grad_accum, rank=rank, world=world,
                         plan=train_plan(args, run.done, seeds_after), **{k: getattr(args, k) for k in (
                             "log_every", "stop_every", "seed", "device", "dtype", "resume")})
        cfg = ModelConfig(vocab_size=d.tok.vocab_size, n_layers=args.n_layers, d_llm=args.d_llm, llm=args.llm,
                          encoder=args.encoder, n_mels=n_mels, ctc_compress=True)  # CTC compression (ours)
        if args.llm:  # a pretrained LLM's CTC head scores only the training transcripts' tokens
            used = {t for r in d.split("speech_train") for t in d.tok.encode(r["transcript"])} - {d.tok.pad_id}
            cfg.ctc_tokens = [d.tok.pad_id] + sorted(used)  # the blank first
        model = build_model(cfg, args.seed, args.device)
        if (r := max([method_row(m).r or args.lora_r for m in args.methods if method_row(m).lora], default=0)) > (
                low := lora.max_rank(model.llm)):  # up front: LoRA's rank within the smallest adapted matrix
            raise SystemExit(f"--lora-r / lora_r<N>: r={r} exceeds the smallest adapted matrix's side ({low})")
        done = [stage(run, "pretrain", model, lambda: pretrain(model, d, tc, 0 if args.llm else args.pretrain_steps))]
        print(f"pretrained LLM: T2T {run.results['pretrain']['t2t_acc']:.3f}")
        if args.targets == "self":  # behaviour alignment (BLSP, DiVA): answers in the LLM's own words, from here on
            own = stage(run, "self_targets", None, lambda: self_targets(model, d, tc))["targets"]
            for r in data.finetune_rows(d.rows):  # align, fine-tuning and calibration train on them; scoring: gold
                r["target"] = own[r["id"]]
        done.append(stage(run, "align_raw", model, lambda: align(model, d, tc, args.align_steps, False)))
        done.append(stage(run, "align", model, lambda: align(model, d, tc, args.compress_steps, True)))
        print("no fine-tuning: " + " | ".join(f"{k} {v:.3f}" for k, v in run.results["no_ft"].items()))
        aligned = lambda: build_model(cfg, args.seed, args.device, [ck["model"] for ck in done])  # afresh, each time
        original = analyse(run, args, aligned(), d, tc)
        finetune_all(run, args, aligned, original, d, tc)
        run.save(final=True)
        evaluate.report(run.results, run.report, run.out if run.master else None)
        return run.results

def finetune_all(run, args, aligned, original, d, tc):  # per method, from a fresh aligned(): finetune, measure
    scales = imp.layer_lr_scale(imp.aggregate(original["text"])["layer"], args.lam)  # Eq. (3): the ORIGINAL's
    todo, measured = run.todo(args.methods, args.reanalyse)
    for name in todo:
        model, row = aligned(), method_row(name)
        w0 = {k: v.detach().to("cpu", copy=True) for k, v in imp.importance_params(model).items()}
        teacher = copy.deepcopy(model).eval().requires_grad_(False) if row.kl else None  # the original LLM
        groups = setup_method(model, row, scales, args.lr, args.lora_lr, args.lora_r, original["text"], args.seed)
        print(f"finetune {name}: {count(model)}")
        try:
            ck = stage(run, f"ft_{name}", model, lambda: finetune(model, groups, d, replace(tc, name=f"ft_{name}"),
                                                                 args.steps, teacher, row.replay))
        except SystemExit as e:  # --reanalyse: an unreadable checkpoint keeps its method's previous results
            if not (args.reanalyse and name in measured): raise
            print(f"{e}; {name} keeps its previous results")
            continue
        run.results["methods"][name] = measure(run, model, name, w0, original, d, tc, args, ck)
        run.save()

def setup_ddp(args):  # nanoGPT-style: under torchrun one process group (NCCL; gloo on CPU); rank 0 alone writes, prints
    rank, args.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # world: a setting
    if args.world > 1 and not dist.is_initialized():
        if args.device.startswith("cuda"):
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    sys.stdout = open(os.devnull, "w") if rank != 0 else sys.stdout
    torch.manual_seed(args.seed)
    return rank, args.world

def run_seeds(args):  # --seeds: the pipeline per seed in OUT/seed<N> (from --init-from RUN/seed<N>, or RUN); mean ± sd
    per_seed, reports = {}, []
    for i, s in enumerate(args.seed_list):
        print(f"\n=== seed {s} ===")
        init, out = args.init_from and os.path.join(args.init_from, f"seed{s}"), os.path.join(args.out, f"seed{s}")
        init = init if init and os.path.isdir(init) else args.init_from
        per_seed[str(s)] = run_pipeline(argparse.Namespace(**{**vars(args), "seed": s, "out": out, "init_from": init}),
                                        len(args.seed_list) - i - 1)
        reports.append(json.load(open(os.path.join(out, "importance.json")))["distribution"])
    mean, sd = evaluate.mean_sd(list(per_seed.values()))
    dists = {k: [sum(x) / len(x) for x in zip(*(r[k] for r in reports))] for k in reports[0] if k != "original_speech"}
    js = evaluate.js_between_seeds(reports, dists)  # R4's null
    path = lambda name: os.path.join(args.out, name)
    save_json(path("results.json"), dict(seeds=per_seed, mean=mean, sd=sd, n_seeds=len(per_seed), js_between_seeds=js))
    save_json(path("importance.json"), {"distribution_mean": dists, "distribution_seeds": dict(zip(per_seed, reports))})
    print(f"\nmean over seeds {args.seeds}:")
    evaluate.report(mean, {"distribution": dists}, args.out, sd, [{k: r[k] for k in dists} for r in reports])
    print("importance JS between seeds (R4's null): " + ", ".join(f"{k} {v:.5f}" for k, v in js.items()))
    return mean

def main(argv=None, preset=None, **sizes):
    args = get_args(argv, preset, **sizes)
    return run_seeds(args) if args.seed_list else run_pipeline(args)

if __name__ == "__main__":
    if "--real" in sys.argv:  # real weights: real.py converts and builds them, then calls main() with their paths
        os.execv(sys.executable, [sys.executable, __file__.replace("train.py", "real.py"), *sys.argv[1:]])
    try:
        main()
    except ValueError as e:  # bad data (manifest line, audio file): the message names the file; no traceback
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C between stages (a measurement): one line, not a traceback
        raise SystemExit("interrupted: finished stages are kept; rerun with --resume to go on")
