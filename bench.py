"""
bench.py - speed and memory of the pieces the experiments lean on, each next to a reference, in one run.

arXiv 2509.23755 reimplementation (Whisper encoder -> adaptor -> Llama; LoRA; Taylor importance). Each
comparison runs both sides in this process, interleaved (A B A B ...) after a warm-up; medians are reported.

  measurement              ours / reference                                                  target
  lora_vs_peft_step        LoRA training step (fwd + bwd + AdamW) / peft's, same Llama       goal <= 1.0, must <= 1.10
                           weights, batch, r=8, alpha=16, targets q,k,v,o,gate,up,down
  lora_vs_full_peak_mem    peak memory added by a LoRA step / by a full fine-tuning step     well below 1
  importance_vs_fwd_bwd    estimate_importance(kind="taylor") over N batches / plain         goal <= 1.15, must <= 1.5
                           forward+backward over the same N batches
  sample_vs_fwd_bwd        estimate_importance(kind="taylor_sample") over the same rows one   goal <= 1.3, must <= 2
                           a batch (train.py's default) / plain forward+backward of those;
                           sample_vs_taylor: what per-sample costs over the batched estimate  (reported)
  decode_vs_hf_generate    tokens/s of SpeechLLM.generate / of llm.generate (greedy)         higher is better
  train_step_gflops        achieved GFLOP/s of a full-FT step, next to matmul_peak_gflops    (MFU-style, reported)
  real_*                   with --real: the first three on SmolLM2-135M-Instruct (train.py --real's LLM), batch 8x64

    python bench.py                 # ~1 min on a 2-core CPU, prints a table, writes bench.json
    python bench.py --quick         # seconds, tiny sizes (what the test runs); no timing is meaningful then
    python bench.py --real          # ~5 min: adds real_* entries to bench.json (needs train.py --real's packages)
    python bench.py --device cuda
    OMP_NUM_THREADS=1 python bench.py   # on a CPU shared with a training job: two processes each running
                                        # 2 OpenMP threads on 2 cores slowed a LoRA step ~150x (2 s vs 12 ms)
The CUDA path (torch.cuda.synchronize, max_memory_allocated) is written but was not run here.
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import lora
from importance import estimate_importance
from model import ModelConfig, SpeechLLM


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats (tests; timings not meaningful)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--out", default="bench.json", help="where the results are written")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per side (default 7, --quick 2)")
    p.add_argument("--real", action="store_true", help="measure on SmolLM2-135M-Instruct, add real_* to --out")
    p.add_argument("--_mem", choices=["lora", "full"], help=argparse.SUPPRESS)  # child of the memory measurement
    return p.parse_args(argv)


def llama(d, n_layers, vocab, seed=0):
    """A Llama shaped like model.ModelConfig's (GQA, SwiGLU 3d), with a chosen width/depth/vocab."""
    torch.manual_seed(seed)
    heads = max(4, d // 64)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=3 * d,
                                        num_hidden_layers=n_layers, num_attention_heads=heads,
                                        num_key_value_heads=heads // 2, tie_word_embeddings=True))


def smollm2():
    """train.py --real's LLM: SmolLM2-135M-Instruct from its PyPI GGUF, dequantised to fp32 (one line if absent)."""
    from model import build_llm
    from train import real_model
    return build_llm(ModelConfig(llm=real_model("llm")))


def add_lora(m):
    lora.inject_lora(m, lora.TARGETS, r=8, alpha=16, dropout=0.0)
    lora.mark_only_lora_as_trainable(m)
    return m


def lm_step_fn(m, x):
    """One training step closure: plain next-token cross-entropy on the logits, backward, AdamW."""
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    def step():
        logits = m(input_ids=x).logits                                              # (B, T, V)
        F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def text_batches(n, B, prompt_len, answer_len, vocab=256, seed=0):
    """Text-only batches in data.make_batch's format, random tokens: "<s><user> q... <assistant>" -> "a... </s"."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(7, vocab, (k,), generator=g).tolist()  # ids < 7: pad/specials
    out = []
    for _ in range(n):
        lens = torch.randint(prompt_len // 2, prompt_len + 1, (B,), generator=g).tolist()
        out.append(dict(prompts=[[2, 4] + ids(k) + [5] for k in lens], answers=[ids(answer_len) + [3] for _ in lens],
                        speech_id=6, speech=None, encoded=False, transcripts=None, blank_id=0))
    return out


def median_ms(fns, repeats, warmup, sync):
    """{name: fn} -> {name: median ms}; the fns run interleaved, so drifting load hits every side alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    ms = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            ms[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in ms.items()}


def rss_mb(key):
    """VmRSS (now) or VmHWM (peak) of this process from /proc; elsewhere the peak from getrusage."""
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(key + ":")) / 1024
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def mem_child(args):
    """(in a fresh process) MB that two training steps add on top of the built model and its batch.
    CPU: peak resident memory (VmHWM, reset to the current RSS after construction) minus the RSS then.
    CUDA: max_memory_allocated minus memory_allocated after construction. Two steps, so that the second
    step's activations and grads meet the AdamW state created in the first."""
    dev = torch.device(args.device)
    d, n_layers, V, B, T = (256, 4, 4096, 4, 32) if args.quick else (512, 8, 8192, 8, 64)  # full: ~30M params
    m = (smollm2() if args.real else llama(d, n_layers, V)).to(dev)
    V = m.config.vocab_size
    m = add_lora(m) if args._mem == "lora" else m
    step = lm_step_fn(m, torch.randint(0, V, (B, T), device=dev))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        step(); step()
        torch.cuda.synchronize(dev)
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    else:
        base = rss_mb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # Linux: reset the peak (VmHWM) to the current RSS
        except OSError:
            base = rss_mb("VmHWM")  # no reset: count only how far the step pushes the peak past construction's
        step(); step()
        peak = rss_mb("VmHWM") - base
    print(json.dumps({"peak_mb": peak}))


