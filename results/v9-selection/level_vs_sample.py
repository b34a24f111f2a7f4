# How much of the seed-to-seed spread of pretrained T2T is the level of knowledge, and how much the test set's
# sample of facts (RESULTS.md "The default v9"): T2T of each run's original LLM on test (48 entities), val (16) and
# the speech entities asked typed in the test phrasings (64), and on all 128 entities together.
# Run from the repo root with the v4 world built: python results/v9-selection/level_vs_sample.py RUN [RUN ...]
import sys, json, statistics, torch
sys.path.insert(0, ".")
import train, data, evaluate
from model import ModelConfig, SpeechLLM, load_checkpoint
args = train.get_args(["--out", "/tmp/x", "--data-dir", "runs/data/formant-e128-s0-v4"])
d = train.load_data(args, args.data_dir, args.data_dir + "/manifest.jsonl", True, 1)
world = json.load(open(args.data_dir + "/world.json"))
speech = [dict(id=f"speech-{e['name']}-{a}-{p}", transcript=q, question=q, answer=e[a], task="qa", split="speech")
          for e in world[:len(world) // 2] for a in data.ATTRIBUTES for p in data.PHRASINGS["test"]
          for q in [data.QUESTIONS[a][p].format(e=e["name"])]]
sets = {"test": d.split("test"), "val": d.split("val"), "speech": speech}
acc = {k: [] for k in list(sets) + ["all"]}
for run in sys.argv[1:]:
    m = SpeechLLM(ModelConfig())
    m.load_state_dict(load_checkpoint(run + "/pretrain.pt")["model"], strict=False)
    m.eval()
    right = {k: evaluate.right(rows, evaluate.accuracy(m, rows, d.text_batch, d.tok)[2]) for k, rows in sets.items()}
    for k, r in right.items():
        acc[k].append(100 * sum(r) / len(r))
    acc["all"].append(100 * sum(sum(r) for r in right.values()) / sum(len(r) for r in right.values()))
    print(run, " ".join(f"{k} {v[-1]:.1f}" for k, v in acc.items()), flush=True)
for k, v in acc.items():
    print(f"{k}: n = {len(sets[k]) if k in sets else sum(map(len, sets.values()))} questions, mean {statistics.mean(v):.1f}, "
          f"sd between runs {statistics.stdev(v):.1f}, range {max(v) - min(v):.1f}")
