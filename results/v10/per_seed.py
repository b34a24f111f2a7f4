# Every finding of the paper, per seed, from a multi-seed run's JSON (README "What this repo shows", RESULTS.md):
#   python results/v10/per_seed.py results/v10 60,61,62,63,64,65
#   python results/v10/per_seed.py results/v10/v9-lrs 60,61,62,63,64,65   (-> v9-lrs/per_seed.txt)
import json, sys
root, seeds = sys.argv[1], sys.argv[2].split(",")
P = ("full", "layer_lr", "lora")
pct = lambda v: f"{100 * v:.1f}"
print("seed | pretrained T2T (test, val) | stop step | no FT T2T / S2T | noise floor mean (pair) | "
      "per method: T2T / S2T, shift x noise set 1, set 2, top-5% overlap")
for s in seeds:
    x = json.load(open(f"{root}/seed{s}/results.json"))
    rep = json.load(open(f"{root}/seed{s}/importance.json"))
    n, M, no, p = x["importance_noise_js_mean"], x["methods"], x["no_ft"], x["pretrain"]
    cells = [f"{m} {pct(M[m]['t2t_acc'])} / {pct(M[m]['s2t_acc'])}, {M[m]['importance_shift']['js'] / n:.1f}x, "
             f"{M[m]['importance_shift_2']['js'] / n:.1f}x, {M[m]['importance_shift']['top_jaccard']:.2f}" for m in P]
    stop = p["checks"][-1][0] if p.get("checks") else "-"
    print(f"{s} | {pct(p['t2t_acc'])}, {pct(p['val_t2t_acc'])} | {stop} | {pct(no['t2t_acc'])} / {pct(no['s2t_acc'])} | "
          f"{n:.5f} ({x['importance_noise_js']:.5f}; sets' top-5% overlap {rep['noise_floor']['top_jaccard']:.2f}) | "
          + " | ".join(cells))
for s in seeds:
    x = json.load(open(f"{root}/seed{s}/results.json"))
    M, no, n, v = x["methods"], x["no_ft"], x["importance_noise_js_mean"], x["importance_validation"]
    full = M["full"]
    print(f"seed {s}:")
    print(f"  R2: full FT T2T {100 * (full['t2t_acc'] - no['t2t_acc']):+.1f} (EM {100 * (full['t2t_em'] - no['t2t_em']):+.1f}),"
          f" S2T {100 * (full['s2t_acc'] - no['s2t_acc']):+.1f}; val T2T {100 * (full['val_t2t_acc'] - no['val_t2t_acc']):+.1f}")
    for m in ("layer_lr", "lora"):
        a, b = M[m]["importance_shift"]["js"], M[m]["importance_shift_2"]["js"]
        fa, fb = full["importance_shift"]["js"], full["importance_shift_2"]["js"]
        less = lambda mine, f: "less" if mine < f else "more"
        clear = lambda mine, f: "by more than the noise" if abs(f - mine) > n else "within the noise"
        print(f"  R5 {m} vs full: T2T {100 * (M[m]['t2t_acc'] - full['t2t_acc']):+.1f} (EM {100 * (M[m]['t2t_em'] - full['t2t_em']):+.1f}),"
              f" S2T {100 * (M[m]['s2t_acc'] - full['s2t_acc']):+.1f} (EM {100 * (M[m]['s2t_em'] - full['s2t_em']):+.1f});"
              f" R4 set 1 {less(a, fa)} ({clear(a, fa)}), set 2 {less(b, fb)} ({clear(b, fb)})")
    arg = {m: (M[m]["importance_shift"]["argmax_before"], M[m]["importance_shift"]["argmax_after"],
               M[m]["importance_shift_2"]["argmax_after"]) for m in P}
    print(f"  R3 argmax layer (original, after on set 1, set 2): {arg}")
    print(f"  R1 text: top {v['top_ratio']:.1f}x, bottom {v['bottom_ratio']:.4f}x, random {v['random_ratio']:.3f}x; "
          f"speech: top {v['speech']['top_ratio']:.1f}x, bottom {v['speech']['bottom_ratio']:.4f}x, "
          f"random {v['speech']['random_ratio']:.3f}x")
