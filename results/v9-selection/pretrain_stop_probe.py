# The stop-at-a-level probe behind RESULTS.md "The default v9" (session 11): the pretrain stage alone with
# --pretrain-steps 1500 --pretrain-target 0.74 (train.pretrain as the pipeline calls it), then T2T on test and val.
# Run from the repo root with the v5 world built (python data.py build runs/data/formant-e128-s0-v5):
#   python results/v9-selection/pretrain_stop_probe.py SEED   (appends to /tmp/exp/stop.jsonl)
import sys, json, time, types, torch
sys.path.insert(0, ".")
import train, data, evaluate
from model import ModelConfig, SpeechLLM
torch.set_num_threads(1)
seed = int(sys.argv[1])
args = train.get_args(["--out", "/tmp/exp/x", "--data-dir", "runs/data/formant-e128-s0-v5", "--seed", str(seed),
                       "--pretrain-steps", "1500", "--pretrain-target", "0.74"])
d = train.load_data(args, args.data_dir, args.data_dir + "/manifest.jsonl", True, 1)
torch.manual_seed(seed)
m = SpeechLLM(ModelConfig())
run = types.SimpleNamespace(results={})
tc = train.TrainConfig(batch_size=32, seed=seed, log_every=10000)
t = time.time()
train.pretrain(run, m, d, tc, 3e-3, args.pretrain_steps, 0.0, args.pretrain_target)
p = run.results["pretrain"]
out = dict(seed=seed, steps=p["steps"], check=p["checks"][-1][1] if p["checks"] else None, test=round(100 * p["t2t_acc"], 1),
           val=round(100 * p["val_t2t_acc"], 1), time=round(time.time() - t), n_checks=len(p["checks"]))
print(json.dumps(out)); __import__("os").makedirs("/tmp/exp", exist_ok=True); open("/tmp/exp/stop.jsonl", "a").write(json.dumps(out) + "\n")
