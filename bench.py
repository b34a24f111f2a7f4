"""
bench.py - speed and memory of what the arXiv 2509.23755 code leans on, each beside a reference (interleaved, medians).

  measurement              ours / reference                                                  target
  lora_vs_peft_step        LoRA training step (fwd + bwd + AdamW) / peft's, same Llama       goal <= 1.0, must <= 1.10
                           weights, batch, r=8, alpha=16, targets q,k,v,o,gate,up,down
  lora_vs_full_peak_mem    peak memory added by a LoRA step / by a full fine-tuning step     well below 1
  importance_vs_fwd_bwd    estimate_importance(kind="taylor") over N batches / plain         goal <= 1.15, must <= 1.5
                           forward+backward over the same N batches
  sample_vs_fwd_bwd        kind="taylor_sample" over the same rows one a batch (train.py's   goal <= 1.3, must <= 2
                           default) / their fwd+bwd; sample_vs_taylor: its cost over the batched one (reported)
  decode_vs_hf_generate    tokens/s of SpeechLLM.generate / of llm.generate (greedy)         higher is better
  train_step_gflops        achieved GFLOP/s of a full-FT step, next to matmul_peak_gflops    (MFU-style, reported)
  real_*                   with --real: the first three on SmolLM2-135M-Instruct (train.py --real's LLM), batch 8x64
  cuda1b_*                 CUDA only: random Llama-3.2-1B shape (d 2048, 16 layers, 32/8 heads, FFN 8192, vocab 128256),
                           fp32 weights, bf16 autocast, batches 4x1024: lora_vs_peft_step, importance_vs_fwd_bwd (4
                           batches) as above; full_step_mfu = 6·N·tokens/s of a full-FT step / the GPU's bf16 peak

    python bench.py [--quick]       # ~1 min on a 2-core CPU, writes bench.json; --quick: seconds, timings meaningless
    python bench.py --real          # ~5 min: adds real_* to bench.json; --device cuda: adds cuda1b_* (~1 min, H200)
    OMP_NUM_THREADS=1 python bench.py   # on a CPU shared with another job (2 jobs x 2 threads on 2 cores: ~150x slower)
"""
import argparse, copy, json, os, statistics, subprocess, sys, time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import lora
from importance import estimate_importance
from model import ModelConfig, SpeechLLM

GOALS = dict(lora_vs_peft_step="<= 1.0 (must <= 1.10)", importance_vs_fwd_bwd="<= 1.15 (must <= 1.5)",
             sample_vs_fwd_bwd="<= 1.3 (must <= 2)", lora_vs_full_peak_mem="< 1", decode_vs_hf_generate=">= 1")
LLAMA_1B = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True)  # Llama-3.2-1B's shape
BF16_PEAK = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12}  # dense FLOP/s by device name

