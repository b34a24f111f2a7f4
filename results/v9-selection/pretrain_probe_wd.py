# The pretrain-only probe behind RESULTS.md "The default v9" (session 11): the default pretraining (1000 steps, LR
# 3e-3, batch 32) with AdamW weight decay WD, then T2T on test and on the non-test typed questions (val + the speech
# entities in the test phrasings). It reproduces the pipeline's pretrained T2T (seed 13: 68.5 both ways).
# Run from the repo root with the v4 world built: python results/v9-selection/pretrain_probe_wd.py SEED WD
# (appends to /tmp/exp/wd.jsonl; the committed pretrain_probe_wd.jsonl ran one thread each, two side by side)
import sys, json, time, torch
sys.path.insert(0, ".")
import train, data, evaluate
from model import ModelConfig, SpeechLLM
torch.set_num_threads(1)
seed, wd = int(sys.argv[1]), float(sys.argv[2])
args = train.get_args(["--out", "/tmp/exp/x", "--data-dir", "runs/data/formant-e128-s0-v4"])
d = train.load_data(args, args.data_dir, args.data_dir + "/manifest.jsonl", True, 1)
world = json.load(open(args.data_dir + "/world.json"))
speech = [dict(id=f"speech-{e['name']}-{a}-{p}", transcript=q, question=q, answer=e[a], task="qa", split="speech")
          for e in world[:len(world) // 2] for a in data.ATTRIBUTES for p in data.PHRASINGS["test"]
          for q in [data.QUESTIONS[a][p].format(e=e["name"])]]
torch.manual_seed(seed)
m = SpeechLLM(ModelConfig())
train.set_trainable(m, ["llm."])
tc = train.TrainConfig(name="pretrain", batch_size=32, seed=seed, log_every=10000)
t = time.time()
train.train(m, train.param_groups(m, 3e-3, wd), train.batches_of(d.split("pretrain"), d.text_batch, tc), 1000, tc)
m.eval()
out = dict(seed=seed, wd=wd, time=round(time.time() - t))
for k, rows in (("test", d.split("test")), ("nontest", d.split("val") + speech)):
    out[k] = round(100 * evaluate.accuracy(m, rows, d.text_batch, d.tok)[0], 1)
print(json.dumps(out))
open("/tmp/exp/wd.jsonl", "a").write(json.dumps(out) + "\n")
