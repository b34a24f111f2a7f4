"""LoRA from scratch: low-rank adapters for a frozen HuggingFace causal LM, the LoRA mitigation of arXiv 2509.23755.

A rank-r update dW = B @ A, scaled by alpha / r, on every attention and MLP linear of the LLM (q, k, v, o, gate, up,
down); r = 8 for the 1B and 16 for the 8B model, alpha = 2r, base LLM frozen. Follows Hu et al. 2021 (arXiv
2106.09685) with the loralib parameter layout; rslora's alpha / sqrt(r) is Kalajdzievski 2023. Needs only torch
(save_peft_adapter imports safetensors lazily). Nothing here imports the project: copy this file alone. On a plain
transformers LlamaForCausalLM (the README shows these lines; test_all.py runs them):

    from transformers import LlamaConfig, LlamaForCausalLM
    from lora import count_parameters, inject_lora, mark_only_lora_as_trainable, save_peft_adapter, unload_lora
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=4))          # or LlamaForCausalLM.from_pretrained(path)
    inject_lora(model, r=8, alpha=16)                                     # q,k,v,o,gate,up,down
    mark_only_lora_as_trainable(model)                                    # also=("adaptor.",) in a speech LLM
    print(count_parameters(model))                                        # (trainable, total)
    # ... train with your loop ...
    save_peft_adapter(model, "out/adapter", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    unload_lora(model).save_pretrained("out/merged")                      # or a plain merged checkpoint
"""
import json, os

import torch
import torch.nn as nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

class LoRALinear(nn.Module):
    """y = base(x) + (dropout(x) @ A.T @ B.T) * scaling, with base frozen."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        self.base, self.r, self.alpha, self.rslora, self.merged = base, r, alpha, rslora, False
        self.scaling = alpha / r ** 0.5 if rslora else alpha / r
        base.requires_grad_(False)
        w = base.weight
        # Adam steps on fp16/bf16 params lose most of their bits: the (tiny) LoRA params stay fp32, as in peft/QLoRA
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)  # same init as nn.Linear / loralib
        # B = 0 makes dW = 0, so training starts exactly at the pretrained model (LoRA §4.1).
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @torch.no_grad()
    def set_merged(self, merged: bool) -> bool:
        """Fold dW into (merged=True) or out of base.weight; True if anything changed."""
        if self.merged == merged:
            return False
        # sum in fp32, so a bf16 weight is rounded once (and unmerging it is exact only up to that rounding)
        w, delta = self.base.weight, (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        w.copy_((w.float() + delta if merged else w.float() - delta).to(w.dtype))
        self.merged = merged
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:  # dW already lives inside base.weight
            return y
        h = self.dropout(x).to(self.lora_A.dtype)
        return y + ((h @ self.lora_A.T @ self.lora_B.T) * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"

def _lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]

def _replace(model: nn.Module, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)

def inject_lora(model: nn.Module, targets=TARGETS, r: int = 8, alpha: float = 16,
                dropout: float = 0.0, rslora: bool = False) -> list[str]:
    """Wrap each nn.Linear whose last name component is in `targets`; return the wrapped names."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)  # "q_proj" is no char set
    found, matched, linears = [], set(), []
    for name, m in model.named_modules():
        last = name.rpartition(".")[2]
        if isinstance(m, LoRALinear) and last in targets:
            matched.add(last)  # already wrapped: counts as a match, never wrapped twice
        elif isinstance(m, nn.Linear):
            linears.append(name)
            if last in targets:
                found.append(name)
                matched.add(last)
    # All checks happen before the first swap, so a typo leaves the model untouched.
    if missing := [t for t in targets if t not in matched]:
        raise ValueError(f"inject_lora: targets {missing} matched no nn.Linear; Linear modules include {linears[:6]}")
    if found and r > (low := min(min(model.get_submodule(n).weight.shape) for n in found)):
        raise ValueError(f"inject_lora: r={r} exceeds the smallest adapted matrix's side ({low}); use r <= {low}")
    for name in found:
        _replace(model, name, LoRALinear(model.get_submodule(name), r, alpha, dropout, rslora))
    return found