def llama(d, n_layers, vocab, seed=0):
    """A Llama shaped like model.ModelConfig's (GQA, SwiGLU 3d), with a chosen width/depth/vocab."""
    torch.manual_seed(seed)
    h = max(4, d // 64)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=3 * d, num_hidden_layers=n_layers,
                      num_attention_heads=h, num_key_value_heads=h // 2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)

def smollm2():
    """train.py --real's LLM: SmolLM2-135M-Instruct from its PyPI GGUF, dequantised to fp32 (one line if absent)."""
    import real  # lazily: only --real needs it
    from model import build_llm
    return build_llm(ModelConfig(llm=real.real_model("llm")))

def add_lora(m):
    lora.inject_lora(m, lora.TARGETS, r=8, alpha=16, dropout=0.0)
    lora.mark_only_lora_as_trainable(m)
    return m

def lm_loss(m, x, amp=nullcontext):
    """Plain next-token cross-entropy of a causal LM on token ids x (B, T), the forward under `amp`."""
    with amp():
        return F.cross_entropy(m(input_ids=x).logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())

def step_fn(m, loss):
    """One training step closure: loss() backward, AdamW on the trainable parameters."""
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    def step():
        loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step

def text_batches(n, B, prompt_len, answer_len, vocab=256, seed=0):
    """Text-only batches in data.make_batch's format, random tokens: "<s><user> q... <assistant>" -> "a... </s"."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(7, vocab, (k,), generator=g).tolist()  # ids < 7: pad/specials
    lens = [torch.randint(prompt_len // 2, prompt_len + 1, (B,), generator=g).tolist() for _ in range(n)]
    return [dict(prompts=[[2, 4] + ids(k) + [5] for k in ls], answers=[ids(answer_len) + [3] for _ in ls],
                 speech_id=6, speech=None, encoded=False, transcripts=None, blank_id=0) for ls in lens]

def median_ms(fns, repeats, warmup, sync):
    """{name: fn} -> {name: median ms}; the fns run interleaved, so drifting load hits every side alike."""
    ms = {k: [] for k in fns}
    for _ in range(warmup + repeats):
        for k, f in fns.items():
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            ms[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v[warmup:]) for k, v in ms.items()}

def matmul_flops(n, dtype, dev, tm):
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    return 2 * n**3 / tm({"mm": lambda: a @ b})["mm"] * 1e3

def bench_lora_vs_peft(base, x, tm, amp=nullcontext):
    """Our LoRA vs peft's: same base weights (deepcopies), batch x, r, alpha, targets, AdamW."""
    ours = add_lora(copy.deepcopy(base))
    fns = {"ours": step_fn(ours, lambda: lm_loss(ours, x, amp))}
    try:
        from peft import LoraConfig, get_peft_model
        theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=list(lora.TARGETS)))
        fns["peft"] = step_fn(theirs, lambda: lm_loss(theirs, x, amp))
    except ImportError:  # only ours is timed
        pass
    ms = tm(fns)
    peft = ms.get("peft")
    return dict(lora_step_ms=ms["ours"], peft_step_ms=peft, lora_vs_peft_step=peft and ms["ours"] / peft)

def bench_importance(m, batches, tm, loss=None):
    """Taylor importance vs the fwd+bwd it is built on; loss: batch -> loss, default m.loss (toy: also per sample)."""
    def fwd_bwd(bs=batches):
        for b in bs:
            (loss or m.loss)(b).backward()
        m.zero_grad(set_to_none=True)
    ms = tm({"fwd_bwd": fwd_bwd, "taylor": lambda: estimate_importance(m, batches, "taylor", loss_fn=loss)})
    res = dict(importance_ms=ms["taylor"], fwd_bwd_ms=ms["fwd_bwd"], importance_vs_fwd_bwd=ms["taylor"] / ms["fwd_bwd"])
    if loss is None:  # per-sample Taylor, train.py's default: the same rows, one a batch
        rows = [{**b, "prompts": [p], "answers": [a]} for b in batches for p, a in zip(b["prompts"], b["answers"])]
        ms1 = tm({"fwd_bwd": lambda: fwd_bwd(rows), "sample": lambda: estimate_importance(m, rows, "taylor_sample")})
        res.update(sample_ms=ms1["sample"], sample_vs_fwd_bwd=ms1["sample"] / ms1["fwd_bwd"],
                   sample_vs_taylor=ms1["sample"] / ms["taylor"])
    return res

def bench_decode(m, dev, q, tm):
    """Greedy decoding: ours (inputs_embeds + KV cache) vs HF generate, same LLM, same left-padded prompts."""
    B, M = (4, 8) if q else (32, 32)
    batch = text_batches(1, B, prompt_len=16, answer_len=0, seed=1)[0]
    L = max(map(len, batch["prompts"]))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in batch["prompts"]], device=dev)  # id 0: only padding
    ours = lambda: m.generate(batch, max_new_tokens=M, eos_id=-1)  # -1 is never picked: always M tokens
    hf = lambda: m.llm.generate(input_ids=ids, attention_mask=(ids > 0).long(), do_sample=False, max_new_tokens=M,
                                min_new_tokens=M, pad_token_id=0)
    same = [a == b for a, b in zip(ours(), hf()[:, L:].tolist()) if 3 not in a]  # EOS (3): HF's min_new_tokens bars it
    ms = tm({"ours": ours, "hf": hf})
    return dict(decode_tok_s=B * M * 1e3 / ms["ours"], hf_generate_tok_s=B * M * 1e3 / ms["hf"],
                decode_vs_hf_generate=ms["hf"] / ms["ours"], decode_same_tokens=sum(same) / max(1, len(same)))

