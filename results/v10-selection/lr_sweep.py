# The fine-tuning LR sweep behind RESULTS.md "The default v10" (session 12): val T2T / val S2T of full FT and LoRA
# on the selection seeds 50-53, from the committed JSON. The runs:
#   python train.py --out runs/v10sel/seedS --seed S --pretrain-steps 1500 --pretrain-target 0.5 --pretrain-cooldown 150 \
#       --lr 3e-4 --lora-lr 6e-4 --method full,lora          (seeds 50, 51 also layer_lr)
#   python train.py --init-from runs/v10sel/seedS --out runs/v10sel/lr/seedS_TAG --seed S <same pretrain flags> \
#       --method full,lora --lr LR --lora-lr LORA_LR --steps STEPS    (TAG below)
# Criterion (as in v6): the highest val S2T per method, here summed over the four seeds.
#   python results/v10-selection/lr_sweep.py                                  -> lr_sweep.txt
# The same sweep of v9's fixed recipe (runs/base_ps: seeds 0-2, 1000 steps, no target; JSON in v9-recipe/):
#   python results/v10-selection/lr_sweep.py results/v10-selection/v9-recipe 0,1,2   -> v9-recipe/lr_sweep.txt
import json, os, sys
here = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
TAGS = {"std100": "3e-4 / 6e-4, 100 steps", "lo100": "1e-4 / 2e-4, 100 steps", "hi100": "1e-3 / 2e-3, 100 steps",
        "xhi100": "3e-3 / 6e-3, 100 steps (LoRA only)", "xlo300": "3e-5 / 6e-5, 300 steps",
        "lo300": "1e-4 / 2e-4, 300 steps (seeds 50-51)"}
if len(sys.argv) > 1:
    TAGS = {k: v for k, v in TAGS.items() if k not in ("xhi100", "lo300")}
seeds = tuple(int(x) for x in sys.argv[2].split(",")) if len(sys.argv) > 2 else (50, 51, 52, 53)
print("LR full / LoRA         | " + " | ".join(f"seed {s}: full, LoRA (val T2T/S2T)" for s in seeds) + " | sum val S2T: full, LoRA")
for s in seeds:
    nf = json.load(open(f"{here}/pipeline/seed{s}/results.json"))["no_ft"]
    print(f"no fine-tuning, seed {s}: {100 * nf['val_t2t_acc']:.1f} / {100 * nf['val_s2t_acc']:.1f}")
for tag, what in TAGS.items():
    cells, tot = [], {"full": 0.0, "lora": 0.0}
    for s in seeds:
        p = f"{here}/pipeline/seed{s}" if tag == "std100" else f"{here}/lr/seed{s}_{tag}"
        if not os.path.exists(p + "/results.json"):
            cells.append("-"); tot = {k: None for k in tot}; continue
        m = json.load(open(p + "/results.json"))["methods"]
        cells.append(", ".join(f"{100 * m[k]['val_t2t_acc']:.1f}/{100 * m[k]['val_s2t_acc']:.1f}" if k in m else "-"
                               for k in ("full", "lora")))
        for k in tot:
            if tot[k] is not None and k in m:
                tot[k] += 100 * m[k]["val_s2t_acc"]
            elif k not in m:
                tot[k] = None
    print(f"{what:<36} | " + " | ".join(cells) + " | " +
          ", ".join("-" if v is None else f"{v:.1f}" for v in tot.values()))
