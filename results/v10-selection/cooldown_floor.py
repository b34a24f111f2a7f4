# Probe behind RESULTS.md "The default v10", "A cooldown to a higher floor" (session 12): the whole pipeline as
# train.py runs it, except that the pretraining cooldown decays to an absolute LR (FLOOR) instead of 10% of the LR
# where pretraining stopped. Hypothesis: forgetting follows the fine-tuning LR relative to the LLM's last
# pretraining LR (the fixed recipe ends at 3e-4; the cooled-down LLM of v10 near 1.5e-4).
#   python results/v10-selection/cooldown_floor.py 3e-4 --out runs/v10floor/seed50 --seed 50 \
#       --data-dir runs/data/formant-e128-s0-v5 --pretrain-steps 1500 --pretrain-target 0.5 --pretrain-cooldown 150 \
#       --method full,lora
# then `python train.py --init-from runs/v10floor/seedS ...` for other fine-tuning LRs (the pretrain stage is copied).
import math, sys
sys.path.insert(0, ".")
import train

FLOOR = float(sys.argv[1])
real_train, real_get_lr = train.train, train.get_lr


def train_with_floor(model, groups, batches, steps, cfg, teacher=None, stop=None):
    if cfg.name != "pretrain_cooldown":
        return real_train(model, groups, batches, steps, cfg, teacher, stop)
    f = min(1.0, FLOOR / groups[0]["initial_lr"])  # the multiplier the cosine ends at

    def get_lr(it, total, warmup):
        if it < warmup:
            return (it + 1) / warmup
        return f + (1 - f) * 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(1, total - warmup)))
    train.get_lr = get_lr  # train.train reads the module's get_lr at each step
    try:
        return real_train(model, groups, batches, steps, cfg, teacher, stop)
    finally:
        train.get_lr = real_get_lr


train.train = train_with_floor
train.main(sys.argv[2:])