def bench_flops(m, batch, dev, q, tm):
    """Achieved FLOP/s of a full fine-tuning step of the toy vs a large fp32 matmul on this machine."""
    ms = tm({"step": step_fn(m, lambda: m.loss(batch))})["step"]
    llm, (B, T) = m.llm, m.embed(batch, with_answer=True, left_pad=False)[1].shape  # padded length T
    N = sum(p.numel() for p in llm.model.layers.parameters()) + llm.lm_head.weight.numel()
    # 6N a token: 2 FLOPs a weight forward + 4 backward (Kaplan et al. 2020), the tied lm_head counted; attention
    # QK^T, AV: 12·L·d·T a token (PaLM App. B; no causal halving). Padding is computed, so counts; norms, AdamW not.
    gflops = (6 * N + 12 * llm.config.num_hidden_layers * llm.config.hidden_size * T) * B * T / ms / 1e6
    peak = matmul_flops(1024 if q else 2048, torch.float32, dev, tm) / 1e9
    return dict(train_step_ms=ms, train_step_gflops=gflops, matmul_peak_gflops=peak, mfu=gflops / peak)

def bench_1b(dev, tm, cfg=LLAMA_1B, B=4, T=1024, n=4):
    """cuda1b_*: full-FT step MFU, LoRA vs peft, Taylor importance vs fwd+bwd (n batches) on a random Llama of
    LlamaConfig `cfg`, fp32 weights, bf16 autocast. Any device: on the CPU, a tiny cfg tries this code in seconds."""
    cuda, amp = dev.type == "cuda", lambda: torch.autocast(dev.type, torch.bfloat16)
    with dev:  # random init on the device: 1.2B weights take a while on the CPU
        base = LlamaForCausalLM(cfg)
    batches = torch.randint(0, cfg.vocab_size, (n, B, T), device=dev)
    ms = tm({"full": step_fn(base, lambda: lm_loss(base, batches[0], amp))})["full"]  # AdamW state freed on return
    # 6N FLOPs a token, N with the tied head once (the embedding is a lookup); attention (~5% at T=1024) left out
    N, name = sum(p.numel() for p in base.parameters()), torch.cuda.get_device_name(dev) if cuda else "cpu"
    mm = matmul_flops(16384 if cuda else 512, torch.bfloat16, dev, tm)
    peak = next((v for k, v in BF16_PEAK.items() if k in name), mm)  # an unknown GPU: the measured matmul
    res = dict(shape=f"d {cfg.hidden_size}, {cfg.num_hidden_layers} layers, batch {B}x{T}", gpu=name, n_params=N,
               full_step_ms=ms, full_step_tflops=6 * N * B * T / ms / 1e9, bf16_matmul_tflops=mm / 1e12,
               bf16_peak_tflops=peak / 1e12, full_step_mfu=6 * N * B * T / ms * 1e3 / peak)
    res.update(bench_lora_vs_peft(base, batches[0], tm, amp))
    res.update(bench_importance(base, batches, tm, loss=lambda ids: lm_loss(base, ids, amp)))
    res["peak_mem_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None  # this process's
    return {f"cuda1b_{k}": v for k, v in res.items()}

def mem_child(args):
    """(a fresh process) MB that training steps add to the built model and batch (CUDA: allocated memory; CPU: RSS)."""
    dev = torch.device(args.device)
    d, n_layers, V, B, T = (256, 4, 4096, 4, 32) if args.quick else (512, 8, 8192, 8, 64)  # full: ~30M params
    m = (smollm2() if args.real else llama(d, n_layers, V)).to(dev)
    m, x = add_lora(m) if args._mem == "lora" else m, torch.randint(0, m.config.vocab_size, (B, T), device=dev)
    rss = lambda key: next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base, peak = torch.cuda.memory_allocated(dev), lambda: torch.cuda.max_memory_allocated(dev)
    else:  # Linux: VmRSS now, VmHWM the peak since clear_refs 5 reset it to the RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base, peak = rss("VmRSS"), lambda: rss("VmHWM")
    step = step_fn(m, lambda: lm_loss(m, x))
    for _ in range(2):  # the second step's activations and grads meet the AdamW state made in the first
        step()
    print(json.dumps({"peak_mb": (peak() - base) / 2**20}))

def peak_mem_mb(args, kind):
    cmd = [sys.executable, os.path.abspath(__file__), "--_mem", kind, "--device", args.device]
    cmd += ["--quick"] * args.quick + ["--real"] * args.real
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]

