"""
train.py - the whole pipeline, one hand-written training loop used by every stage:

  data      synthetic world, tokenizer, speech                      (data.py, cached in OUT/data)
  pretrain  the tiny LLM learns every fact from text                (LLM trained; "the original LLM")
  align     encoder + adaptor learn to feed the frozen LLM          (+ auxiliary CTC; the starting point, "no FT")
  finetune  speech fine-tuning, one run per --method, all from the align checkpoint, same data and steps:
              frozen         adaptor only (LLM untouched)
              full           adaptor + the whole LLM                (the paper's baseline: text degrades)
              layer_lr       full, with Eq. 3 per-layer LRs from the original LLM's textual importance
              lora           adaptor + LoRA on q,k,v,o,gate,up,down, LLM frozen
              lora_layer_lr  LoRA with Eq. 3 per-layer LRs (ours, not in the paper)
  evaluate  T2T, S2T, WER per method; importance before/after -> OUT/results.json, OUT/importance.json

    python train.py                      # the default pipeline on a CPU
    python train.py --method full --steps 100 --out runs/quick
    python train.py --out runs/abl --init-from runs/default --lora-lr 1e-3 --method lora   # pretrain + align reused
    torchrun --nproc_per_node 2 train.py --device cuda ...   # DDP: one process per GPU (gloo on CPU)
"""
import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import evaluate
import importance as imp
import lora
from model import ModelConfig, SpeechLLM, load_checkpoint, save_checkpoint

