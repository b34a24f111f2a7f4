# The pretraining probe behind RESULTS.md "The default v8" (session 10): the pretrain stage alone, then T2T.
# Run from the repo root with the v4 world built: python results/v8-selection/pretrain_probe.py SEED STEPS LR COPY_PER_ENTITY BATCH RARE_EVERY
# (RARE_EVERY k: every k-th entity keeps one statement per fact and no typed QA; 0 = none). Appends to /tmp/exp/pre.jsonl.
import os, sys, time, json, torch
sys.path.insert(0, ".")
import train, data, evaluate
from dataclasses import replace
from model import ModelConfig, SpeechLLM
seed, steps, lr = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
ncopy = int(sys.argv[4]) if len(sys.argv) > 4 else 16
bs = int(sys.argv[5]) if len(sys.argv) > 5 else 32
args = train.get_args(["--out", "/tmp/exp/x", "--data-dir", "runs/data/formant-e128-s0-v4"])
d = train.load_data(args, args.data_dir, args.data_dir + "/manifest.jsonl", True, 1)
torch.manual_seed(seed)
m = SpeechLLM(ModelConfig())
rows = d.split("pretrain")
copy = [r for r in rows if r["task"] == "copy"]
rows = [r for r in rows if r["task"] != "copy"] + copy[: ncopy * 128]
rare_every = int(sys.argv[6]) if len(sys.argv) > 6 else 0  # every k-th entity is rare: 1 statement, no typed QA
import json as _j
world = _j.load(open(args.data_dir + "/world.json"))
rare = {e["name"] for i, e in enumerate(world) if rare_every and i % rare_every == 0}
def keep(r):
    if r["task"] == "lm":
        _, name, attr, j = r["id"].split("-")
        return name not in rare or j == "0"
    if r["task"] == "qa":
        return r["id"].split("-")[1] not in rare
    return True
rows = [r for r in rows if keep(r)]
train.set_trainable(m, ["llm."])
tc = train.TrainConfig(name="pretrain", batch_size=bs, seed=seed, log_every=250)
t = time.time()
losses = train.train(m, train.param_groups(m, lr), train.batches_of(rows, d.text_batch, tc), steps, tc)
dt = time.time() - t
import random
tr = random.Random(0).sample([r for r in rows if r["task"] == "qa"], 256)
out = dict(rare_every=rare_every, seed=seed, steps=steps, lr=lr, ncopy=ncopy, bs=bs, time=round(dt), loss=sum(losses[-50:]) / 50)
for k, s in (("test", d.split("test")), ("val", d.split("val")), ("train_qa", tr)):
    out[k] = round(100 * evaluate.accuracy(m, s, d.text_batch, d.tok)[0], 1)
for k, s in (("val_rare", [r for r in d.split("val") if r["id"].split("-")[1] in rare]),
             ("val_common", [r for r in d.split("val") if r["id"].split("-")[1] not in rare]),
             ("test_rare", [r for r in d.split("test") if r["id"].split("-")[1] in rare]),
             ("test_common", [r for r in d.split("test") if r["id"].split("-")[1] not in rare])):
    if s: out[k] = round(100 * evaluate.accuracy(m, s, d.text_batch, d.tok)[0], 1)
print(json.dumps(out))
os.makedirs("/tmp/exp", exist_ok=True)
open("/tmp/exp/pre.jsonl", "a").write(json.dumps(out) + "\n")