def peak_mem_mb(args, kind):
    cmd = [sys.executable, os.path.abspath(__file__), "--_mem", kind, "--device", args.device]
    cmd += ["--quick"] * args.quick + ["--real"] * args.real
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def bench_lora_vs_peft(res, goals, dev, q, reps, warm, sync, base=None):
    """1. our LoRA vs peft's: same base weights (deepcopies), same batch, r, alpha, targets, AdamW."""
    d, n_layers, B, T = (128, 2, 4, 32) if q else (256, 8, 16, 64)
    if base is not None:  # --real: SmolLM2, batch 8 x 64
        d, n_layers, B, T = base.config.hidden_size, base.config.num_hidden_layers, 8, 64
    base = (llama(d, n_layers, 256) if base is None else base).to(dev)
    x = torch.randint(0, base.config.vocab_size, (B, T), device=dev)
    fns = {"ours": lm_step_fn(add_lora(copy.deepcopy(base)), x)}
    try:
        from peft import LoraConfig, get_peft_model
        cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(lora.TARGETS))
        fns["peft"] = lm_step_fn(get_peft_model(copy.deepcopy(base), cfg), x)
    except ImportError:
        print("lora step     | peft not installed: only ours is timed")
    ms = median_ms(fns, reps, warm, sync)
    res.update(lora_step_ms=ms["ours"], peft_step_ms=ms.get("peft"))
    res["lora_vs_peft_step"] = ms["ours"] / ms["peft"] if "peft" in ms else None
    goals["lora_vs_peft_step"] = "<= 1.0 (must <= 1.10)"
    print(f"lora step     | ours {ms['ours']:8.1f} ms | peft {ms.get('peft', float('nan')):8.1f} ms | "
          f"d {d}, {n_layers} layers, batch {B}x{T}")


def bench_memory(res, goals, args):
    """2. peak memory of a LoRA step vs a full fine-tuning step, each in a fresh process."""
    res["lora_peak_mb"], res["full_peak_mb"] = peak_mem_mb(args, "lora"), peak_mem_mb(args, "full")
    res["lora_vs_full_peak_mem"] = res["lora_peak_mb"] / res["full_peak_mb"]
    goals["lora_vs_full_peak_mem"] = "< 1 (lower is better)"
    print(f"peak memory   | lora {res['lora_peak_mb']:8.1f} MB | full {res['full_peak_mb']:8.1f} MB | "
          f"added by 2 training steps")