METHODS = ["frozen", "full", "layer_lr", "lora", "lora_layer_lr"]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("Run")
    g.add_argument("--out", default="runs/default", help="run directory (data, checkpoints, results.json)")
    g.add_argument("--seed", type=int, default=0, help="training seed (the synthetic world uses --data-seed)")
    g.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (under torchrun: each rank its own cuda:LOCAL_RANK)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast dtype of forward passes; auto: bf16 on CUDA, fp32 on CPU (weights stay fp32)")
    g.add_argument("--seeds", default="", help="comma list: repeat the comparison per seed (OUT/seed<N>), report mean ± sd")
    g.add_argument("--resume", action="store_true", help="continue an interrupted stage from its last checkpoint")
    g.add_argument("--reanalyse", action="store_true", help="redo evaluation + importance analysis from the checkpoints")
    g.add_argument("--force", action="store_true", help="--out holds a run with other settings: delete it, start over")
    g.add_argument("--init-from", default="",
                   help="a finished run's OUT: start from its pretrain + align checkpoints (fine-tuning ablations)")
    g = p.add_argument_group("Data")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic world and its speech")
    g.add_argument("--tts", default="formant", choices=["formant", "espeak"], help="speech synthesiser")
    g.add_argument("--n-entities", type=int, default=data.N_ENTITIES, help="entities in the world (half heard in training)")
    g.add_argument("--data-dir", default=None, help="where the synthetic data is built/cached (default OUT/data)")
    g.add_argument("--manifest", default=None, help="your own JSONL manifest instead of the synthetic world (README)")
    g = p.add_argument_group("Model")
    g.add_argument("--n-layers", type=int, default=ModelConfig.n_layers, help="LLM decoder layers")
    g.add_argument("--d-llm", type=int, default=ModelConfig.d_llm, help="LLM hidden size")
    g.add_argument("--llm", default="", help="a pretrained causal LM (local dir, hub id or .gguf): skips pretrain")
    g.add_argument("--encoder", default="", help="a pretrained Whisper model (dir or hub id): encoder kept frozen")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute LLM activations in backward")
    g = p.add_argument_group("Optimization (AdamW, linear warmup + cosine decay to 10%)")
    g.add_argument("--batch-size", type=int, default=32, help="sequences per micro-batch and process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--pretrain-steps", type=int, default=1000, help="text LM steps for the tiny LLM")
    g.add_argument("--pretrain-lr", type=float, default=3e-3, help="peak LR of pretraining")
    g.add_argument("--align-steps", type=int, default=1000, help="encoder + adaptor steps, LLM frozen")
    g.add_argument("--align-lr", type=float, default=3e-3, help="peak LR of alignment")
    g.add_argument("--align-ctc", type=float, default=1.0, help="weight of the auxiliary CTC loss in align (0: off)")
    g.add_argument("--compress-steps", type=int, default=400,
                   help="align phase 2, at a third of --align-lr: CTC compression on (0: never; needs --align-ctc > 0)")
    g.add_argument("--steps", type=int, default=300, help="speech fine-tuning steps, identical for every method")
    g.add_argument("--ft-ctc", type=float, default=1.0,
                   help="weight of the CTC loss in fine-tuning, when CTC compression is on (README; 0: answer loss only)")
    g.add_argument("--lr", type=float, default=3e-4, help="peak LR of speech fine-tuning (full, layer_lr)")
    g.add_argument("--lora-lr", type=float, default=6e-4, help="peak LR of the LoRA methods (see README)")
    g.add_argument("--warmup", type=float, default=0.05, help="warmup, as a fraction of the stage's steps")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    g.add_argument("--log-every", type=int, default=100, help="steps between log lines")
    g = p.add_argument_group("Fine-tuning methods")
    g.add_argument("--method", default=",".join(METHODS), help=f"comma list of {METHODS}")
    g.add_argument("--lora-r", type=int, default=8, help="LoRA rank r (the paper: 8 for 1B, 16 for 8B)")
    g.add_argument("--lora-ranks", default="", help="comma list: also run LoRA at these ranks, alpha = 2r (Table 3)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2r, as the paper)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA branch input")
    g.add_argument("--lora-targets", default=",".join(lora.TARGETS), help="comma list of Linear names to adapt")
    g.add_argument("--lam", type=float, default=0.4, help="λ of Eq. 3: the most text-important layer trains at 1-λ")
    g = p.add_argument_group("Importance analysis")
    g.add_argument("--calib-frac", type=float, default=1 / 30, help="share of the spoken-QA training rows used for importance")
    g.add_argument("--calib-min", type=int, default=128, help="... but at least this many rows (README: noise floor)")
    g.add_argument("--importance-kind", default="taylor", choices=list(imp.KINDS), help="importance estimator")
    g.add_argument("--calib-draw", type=int, default=0,
                   help="K: the K-th disjoint pair of calibration sets of one shuffle (analysis only: --reanalyse)")
    args = p.parse_args(argv)
    if args.lora_r < 1:
        p.error(f"--lora-r: must be >= 1, got {args.lora_r}")
    if not 0 < args.calib_frac <= 1:
        p.error(f"--calib-frac: must be in (0, 1], got {args.calib_frac}")
    if args.calib_min < 1:
        p.error(f"--calib-min: must be >= 1, got {args.calib_min}")
    if args.calib_draw < 0:
        p.error(f"--calib-draw: must be >= 0, got {args.calib_draw}")
    if not 0 <= args.lam <= 1:
        p.error(f"--lam: must be in [0, 1], got {args.lam}")
    args.lora_alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_r
    args.rank, args.world, args.master = 0, 1, True  # one process; setup_ddp() changes these under torchrun
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    args.methods = [m for m in args.method.split(",") if m]
    for m in args.methods:
        if m not in METHODS and not re.fullmatch(r"lora_r\d+", m):
            p.error(f"--method: unknown method '{m}' (choose from {', '.join(METHODS)})")
    try:
        ranks = [int(r) for r in args.lora_ranks.split(",") if r]
        args.seed_list = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        p.error("--lora-ranks / --seeds: comma-separated integers expected")
    if any(r < 1 for r in ranks):
        p.error(f"--lora-ranks: ranks must be >= 1, got {args.lora_ranks}")
    args.methods += [f"lora_r{r}" for r in ranks]  # Table 3: LoRA at rank r, alpha = 2r
    return args


def get_lr(it, total, warmup):
    """LR multiplier at step `it`: linear warmup, then cosine decay to 10% of the peak."""
    if it < warmup:
        return (it + 1) / warmup
    progress = (it - warmup) / max(1, total - warmup)
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


def setup_ddp(args):
    """nanoGPT-style: under `torchrun --nproc_per_node N`, RANK / LOCAL_RANK / WORLD_SIZE are set and every
    process joins one group (NCCL on GPUs, gloo on CPU). Every rank runs the same program on its shard of each
    batch; only rank 0 writes files and prints."""
    args.rank, args.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    args.master = args.rank == 0
    if args.world > 1 and not dist.is_initialized():
        if args.device.startswith("cuda"):
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    if not args.master:
        sys.stdout = open(os.devnull, "w")  # rank 0 prints for everyone


def barrier(args):
    """Wait until rank 0 has written what the other ranks read next (a no-op in a single process)."""
    if args.world > 1:
        dist.barrier()