def report(path, res, new):
    """Print `new`'s entries with their targets, write `res` to `path` (atomically), return `res`."""
    for k, v in new.items():
        print(f"{k:<{max(map(len, new))}} {f'{v:.3f}' if isinstance(v, float) else str(v):>12}  "
              f"{GOALS.get(k.removeprefix('real_').removeprefix('cuda1b_'), '')}")
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=2)
    os.replace(path + ".tmp", path)  # never a half-written bench.json
    return res

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats (tests; timings not meaningful)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--out", default="bench.json", help="where the results are written")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per side (default 7, --quick 2, --real 3)")
    p.add_argument("--real", action="store_true", help="measure on SmolLM2-135M-Instruct, add real_* to --out")
    p.add_argument("--_mem", choices=["lora", "full"], help=argparse.SUPPRESS)  # child of the memory measurement
    args = p.parse_args(argv)
    if args._mem:
        return mem_child(args)
    t0, q, dev = time.time(), args.quick, torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    reps, warm = args.repeats or (3 if args.real else 2 if q else 7), 1 if q or args.real else 2
    tm = lambda fns: median_ms(fns, reps, warm, sync)
    print(f"device {dev} | {torch.get_num_threads()} threads | torch {torch.__version__} | {reps} repeats, medians")
    base = smollm2().to(dev) if args.real else llama(*((128, 2) if q else (256, 8)), 256).to(dev)
    x = torch.randint(0, base.config.vocab_size, (3, 8, 64) if args.real else (1, 4, 32) if q else (1, 16, 64)).to(dev)
    lo, full = peak_mem_mb(args, "lora"), peak_mem_mb(args, "full")
    res = dict(bench_lora_vs_peft(base, x[0], tm), lora_peak_mb=lo, full_peak_mb=full, lora_vs_full_peak_mem=lo / full)
    if args.real:  # and importance vs fwd+bwd over 2 batches; real_* added to --out, keeping what is there
        res.update(bench_importance(base, x[1:], tm, loss=lambda ids: lm_loss(base, ids)), total_s=time.time() - t0)
        new = {f"real_{k}": v for k, v in res.items()}
        return report(args.out, {**(json.load(open(args.out)) if os.path.exists(args.out) else {}), **new}, new)
    res.update(device=str(dev), threads=torch.get_num_threads(), quick=q, torch=torch.__version__)
    torch.manual_seed(0)
    m = SpeechLLM(ModelConfig()).to(dev)  # the default's tiny speech LLM, text batches
    batches = text_batches(*((2, 4) if q else (4, 16)), prompt_len=24, answer_len=38)
    res.update({**bench_importance(m, batches, tm), **bench_decode(m, dev, q, tm)})
    res.update(bench_flops(m, batches[0], dev, q, tm))
    if dev.type == "cuda":  # the 1B case; --quick runs its code on a tiny shape
        res.update(bench_1b(dev, tm, *((llama(64, 2, 512).config, 2, 64) if q else ())))
    res["total_s"] = time.time() - t0
    return report(args.out, res, res)

if __name__ == "__main__":
    main()