def max_rank(model, targets=TARGETS):  # the largest r inject_lora takes: the smallest side of an adapted matrix
    return min((min(m.weight.shape) for n, m in model.named_modules() if n.rpartition(".")[2] in targets), default=0)

def mark_only_lora_as_trainable(model: nn.Module, also: tuple[str, ...] = ()) -> None:
    """Freeze all params except lora_A/lora_B and those whose name starts with a prefix in `also`."""
    also = (also,) if isinstance(also, str) else tuple(also)  # "adaptor." is not a tuple of chars
    n_lora = 0
    for name, p in model.named_parameters():
        is_lora = name.rpartition(".")[2] in ("lora_A", "lora_B")
        n_lora += is_lora
        p.requires_grad_(is_lora or name.startswith(also))
    if n_lora == 0:  # otherwise this would silently freeze the whole model
        raise ValueError("mark_only_lora_as_trainable: no LoRA parameters; call inject_lora first")

def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); tied weights are counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

# Merging is an explicit call, never a side effect of .train()/.eval() as in loralib: weights never change unasked.
def merge_lora(model: nn.Module) -> int:
    return sum(m.set_merged(True) for _, m in _lora_modules(model))

def unmerge_lora(model: nn.Module) -> int:
    return sum(m.set_merged(False) for _, m in _lora_modules(model))

def unload_lora(model: nn.Module) -> nn.Module:
    """Merge, then swap each LoRALinear for its base nn.Linear: a plain save_pretrained-able model."""
    merge_lora(model)
    for name, m in _lora_modules(model):
        _replace(model, name, m.base)
    return model

def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.rpartition(".")[2] in ("lora_A", "lora_B")}

def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    expected = lora_state_dict(model).keys()
    missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    if missing or unexpected:
        raise KeyError(f"load_lora_state_dict: {len(missing)} missing keys {missing[:3]}, "
                       f"{len(unexpected)} unexpected keys {unexpected[:3]}")
    if any(m.merged for _, m in _lora_modules(model)):  # the merged W holds the old dW
        raise RuntimeError("load_lora_state_dict: call unmerge_lora(model) first")
    model.load_state_dict(sd, strict=False)

def _atomic_write(path: str, data: bytes):
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)  # readers see the old file or the whole new one

def save_peft_adapter(model: nn.Module, out_dir: str, base_model_name_or_path: str | None = None,
                      prefix: str = "") -> None:
    """Write adapter_config.json + adapter_model.safetensors for peft.PeftModel.from_pretrained. `prefix` (e.g.
    "llm.") is stripped, so paths are relative to the model you hand to peft."""
    from safetensors.torch import save
    prefix = prefix + "." if prefix and not prefix.endswith(".") else prefix
    mods = [(n[len(prefix):], m) for n, m in _lora_modules(model) if n.startswith(prefix)]
    if not mods:
        raise ValueError(f"save_peft_adapter: no LoRALinear modules under prefix {prefix!r}")
    hparams = {(m.r, m.alpha, m.rslora, getattr(m.dropout, "p", 0.0)) for _, m in mods}
    if len(hparams) > 1:  # would need peft's rank_pattern/alpha_pattern
        raise ValueError(f"save_peft_adapter: mixed (r, alpha, rslora, dropout) unsupported: {hparams}")
    r, alpha, rslora, dropout = hparams.pop()
    # peft's on-disk keys: its wrapper path, plus A/B as nn.Linear weights (its in-memory adapter name is not saved)
    tensors = {f"base_model.model.{n}.lora_{ab}.weight": getattr(m, f"lora_{ab}").detach().cpu().contiguous()
               for n, m in mods for ab in "AB"}
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout,
                  target_modules=sorted({n.rpartition(".")[2] for n, _ in mods}), use_rslora=rslora,
                  bias="none", fan_in_fan_out=False, base_model_name_or_path=base_model_name_or_path,
                  inference_mode=True, init_lora_weights=True)
    os.makedirs(out_dir, exist_ok=True)
    _atomic_write(os.path.join(out_dir, "adapter_model.safetensors"), save(tensors, {"format": "pt"}))
    _atomic_write(os.path.join(out_dir, "adapter_config.json"), json.dumps(config, indent=2).encode())