def autocast(args):
    """Mixed precision: forward passes in bf16/fp16 where safe, weights and optimizer state in fp32."""
    if args.dtype == "fp32":
        return nullcontext()
    return torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float16)


def train(model, groups, rows, make_batch, steps, args, name, ctc_weight=0.0):
    """One training loop for every stage. groups: AdamW param groups, each with its own `initial_lr`.
    A step's global batch is batch_size x grad_accum x world rows; this rank takes its grad_accum micro-batches."""
    # fused: one kernel updates every parameter (CPU and CUDA); each group keeps its own `initial_lr`
    opt = torch.optim.AdamW(groups, weight_decay=args.weight_decay, betas=(0.9, 0.95), fused=True)
    params = [p for g in groups for p in g["params"]]
    B, A, W = args.batch_size, args.grad_accum, args.world
    # DDP averages the gradients over ranks during backward (and broadcasts rank 0's weights at the start)
    cuda = args.device.startswith("cuda")
    fwd = DDP(model, device_ids=[torch.device(args.device).index] if cuda else None) if W > 1 else model.loss
    # fp16 gradients underflow without loss scaling; bf16 and fp32 need none (the scaler is then a no-op)
    scaler = torch.amp.GradScaler(args.device.split(":")[0], enabled=args.dtype == "fp16")
    partial, start = os.path.join(args.out, f"{name}.partial.pt"), 0
    if args.resume and os.path.exists(partial):
        ck = load_checkpoint(partial)
        model.load_state_dict(ck["model"], strict=False)
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"])  # dropout draws continue exactly (batches are a function of step)
        start = ck["step"]
        print(f"{name}: resumed at step {start}")
    warmup = max(1, int(args.warmup * steps))
    model.train()
    t0, losses = time.time(), []
    for step in (bar := tqdm(range(start, steps), desc=name, leave=False, disable=None if args.master else True)):
        lrm = get_lr(step, steps, warmup)
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * lrm
        glob = batch_rows(rows, B * A * W, step, args.seed)
        micro = [make_batch(glob[(m * W + args.rank) * B:(m * W + args.rank + 1) * B]) for m in range(A)]
        # the summed cross-entropy is divided by the answer tokens of the WHOLE step (all micro-batches, all
        # ranks; x W because DDP averages over ranks): the gradient is then exactly that of one big batch,
        # however the answer lengths fall. (A mean per micro-batch would weight short answers up.)
        n_tok = torch.tensor(float(sum(len(a) for b in micro for a in b["answers"])), device=args.device)
        if W > 1:
            dist.all_reduce(n_tok)
        total = 0.0
        for m, batch in enumerate(micro):
            with fwd.no_sync() if W > 1 and m < A - 1 else nullcontext():  # all-reduce on the last micro-batch only
                with autocast(args):
                    loss = fwd(batch, n_tokens=n_tok / W, ctc_weight=ctc_weight / A)  # CTC: a mean per micro-batch
                scaler.scale(loss).backward()
            total += loss.detach()
        if W > 1:
            dist.all_reduce(total)
            total /= W
        if not torch.isfinite(total):  # all ranks see the same reduced loss, so all stop together
            raise SystemExit(f"{name}: loss is {total.item()} at step {step}; stopped (last good checkpoint kept)")
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(params, args.clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(total.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            ms = 1000 * (time.time() - t0) / (step + 1 - start)
            tqdm.write(f"{name} step {step + 1}/{steps} | loss {losses[-1]:.4f} | "
                       f"lr {opt.param_groups[0]['lr']:.2e} | norm {norm:.2f} | {ms:.0f} ms")
            if args.master:
                save_checkpoint(partial, {"model": trainable_state(model), "optimizer": opt.state_dict(),
                                          "step": step + 1, "rng": torch.get_rng_state()})
    if args.master and os.path.exists(partial):
        os.remove(partial)
    return losses


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


def setup_method(model, method, args, scales):
    """Freeze/wrap the model for a fine-tuning method; return its AdamW param groups, each with `initial_lr`.
    The encoder stays frozen, the adaptor always trains at the base LR (PAPER.md "Architecture")."""
    if method.startswith("lora"):
        r, alpha = args.lora_r, args.lora_alpha
        if method.startswith("lora_r"):  # rank ablation: lora_r16 = rank 16, alpha 32
            r = int(method[len("lora_r"):]); alpha = 2.0 * r
        lora.inject_lora(model.llm, args.lora_targets.split(","), r, alpha, args.lora_dropout)
        lora.mark_only_lora_as_trainable(model, also=("adaptor.",))
        base_lr = args.lora_lr
    else:
        set_trainable(model, ["adaptor."] + (["llm."] if method != "frozen" else []))
        base_lr = args.lr
    if not model.cfg.ctc_compress:  # the CTC blank is then never used: frozen, or DDP would wait for its gradient
        model.adaptor.blank.requires_grad_(False)
    if method.endswith("layer_lr"):  # Eq. (3): one group per LLM layer; embeddings, head, adaptor at base LR
        groups = imp.layer_param_groups(model.named_parameters(), scales, base_lr)
        print(imp.format_lr_table(groups))
        return groups
    return [{"params": [p for p in model.parameters() if p.requires_grad], "initial_lr": base_lr}]


def analyse(model, calib, make_text, make_speech, args, table1_rows=None):
    """Textual importance (transcripts typed) and speech importance (audio) on the same calibration samples
    (make_speech=None: textual only). table1_rows {kind: {subset: rows}}: the Table 1 check on each subset,
    perplexity of its answers after zeroing 3% of the weights by that kind's importance."""
    out = {}
    for kind, make in (("text", make_text), ("speech", make_speech)):
        if make is None:
            continue
        # under DDP each rank takes every world-th batch; the gradient sums are all-reduced (same result)
        batches = [make(calib[i:i + args.batch_size]) for i in range(0, len(calib), args.batch_size)]
        scores = imp.estimate_importance(model, batches[args.rank::args.world], args.importance_kind,
                                         all_reduce=args.world > 1)
        out[kind] = scores
        for subset, rows in (table1_rows or {}).get(kind, {}).items():
            if rows:
                ppl = lambda: evaluate.perplexity(model, rows, make)
                t1 = imp.table1(model, scores, ppl, frac=0.03, seed=args.seed)
                ratios = {f"{k}_ratio": t1[k] / t1["baseline"] for k in ("top", "bottom", "random")}
                out[f"table1_{kind}_{subset}"] = {**{f"{k}_ppl": v for k, v in t1.items()}, "n_rows": len(rows), **ratios}
    return out


def main(argv=None):
    args = get_args(argv)
    if args.seed_list:
        return run_seeds(args, argv)
    setup_ddp(args)
    torch.manual_seed(args.seed)
    init_results = check_init_from(args) if args.init_from else None  # refused before anything is written
    if args.master:
        check_out_dir(args)
    barrier(args)
    res_path = os.path.join(args.out, "results.json")
    results = json.load(open(res_path)) if os.path.exists(res_path) else {"methods": {}, "timing_s": {}}
    save_results = lambda: save_json(res_path, results) if args.master else None
    timing = results["timing_s"]
    if results["methods"] and results.get("calib_draw", 0) != args.calib_draw and not args.reanalyse:
        raise SystemExit(f"--calib-draw {args.calib_draw}: {res_path} was analysed with draw "
                         f"{results.get('calib_draw', 0)}; add --reanalyse to redo the analysis with this one")

    if args.init_from:  # another run's pretrained LLM and aligned speech side: only fine-tuning left to do
        init_from(args, init_results, results)

    # data ---------------------------------------------------------------------------------------
    t = time.time()
    data_dir = args.data_dir or os.path.join(args.out, "data")
    if args.master and not args.manifest:
        data.build(data_dir, args.data_seed, args.tts, args.n_entities)
    if args.master and args.manifest and not args.llm and not os.path.exists(os.path.join(data_dir, "tokenizer.model")):
        os.makedirs(data_dir, exist_ok=True)  # your own text, your own tokenizer for the tiny LLM
        pre = data.read_manifest(args.manifest)
        data.train_tokenizer([r[k] for r in pre if r["split"] == "pretrain" for k in ("question", "answer") if r[k]],
                             os.path.join(data_dir, "tokenizer"))
    barrier(args)
    rows = data.read_manifest(args.manifest or os.path.join(data_dir, "manifest.jsonl"))
    tok = data.HFTokenizer(args.llm) if args.llm else data.Tokenizer(os.path.join(data_dir, "tokenizer.model"))
    n_mels = ModelConfig.n_mels
    if args.encoder:  # a real Whisper: its mel bins (80, or 128 for large-v3)
        from transformers import WhisperConfig
        n_mels = WhisperConfig.from_pretrained(args.encoder).num_mel_bins
    features = data.load_features(rows, n_mels)
    split = lambda s: [r for r in rows if r["split"] == s]
    timing.setdefault("data", round(time.time() - t, 1))
    print(f"data: {len(rows)} rows, {len(features)} utterances, vocab {tok.vocab_size} ({time.time() - t:.1f}s)")
    # calibration set: --calib-frac of the spoken-QA training rows, as the paper's training set is all spoken QA
    # (our ASR rows only help align a from-scratch encoder), but at least --calib-min rows. The paper's 1/30 is
    # thousands of dialogues; ours would be 26 rows, whose mean gradient is mostly noise. A second, disjoint
    # set of the same size measures that noise: the shift metrics between the ORIGINAL model on the two sets.
    # --calib-draw K takes the K-th disjoint pair of sets from the same shuffle (to see how much the draw matters).
    train_rows = split("speech_train")
    pool = [r for r in train_rows if r["task"] == "qa"] or train_rows
    n_calib = min(len(pool), max(args.calib_min, round(args.calib_frac * len(pool))))
    first = 2 * args.calib_draw * n_calib
    if first + n_calib > len(pool):
        raise SystemExit(f"--calib-draw {args.calib_draw}: needs {first + n_calib} spoken-QA training rows "
                         f"({n_calib} per set), the data has {len(pool)}")
    order = random.Random(args.data_seed).sample(range(len(pool)), len(pool))
    calib = [pool[i] for i in order[first:first + n_calib]]
    calib2 = [pool[i] for i in order[first + n_calib:first + 2 * n_calib]]
    results["calib_draw"] = args.calib_draw
    if args.reanalyse:  # keep the checkpoints, recompute everything measured from them (read after barriers)
        results["methods"] = {}
        for f in ("importance.json", "importance_original.pt", "importance_original_2.pt"):
            if args.master and os.path.exists(os.path.join(args.out, f)):
                os.remove(os.path.join(args.out, f))

    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layers=args.n_layers, d_llm=args.d_llm, llm=args.llm,
                      encoder=args.encoder, n_mels=n_mels,
                      ctc_compress=args.compress_steps > 0 and args.align_ctc > 0)
    def base_model():
        """Initial (or pretrained) weights, then what the finished stages trained: their checkpoints hold only that."""
        torch.manual_seed(args.seed)
        m = SpeechLLM(cfg).to(args.device)
        for stage in ("pretrain", "align"):
            if os.path.exists(os.path.join(args.out, f"{stage}.pt")):
                m.load_state_dict(load_stage(os.path.join(args.out, f"{stage}.pt"), cfg), strict=False)
        if args.grad_checkpointing:
            m.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return m
    model = base_model()
    text_batch = lambda rs: data.make_batch(rs, tok, speech=False)
    speech_batch = lambda rs: data.make_batch(rs, tok, speech=True, features=features)

    # pretrain: the tiny LLM learns the whole world from text ------------------------------------
    ck = os.path.join(args.out, "pretrain.pt")
    if args.llm and "pretrain" not in results:  # a pretrained LLM: nothing to pretrain, measure where it starts
        results["pretrain"] = {"t2t_acc": evaluate.accuracy(model, split("test"), text_batch, tok)[0]}
    elif not os.path.exists(ck):
        t = time.time()
        set_trainable(model, ["llm."])
        print(f"pretrain: {count(model)}")
        losses = train(model, [{"params": list(model.llm.parameters()), "initial_lr": args.pretrain_lr}],
                       split("pretrain"), text_batch, args.pretrain_steps, args, "pretrain")
        results.setdefault("train_loss", {})["pretrain"] = loss_summary(losses)
        if args.master:
            save_checkpoint(ck, {"config": vars(cfg), "model": trainable_state(model)})  # the LLM
        timing["pretrain"] = round(time.time() - t, 1)
        with autocast(args):
            results["pretrain"] = {"t2t_acc": evaluate.accuracy(model, split("test"), text_batch, tok)[0]}
        save_results()
    print(f"pretrained LLM: T2T {results['pretrain']['t2t_acc']:.3f}")

    # align: encoder + adaptor, LLM frozen --------------------------------------------------------
    ck = os.path.join(args.out, "align.pt")
    if not os.path.exists(ck):
        t = time.time()
        set_trainable(model, ["adaptor."] + ([] if args.encoder else ["encoder."]))  # a real Whisper stays frozen
        model.adaptor.blank.requires_grad_(args.align_ctc > 0)  # the CTC blank: trained where CTC is
        print(f"align: {count(model)}")
        params = [p for p in model.parameters() if p.requires_grad]
        # phase 1: CTC + answer loss on the raw 10 Hz frames (CTC compression with a still-random CTC head would
        # merge frames at random, and training stalled: loss 8.5 after 1000 steps); saved, so phase 2 can resume
        raw, compress = os.path.join(args.out, "align_raw.pt"), cfg.ctc_compress
        if os.path.exists(raw):
            model.load_state_dict(load_stage(raw, cfg), strict=False)
        else:
            cfg.ctc_compress = False
            losses = train(model, [{"params": params, "initial_lr": args.align_lr}], split("speech_train"),
                           speech_batch, args.align_steps, args, "align", args.align_ctc)
            cfg.ctc_compress = compress
            results.setdefault("train_loss", {})["align"] = loss_summary(losses)
            if args.master:
                save_checkpoint(raw, {"config": vars(cfg), "model": trainable_state(model)})
        if compress:  # phase 2: the LLM reads the compressed soft token embeddings it will read from now on
            losses = train(model, [{"params": params, "initial_lr": args.align_lr / 3}], split("speech_train"),
                           speech_batch, args.compress_steps, args, "align_compress", args.align_ctc)
            results.setdefault("train_loss", {})["align_compress"] = loss_summary(losses)
        if args.master:
            save_checkpoint(ck, {"config": vars(cfg), "model": trainable_state(model)})  # encoder + adaptor
        timing["align"] = round(time.time() - t, 1)
        with autocast(args):
            results["no_ft"] = evaluate.evaluate_all(model, rows, tok, text_batch, speech_batch)
        save_results()
    barrier(args)  # align.pt is written
    model = base_model()
    print(f"no fine-tuning: {fmt(results['no_ft'])}")

    # from here on the encoder is frozen: compute its outputs once
    encoded = model.precompute_encoder(features)
    ft_batch = lambda rs: data.make_batch(rs, tok, speech=True, features=encoded, encoded=True)

    # importance of the original model: textual (transcripts typed) and speech, + the Table 1 check -------
    imp_path, orig_path = os.path.join(args.out, "importance.json"), os.path.join(args.out, "importance_original.pt")
    orig2_path = os.path.join(args.out, "importance_original_2.pt")  # the original on the second calibration set
    report = json.load(open(imp_path)) if os.path.exists(imp_path) else {"distribution": {}, "top5_share": {}}
    if not os.path.exists(orig_path):
        t = time.time()
        # Table 1 on all held-out test answers, and on those the model answers right from that input: where it is
        # wrong (S2T ~50%) it is often confidently wrong, and any perturbation that flattens it lowers perplexity
        test, t1_rows = split("test"), {}
        with autocast(args):
            for kind, make in (("text", text_batch), ("speech", ft_batch)):
                preds = evaluate.accuracy(model, test, make, tok)[2]
                right = [r for r, p in zip(test, preds) if evaluate.contains(r["answer"], p)]
                t1_rows[kind] = {"all": test, "answered": right}
            an = analyse(model, calib, text_batch, ft_batch, args, t1_rows)
        for kind in ("text", "speech"):
            report["distribution"][f"original_{kind}"] = imp.layer_distribution(an[kind])
            report["top5_share"][f"original_{kind}"] = imp.top_share_by_layer(an[kind], 0.05)
            report[f"table1_{kind}"] = {k: an.get(f"table1_{kind}_{k}") for k in ("all", "answered")}
        report["concentration"] = {"original_text": imp.concentration(an["text"])}  # Fig. 1: rows/cols
        if len(calib2) == n_calib:  # the noise floor of importance_js / _spearman (none if the pool is too small)
            with autocast(args):
                again = analyse(model, calib2, text_batch, None, args)["text"]
            report["noise_floor"] = imp.shift_metrics(an["text"], again)
            results["importance_noise_js"] = report["noise_floor"]["js"]
            results["importance_noise_total_ratio"] = report["noise_floor"]["total_ratio"]
            if args.master:
                torch.save(again, orig2_path)
        t1 = {kind: {**an[f"table1_{kind}_all"], "answered": an.get(f"table1_{kind}_answered", {})}
              for kind in ("text", "speech")}
        results["importance_validation"] = {**t1["text"], "speech": t1["speech"]}
        if args.master:
            torch.save(an["text"], orig_path)
            save_json(imp_path, report)
        timing["importance_original"] = round(time.time() - t, 1)
        save_results()
    barrier(args)  # importance_original.pt is written
    orig = torch.load(orig_path, weights_only=True)
    orig2 = torch.load(orig2_path, weights_only=True) if os.path.exists(orig2_path) else None
    scales = imp.layer_lr_scale(imp.aggregate(orig)["layer"], args.lam)  # Eq. (3), from the ORIGINAL LLM

    # finetune: every method from the same checkpoint, same data, same steps -------------------------
    for method in args.methods:
        if method in results["methods"]:
            continue
        t = time.time()
        model = base_model()
        w0 = {k: v.detach().to("cpu", copy=True) for k, v in imp.importance_params(model).items()}
        groups = setup_method(model, method, args, scales)
        print(f"finetune {method}: {count(model)}")
        ck = os.path.join(args.out, f"ft_{method}.pt")
        if os.path.exists(ck):  # finished earlier (e.g. --reanalyse): reload its trainable parts
            state = load_checkpoint(ck)
            model.load_state_dict(state["model"], strict=False)
            losses = state["losses"]
        else:
            # with CTC compression on, its CTC loss stays on too (README), identical for every method
            losses = train(model, groups, train_rows, ft_batch, args.steps, args, f"ft_{method}",
                           args.ft_ctc if cfg.ctc_compress else 0.0)
            if args.master:  # trainable parts only: adaptor (+ LoRA) for LoRA
                save_checkpoint(ck, {"config": vars(cfg), "method": method, "model": trainable_state(model),
                                     "losses": losses})
            timing[f"ft_{method}"] = round(time.time() - t, 1)
        with autocast(args):
            m = evaluate.evaluate_all(model, rows, tok, text_batch, ft_batch)
        m["train_loss"] = loss_summary(losses)
        lora.merge_lora(model)  # importance of the weights the model actually uses, W + BA
        with autocast(args):  # + the same shift on the second calibration set: does the order of methods hold?
            an = analyse(model, calib, text_batch, None, args)
            an2 = analyse(model, calib2, text_batch, None, args)["text"] if orig2 is not None else None
        shift = imp.shift_metrics(orig, an["text"])
        m.update(importance_js=shift["js"], importance_spearman=shift["spearman"], importance_shift=shift)
        if an2 is not None:
            m["importance_shift_2"] = imp.shift_metrics(orig2, an2)
        report["distribution"][method] = imp.layer_distribution(an["text"])
        report["top5_share"][method] = imp.top_share_by_layer(an["text"], 0.05)
        dw = {k: v.detach().cpu() - w0[k] for k, v in imp.importance_params(model).items()}  # ΔW (LoRA: BA)
        if any(d.any() for d in dw.values()):  # Fig. 4: does ΔW gather on a few rows/columns too?
            report.setdefault("concentration", {})[f"{method}_delta_w"] = imp.concentration(dw)
            m["delta_w_concentration"] = report["concentration"][f"{method}_delta_w"]["all"]["ratio"]
        results["methods"][method] = m
        print(f"{method}: {fmt(m)}")
        if args.master:
            save_json(imp_path, report)
        save_results()

    dists = {k: v for k, v in report["distribution"].items() if k != "original_speech"}
    print("\nLayer-wise textual importance (Fig. 2 analogue):\n" + imp.bar_chart(dists))
    png = imp.plot_distributions(dists, os.path.join(args.out, "importance.png")) if args.master else None
    if png:
        print(f"figure: {png}")
    conc = {k: v["all"]["ratio"] for k, v in report.get("concentration", {}).items()}
    print("top-5% entries on the fullest 5% of rows/cols, x an even spread (Fig. 1/4; 1 = no structure): "
          + ", ".join(f"{k} {v:.1f}" for k, v in conc.items()))
    print(evaluate.format_table(results))
    print(evaluate.format_table1(results))
    return results


# the settings pretrain + align depend on (--init-from needs the same values in the run it starts from) ...
STAGE_KEYS = ["seed", "data_seed", "tts", "n_entities", "manifest", "llm", "encoder", "n_layers", "d_llm", "batch_size",
              "grad_accum", "pretrain_steps", "pretrain_lr", "align_steps", "align_lr", "align_ctc", "compress_steps",
              "warmup", "weight_decay", "clip"]
# ... and all the settings a run directory is tied to: another value means another run (adding --method values does not)
RUN_KEYS = STAGE_KEYS + ["init_from", "steps", "ft_ctc", "lr", "lora_lr", "lora_r", "lora_alpha", "lora_dropout",
                         "lora_targets", "lam", "calib_frac", "calib_min", "importance_kind"]


def check_out_dir(args):
    """Refuse to mix two runs in one --out: its run.json must match these settings, unless --force."""
    os.makedirs(args.out, exist_ok=True)
    path, mine = os.path.join(args.out, "run.json"), {k: getattr(args, k) for k in RUN_KEYS}
    if os.path.exists(path):
        with open(path) as f:
            theirs = json.load(f)
        diff = [f"{k}={theirs[k]!r}->{v!r}" for k, v in mine.items() if k in theirs and theirs[k] != v]
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
    """--init-from RUN: RUN must be finished and made with our pretrain + align settings; -> its results.json."""
    src = args.init_from
    if not all(os.path.exists(os.path.join(src, f)) for f in ("run.json", "results.json", "align.pt")):
        raise SystemExit(f"--init-from {src}: not a finished run (needs run.json, results.json and align.pt)")
    with open(os.path.join(src, "run.json")) as f:
        theirs = json.load(f)
    diff = [f"{k}={theirs.get(k)!r}" for k in STAGE_KEYS if theirs.get(k) != getattr(args, k)]
    if diff:
        raise SystemExit(f"--init-from {src}: its pretrain/align settings differ ({', '.join(diff[:4])})")
    with open(os.path.join(src, "results.json")) as f:
        return json.load(f)


def init_from(args, theirs, results):
    """Copy RUN's pretrain + align checkpoints into --out, and the results they gave into ours."""
    for k in ("pretrain", "no_ft"):
        results.setdefault(k, theirs[k])
    results.setdefault("train_loss", {}).update({k: v for k, v in theirs.get("train_loss", {}).items()
                                                 if k in ("pretrain", "align", "align_compress")})
    results["init_from"] = args.init_from
    for f in ("pretrain.pt", "align_raw.pt", "align.pt"):
        src, dst = os.path.join(args.init_from, f), os.path.join(args.out, f)
        if args.master and os.path.exists(src) and not os.path.exists(dst):
            shutil.copyfile(src, dst)
    barrier(args)


def load_stage(path, cfg):
    """A stage checkpoint, refused with a one-line error when it was made with another model config."""
    ck = load_checkpoint(path)
    if ck["config"] != vars(cfg):
        diff = [k for k in ck["config"] if ck["config"][k] != vars(cfg).get(k)]
        raise SystemExit(f"{path}: made with a different model config ({', '.join(diff)}); use --force or another --out")
    return ck["model"]


def run_seeds(args, argv):
    """--seeds 0,1,2: the whole pipeline once per seed in OUT/seed<N> (one shared synthetic world), then
    mean and sd of every metric over seeds in OUT/results.json (each seed's results kept under `seeds`)."""
    argv = list(argv if argv is not None else sys.argv[1:])
    i = argv.index("--seeds") if "--seeds" in argv else None
    base = [a for j, a in enumerate(argv) if i is None or j not in (i, i + 1)]
    base = [a for a in base if not a.startswith("--seeds=")]
    per_seed = {}
    for s in args.seed_list:
        print(f"\n=== seed {s} ===")
        init = ["--init-from", os.path.join(args.init_from, f"seed{s}")] if args.init_from else []
        per_seed[str(s)] = main(base + init + ["--seed", str(s), "--out", os.path.join(args.out, f"seed{s}"),
                                              "--data-dir", args.data_dir or os.path.join(args.out, "data")])
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
          + "\n" + evaluate.format_table1(out["mean"], out["sd"]))
    return out


def loss_summary(losses):
    """Mean training loss over the first and the last 10% of a stage's steps."""
    n = max(1, len(losses) // 10)
    return {"first": sum(losses[:n]) / n, "last": sum(losses[-n:]) / n} if losses else {}


def fmt(metrics):
    return " | ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))


def save_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # bad data (manifest line, audio file): the message names the file; no traceback
        raise SystemExit(f"error: {e}")