def bench_importance(res, goals, m, batches, reps, warm, sync, loss=None, what=None):
    """3. Taylor importance vs the forward+backward passes it is built on: by default the tiny SpeechLLM on text
    batches; loss: batch -> loss for another model (--real: a plain HF causal LM on token-id batches)."""
    toy, loss = loss is None, loss or m.loss
    def fwd_bwd(bs=batches):
        for b in bs:
            loss(b).backward()
        m.zero_grad(set_to_none=True)
    ms = median_ms({"fwd_bwd": fwd_bwd, "taylor": lambda: estimate_importance(m, batches, kind="taylor", loss_fn=loss)},
                   reps, warm, sync)
    res.update(importance_ms=ms["taylor"], fwd_bwd_ms=ms["fwd_bwd"], importance_vs_fwd_bwd=ms["taylor"] / ms["fwd_bwd"])
    goals["importance_vs_fwd_bwd"] = "<= 1.15 (must <= 1.5)"
    what = what or f"{len(batches)} batches of {len(batches[0]['prompts'])}"
    print(f"importance    | taylor {ms['taylor']:8.1f} ms | fwd+bwd {ms['fwd_bwd']:8.1f} ms | {what}")
    if not toy:  # --real's HF LM takes token-id batches: no rows to split
        return
    # per-sample Taylor (train.py's default on the toy): the same rows, one a batch; |g_i·θ| summed after each row
    rows = [{**b, "prompts": [p], "answers": [a]} for b in batches for p, a in zip(b["prompts"], b["answers"])]
    ms1 = median_ms({"fwd_bwd": lambda: fwd_bwd(rows), "sample": lambda: estimate_importance(m, rows, "taylor_sample")},
                    reps, warm, sync)
    res.update(sample_ms=ms1["sample"], sample_vs_fwd_bwd=ms1["sample"] / ms1["fwd_bwd"],
               sample_vs_taylor=ms1["sample"] / ms["taylor"])
    goals["sample_vs_fwd_bwd"] = "<= 1.3 (must <= 2)"
    print(f"importance    | per sample {ms1['sample']:8.1f} ms | fwd+bwd {ms1['fwd_bwd']:8.1f} ms | {len(rows)} rows, "
          f"one a batch; {ms1['sample'] / ms['taylor']:.1f}x the batched estimate")


def bench_decode(res, goals, m, dev, q, reps, warm, sync):
    """4. greedy decoding: ours (inputs_embeds + KV cache) vs HF generate, same LLM, same left-padded prompts."""
    B, M = (4, 8) if q else (32, 32)
    batch = text_batches(1, B, prompt_len=16, answer_len=0, seed=1)[0]
    L = max(len(p) for p in batch["prompts"])
    ids = torch.tensor([[0] * (L - len(p)) + p for p in batch["prompts"]], device=dev)
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in batch["prompts"]], device=dev)
    ours = lambda: m.generate(batch, max_new_tokens=M, eos_id=-1)  # -1 is never picked: always M tokens
    hf = lambda: m.llm.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=M,
                                min_new_tokens=M, pad_token_id=0)
    # same tokens? (rows where ours emits EOS=3 are skipped: min_new_tokens forbids it on HF's side)
    pairs = [(a, b) for a, b in zip(ours(), hf()[:, L:].tolist()) if 3 not in a]
    res["decode_same_tokens"] = sum(a == b for a, b in pairs) / max(1, len(pairs))
    ms = median_ms({"ours": ours, "hf": hf}, reps, warm, sync)
    res.update(decode_tok_s=B * M / ms["ours"] * 1e3, hf_generate_tok_s=B * M / ms["hf"] * 1e3)
    res["decode_vs_hf_generate"] = res["decode_tok_s"] / res["hf_generate_tok_s"]
    goals["decode_vs_hf_generate"] = ">= 1 (higher is better)"
    print(f"decode        | ours {res['decode_tok_s']:8.0f} tok/s | HF {res['hf_generate_tok_s']:8.0f} tok/s | "
          f"batch {B}, {M} new tokens, same tokens on {res['decode_same_tokens']:.0%} of rows")


