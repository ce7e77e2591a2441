"""
checkpoint.py: everything on disk. Adapters (adapter.safetensors + adapter.json: what eval.py and anyone else
loads) and GRPO checkpoints (an adapter folder plus trainer.pt: optimizer, RNG states and data position, what
`grpo.py --resume` continues from).

    runs/grpo/ckpt-000025/adapter.safetensors   the adapters' parameters (pte.Adapters.state_dict())
                          adapter.json          AdapterConfig, base model name and fingerprint,
                                                training settings
                          trainer.pt            step, data position, AdamW state, config, RNG states

Every file is written to a temporary name and renamed, and a checkpoint folder is complete before it replaces
an older one, so an interruption at any moment leaves the previous checkpoint intact (never lost work). A
corrupt or foreign file gives a one-line error that names what is wrong and the intact alternative.
"""
import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from model import read_json
from pte import AdapterConfig, AdapterError, Adapters


class CheckpointError(ValueError):
    """An unusable checkpoint. The message is one line and names an intact earlier checkpoint
    if there is one."""


# -----------------------------------------------------------------------------------------------------------
# adapters: adapter.safetensors + adapter.json

def fingerprint(model_cfg) -> str:
    """A short hash of the base model's architecture (its ModelConfig), stored with adapters,
    checked on load."""
    cfg = {k: v for k, v in asdict(model_cfg).items() if k != "eos_token_ids"}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def atomic_write(path: Path, write):
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_adapters(adapters: Adapters, folder, extra=None):
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in adapters.state_dict().items()}
    meta = {"config": asdict(adapters.cfg), "base_model": adapters.base_name,
            "base_fingerprint": fingerprint(adapters.base_cfg), **(extra or {})}
    atomic_write(folder / "adapter.safetensors", lambda p: save_file(sd, str(p)))
    atomic_write(folder / "adapter.json", lambda p: p.write_text(json.dumps(meta, indent=2)))


def read_adapter_meta(folder) -> dict:
    return read_json(Path(folder) / "adapter.json", AdapterError)


def load_adapters(model, folder) -> Adapters:
    """Attach the adapters saved in `folder` to `model`;
    refuses a base model other than the one trained on."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    meta = read_adapter_meta(folder)
    fp = fingerprint(model.cfg)
    if meta.get("base_fingerprint") != fp:
        raise AdapterError(f"adapter in {folder} was trained for base model {meta.get('base_model')!r} "
                           f"(fingerprint {meta.get('base_fingerprint')}), not this one (fingerprint {fp})")
    try:
        sd = load_file(str(Path(folder) / "adapter.safetensors"))
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"cannot read {folder}/adapter.safetensors: {str(e).splitlines()[0]}") from None
    # adapters saved before state_update existed were trained with the literal Eq. 6 (S + S')
    adapters = Adapters(model, AdapterConfig(**{"state_update": "literal", **meta["config"]}))
    try:
        adapters.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise AdapterError(f"adapter.safetensors does not match adapter.json in {folder}: "
                           f"{str(e).splitlines()[-1].strip()[:200]}") from None
    return adapters


# -----------------------------------------------------------------------------------------------------------
# GRPO checkpoints: ckpt-NNNNNN/ = adapter.safetensors + adapter.json + trainer.pt

TRAINER_KEYS = {"step", "data_pos", "optimizer", "config", "rng_torch", "rng_python"}


def checkpoints(out: Path):
    """The ckpt-NNNNNN folders of a run, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(out).glob("ckpt-*")
             if (m := re.fullmatch(r"ckpt-(\d+)", p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(out: Path, step, data_pos, adapters, opt, config: dict, meta: dict, keep: int):
    """Write ckpt-{step}/ through a temporary folder, then drop all but the newest `keep` checkpoints."""
    final, tmp = out / f"ckpt-{step:06d}", out / f".tmp-ckpt-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crash while saving
    save_adapters(adapters, tmp, extra={"step": step, **meta})
    state = {"step": step, "data_pos": data_pos, "optimizer": opt.state_dict(), "config": config,
             "rng_torch": torch.get_rng_state(), "rng_python": random.getstate(),
             "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save(state, tmp / "trainer.pt")
    if final.exists():  # only if a run re-saves a step: move the old one aside before replacing it
        os.replace(final, out / f".old-{final.name}")
    os.replace(tmp, final)  # the new checkpoint is complete before any old one goes
    shutil.rmtree(out / f".old-{final.name}", ignore_errors=True)
    for old in checkpoints(out)[:-keep]:
        shutil.rmtree(old)
    return final


def read_checkpoint(ckpt: Path, out: Path) -> dict:
    """trainer.pt of a checkpoint, or a CheckpointError that names an intact earlier one
    (nothing is deleted)."""
    for name in ("adapter.safetensors", "adapter.json", "trainer.pt"):
        if not (ckpt / name).is_file():
            raise corrupt(ckpt, out, f"{name} is missing")
    try:
        state = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
        missing = TRAINER_KEYS - set(state)
    except Exception as e:
        raise corrupt(ckpt, out,
                      f"trainer.pt is truncated or not a checkpoint ({type(e).__name__})") from None
    if missing:
        raise corrupt(ckpt, out, f"trainer.pt lacks {sorted(missing)}")
    return state


def load_checkpoint_adapters(model, ckpt: Path, out: Path) -> Adapters:
    try:
        return load_adapters(model, ckpt)  # refuses another base model (fingerprint)
    except AdapterError as e:
        raise corrupt(ckpt, out, e) from None


def restore(state, opt, lr, weight_decay):
    """Optimizer (at the command line's lr) and RNG states -> (step, data position)."""
    opt.load_state_dict(state["optimizer"])
    for g in opt.param_groups:
        g["lr"], g["weight_decay"] = lr, weight_decay
    torch.set_rng_state(state["rng_torch"])
    random.setstate(state["rng_python"])
    if torch.cuda.is_available() and state.get("rng_cuda"):
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return state["step"], state["data_pos"]


def corrupt(ckpt: Path, out: Path, reason) -> CheckpointError:
    reason = (str(reason).strip().splitlines() or ["?"])[0][:300]
    earlier = [p for p in checkpoints(out) if p != ckpt]
    hint = (f"the earlier checkpoint {earlier[-1].name} is untouched: move {ckpt.name} away to resume from it"
            if earlier else "no earlier checkpoint")
    return CheckpointError(f"cannot resume from {ckpt}: {reason}; {hint}")
