# Per-template T2T of a run's original LLM (RESULTS.md "The default v9"): test, and the same 8 question templates
# (4 attributes x the 2 test phrasings) asked typed about the speech entities (no test entity).
# Run from the repo root with the v4 world built: python results/v9-selection/per_template.py RUN [RUN ...]
import sys, json, collections, torch
sys.path.insert(0, ".")
import train, data, evaluate
from model import ModelConfig, SpeechLLM, load_checkpoint
args = train.get_args(["--out", "/tmp/x", "--data-dir", "runs/data/formant-e128-s0-v4"])
d = train.load_data(args, args.data_dir, args.data_dir + "/manifest.jsonl", True, 1)
world = json.load(open(args.data_dir + "/world.json"))
speech = [dict(id=f"speech-{e['name']}-{a}-{p}", transcript=q, question=q, answer=e[a], task="qa", split="speech")
          for e in world[:len(world) // 2] for a in data.ATTRIBUTES for p in data.PHRASINGS["test"]
          for q in [data.QUESTIONS[a][p].format(e=e["name"])]]
for run in sys.argv[1:]:
    m = SpeechLLM(ModelConfig())
    m.load_state_dict(load_checkpoint(run + "/pretrain.pt")["model"], strict=False)
    m.eval()
    for name, rows in (("test", d.split("test")), ("speech entities", speech)):
        acc, _, preds = evaluate.accuracy(m, rows, d.text_batch, d.tok)
        per = collections.defaultdict(list)
        for r, ok in zip(rows, evaluate.right(rows, preds)):
            _, _, attr, p = r["id"].split("-")
            per[(attr, p)].append(ok)
        print(f"{run} {name}: {100 * acc:.1f}  " + " ".join(f"{a}{p} {100 * sum(v) / len(v):.0f}" for (a, p), v in sorted(per.items())))