def bench_flops(res, goals, m, batch, dev, q, reps, warm, sync):
    """5. achieved FLOP/s of a full fine-tuning step vs a large fp32 matmul on this machine."""
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    def train_step():
        m.loss(batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    ms_step = median_ms({"step": train_step}, reps, warm, sync)["step"]
    llm, (B, T) = m.llm, m.embed(batch, with_answer=True, left_pad=False)[1].shape  # padded length T
    N = sum(p.numel() for p in llm.model.layers.parameters()) + llm.lm_head.weight.numel()
    n_layers, d = llm.config.num_hidden_layers, llm.config.hidden_size
    # 6N per token: 2 FLOPs per weight forward + 4 backward (Kaplan et al. 2020), lm_head counted though tied;
    # attention QK^T and AV: 4·d·T per token per layer forward, x3 with backward -> 12·layers·d·T^2·B
    # (PaLM App. B; no causal halving). Padding counts: it is computed. Norms, softmax, AdamW are left out.
    flops = 6 * N * B * T + 12 * n_layers * d * T * T * B
    res["train_step_gflops"] = flops / ms_step / 1e6
    n = 1024 if q else 2048
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    res["matmul_peak_gflops"] = 2 * n**3 / median_ms({"mm": lambda: a @ b}, reps, warm, sync)["mm"] / 1e6
    res.update(train_step_ms=ms_step, mfu=res["train_step_gflops"] / res["matmul_peak_gflops"])
    goals["train_step_gflops"] = "(reported)"
    print(f"train step    | {ms_step:8.1f} ms | {res['train_step_gflops']:6.1f} GFLOP/s | matmul {n}^2 "
          f"{res['matmul_peak_gflops']:6.1f} GFLOP/s | {res['mfu']:.1%} of it")


def bench_real(args, dev, reps, warm, sync):
    """--real: LoRA vs peft, LoRA vs full memory, importance vs fwd+bwd on SmolLM2-135M; -> real_* entries."""
    res, goals = {}, {}
    base = smollm2()
    bench_lora_vs_peft(res, goals, dev, False, reps, warm, sync, base)
    bench_memory(res, goals, args)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, base.config.vocab_size, (8, 64), generator=g).to(dev) for _ in range(2)]
    bench_importance(res, goals, base, batches, reps, warm, sync, loss=lambda ids: base(input_ids=ids, labels=ids).loss,
                     what="2 batches of 8x64")
    return {f"real_{k}": v for k, v in res.items()}, {f"real_{k}": v for k, v in goals.items()}


def syncer(dev):
    return (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)


def print_goals(res, goals):
    w = max(24, *map(len, goals))
    print(f"\n{'measurement':<{w}} {'value':>9}  goal")
    for k, goal in goals.items():
        print(f"{k:<{w}} {res[k] if res[k] is not None else float('nan'):>9.3f}  {goal}")


def write_json(path, res):
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=2)
    os.replace(path + ".tmp", path)  # never a half-written bench.json


def main(argv=None):
    args = get_args(argv)
    if args._mem:
        return mem_child(args)
    if args.real:  # adds real_* to --out, keeping what is there
        t_start, dev = time.time(), torch.device(args.device)
        real, goals = bench_real(args, dev, args.repeats or 3, 1, syncer(dev))
        res = json.load(open(args.out)) if os.path.exists(args.out) else {}
        res.update(real, real_total_s=time.time() - t_start)
        print_goals(res, goals)
        write_json(args.out, res)
        return res
    t_start, q, dev = time.time(), args.quick, torch.device(args.device)
    sync = syncer(dev)
    reps, warm = args.repeats or (2 if q else 7), 1 if q else 2
    res = {"device": str(dev), "threads": torch.get_num_threads(), "quick": q, "torch": torch.__version__}
    goals = {}
    print(f"device {dev} | {torch.get_num_threads()} threads | torch {torch.__version__} | {reps} repeats, medians")
    bench_lora_vs_peft(res, goals, dev, q, reps, warm, sync)
    bench_memory(res, goals, args)
    torch.manual_seed(0)
    m = SpeechLLM(ModelConfig()).to(dev)  # the default's tiny speech LLM, text batches
    n_b, B = (2, 4) if q else (4, 16)
    batches = text_batches(n_b, B, prompt_len=24, answer_len=38)
    bench_importance(res, goals, m, batches, reps, warm, sync)
    bench_decode(res, goals, m, dev, q, reps, warm, sync)
    bench_flops(res, goals, m, batches[0], dev, q, reps, warm, sync)
    res["total_s"] = time.time() - t_start
    print_goals(res, goals)
    print(f"{'matmul_peak_gflops':<24} {res['matmul_peak_gflops']:>9.3f}  (this machine)")
    print(f"total {res['total_s']:.0f} s, written to {args.out}")
    write_json(args.out, res)
    return res


if __name__ == "__main__":
    main()
