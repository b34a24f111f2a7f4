# The fresh seeds at the LRs val picked (the default) and at v9's LRs, from the same pretrained and aligned models:
#   python results/v10/lr_compare.py results/v10 results/v10/v9-lrs 60,61,62,63,64,65
import json, sys
a_root, b_root, seeds = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
P = ("full", "layer_lr", "lora")
print("seed | no FT T2T / S2T | default LRs (1e-4, LoRA 2e-3): full, layer_lr, lora T2T / S2T "
      "| v9 LRs (3e-4, LoRA 6e-4): full, layer_lr, lora T2T / S2T")
for s in seeds:
    a = json.load(open(f"{a_root}/seed{s}/results.json"))
    b = json.load(open(f"{b_root}/seed{s}/results.json"))
    no = a["no_ft"]
    cell = lambda r: ", ".join(f"{100 * r['methods'][m]['t2t_acc']:.1f} / {100 * r['methods'][m]['s2t_acc']:.1f}" for m in P)
    print(f"{s} | {100 * no['t2t_acc']:.1f} / {100 * no['s2t_acc']:.1f} | {cell(a)} | {cell(b)}")
