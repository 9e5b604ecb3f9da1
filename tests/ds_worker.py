"""Multi-process DeepSpeed checks on CPU, launched by tests/test_engine.py and tests/test_ema.py with torchrun.

One launch per world size runs every scenario (ZeRO 0/1/2/3 training with EMA, save / load, BN averaging,
micro-batch changes; with --universal-from, loading another world size's checkpoint) and writes the
results into OUT (``results_rank{r}.json`` and tensors as .pt); the tests assert on those. Assertions about
exact bits live here only where a tensor is not worth writing out.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/ds_worker.py OUT
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 1 tests/ds_worker.py OUT1 --universal-from OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.bn import average_bn_stats, bn_stat_tensors  # noqa: E402
from pipeline.config import OptimConfig, TrainConfig  # noqa: E402
from pipeline.ema import ModelEMA  # noqa: E402
from pipeline.engine import Engine, consolidate_fp32_state_dict, convert_to_universal, saved_world_size  # noqa: E402

GLOBAL_BATCH = 16
MICRO = 4
STEPS = 8
NUM_CLASSES = 4
LR = 0.02
TAG = "step-8"


def make_model(seed: int = 0) -> nn.Module:
    """A few conv layers with BN (no bias before BN, as in EfficientNet) and a linear head."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.SiLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, NUM_CLASSES))


def make_data(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable images: each class adds its own fixed pattern to noise."""
    g = torch.Generator().manual_seed(1234)
    patterns = torch.randn(NUM_CLASSES, 3, 8, 8, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    x = 0.7 * torch.randn(n, 3, 8, 8, generator=g) + patterns[y]
    return x, y


X, Y = make_data()


def step_batches(step: int, rank: int, world: int, micro: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches of global step ``step``: the same global batch at any world size and micro
    size, split rank-major (rank r takes the r-th contiguous slice), then into micro-batches."""
    start = (step * GLOBAL_BATCH) % len(X)
    per_rank = GLOBAL_BATCH // world
    lo = start + rank * per_rank
    return [(X[i:i + micro], Y[i:i + micro]) for i in range(lo, lo + per_rank, micro)]


def train_cfg(stage: int, micro: int = MICRO, precision: str = "fp32") -> TrainConfig:
    return TrainConfig(global_batch_size=GLOBAL_BATCH, micro_batch_size=micro, zero_stage=stage,
                       precision=precision, collective_timeout_s=300)


def build(stage: int, *, seed: int = 0, micro: int = MICRO, optim: str = "adamw", load_universal: bool = False,
          precision: str = "fp32") -> Engine:
    optim_cfg = OptimConfig(name=optim, weight_decay=1e-4, lr_per_256=LR * 256 / GLOBAL_BATCH)
    return Engine.build(make_model(seed), train_cfg(stage, micro, precision), optim_cfg, {},
                        micro_batch_size=micro, load_universal=load_universal)


def train_step(engine: Engine, step: int, lr: float = LR) -> float:
    """One optimizer step over this rank's micro-batches; returns the global mean loss."""
    rank, world = dist.get_rank(), dist.get_world_size()
    engine.set_lr(lr)
    losses = []
    for i, (x, y) in enumerate(step_batches(step, rank, world, engine.micro_batch_size)):
        loss = F.cross_entropy(engine(x), y)
        engine.backward(loss)
        stepped = engine.step()
        assert stepped == (i == engine.grad_accum_steps - 1), (i, stepped, engine.grad_accum_steps)
        losses.append(loss.detach())
    mean = torch.stack(losses).mean()
    dist.all_reduce(mean)
    return float(mean) / world


def full_params(engine: Engine) -> dict[str, torch.Tensor]:
    """The module's whole parameters on every rank (gathered under ZeRO-3)."""
    params = list(engine.module.named_parameters())
    with engine.gathered_parameters([p for _, p in params]):
        return {n: p.detach().clone() for n, p in params}


def eval_logits(engine: Engine) -> torch.Tensor:
    engine.eval()
    with torch.no_grad():
        out = engine(X[:8]).detach().clone()
    engine.train()
    return out


def save_tensors(obj, path: Path) -> None:
    if dist.get_rank() == 0:
        torch.save(obj, path)


# --------------------------------------------------------------------------------------------------------
# scenarios


def scenario_train(out: Path, results: dict) -> None:
    """ZeRO 0-3: training makes the loss fall; EMA (decay 0.9, TF warm-up) full weights and EMA evaluation;
    save, load into a fresh engine, continue identically; per-rank EMA state round trip; consolidation."""
    rank = dist.get_rank()
    for stage in (0, 1, 2, 3):
        engine = build(stage)
        ema = ModelEMA(engine.module, decay=0.9, gathered_parameters=engine.gathered_parameters)
        losses, norms = [], []
        for step in range(STEPS):
            losses.append(train_step(engine, step))
            norms.append(engine.grad_norm())
            ema.update(step)
        key = f"z{stage}"
        results[f"{key}_losses"] = losses
        results[f"{key}_grad_norms"] = norms
        results[f"{key}_ema_num_updates"] = ema.num_updates
        results[f"{key}_ema_sharded"] = ema.sharded
        full = ema.full_state_dict()
        save_tensors(full, out / f"ema_{key}.pt")

        # evaluation with the EMA weights: through the engine (ZeRO-3 gathers), restored afterwards
        before = eval_logits(engine)
        params_before = full_params(engine)
        with ema.swapped():
            swapped = eval_logits(engine)
        after = eval_logits(engine)
        params_after = full_params(engine)
        results[f"{key}_swap_restores_exactly"] = bool(torch.equal(before, after)) and all(
            torch.equal(params_before[n], params_after[n]) for n in params_before)
        save_tensors({"swapped": swapped, "raw": before}, out / f"eval_{key}.pt")
        save_tensors(params_after, out / f"params_{key}.pt")
        # as the trainer saves it: the cross-rank mean of the BN-statistic EMAs (each rank keeps its own)
        torch.save(ema.state_dict(buffers=ema.synced_buffers()), out / f"ema_state_{key}_rank{rank}.pt")

        # BN statistics differ per rank (each rank normalised its own samples); averaging makes them equal
        if stage == 2:
            scenario_bn(engine, out, results)

        # save, then a fresh engine (other initial weights) loads and must continue bit for bit
        ckpt = out / f"ckpt_{key}"
        average_bn_stats(engine.module)
        engine.save(ckpt, TAG, {"step": STEPS, "note": "hello"})
        cont = [train_step(engine, STEPS), train_step(engine, STEPS + 1)]
        del engine
        fresh = build(stage, seed=1)
        client = fresh.load(ckpt, TAG)
        results[f"{key}_client_state"] = {k: v for k, v in client.items() if k in ("step", "note")}
        results[f"{key}_client_has_uc_info"] = "universal_checkpoint_info" in client
        resumed = [train_step(fresh, STEPS), train_step(fresh, STEPS + 1)]
        # the lr we set is the one used: lr 0 leaves AdamW's weights (decoupled decay is lr x wd) unchanged
        before = full_params(fresh)
        train_step(fresh, STEPS + 2, lr=0.0)
        after = full_params(fresh)
        results[f"{key}_lr_zero_keeps_weights"] = all(torch.equal(before[n], after[n]) for n in before)
        results[f"{key}_lr_reported"] = fresh.get_lr()
        results[f"{key}_continue"] = cont
        results[f"{key}_resumed"] = resumed
        results[f"{key}_saved_world_size"] = saved_world_size(ckpt, TAG)
        if rank == 0:
            consolidated = consolidate_fp32_state_dict(ckpt, TAG)
            torch.save(consolidated, out / f"consolidated_{key}.pt")

        # the EMA's own state: this rank's dict back into a new EMA gives the same full weights
        ema2 = ModelEMA(fresh.module, decay=0.9, gathered_parameters=fresh.gathered_parameters)
        ema2.load_state_dict(torch.load(out / f"ema_state_{key}_rank{rank}.pt", weights_only=False))
        full2 = ema2.full_state_dict()
        if rank == 0:
            results[f"{key}_ema_state_roundtrip"] = all(torch.equal(full[k], full2[k]) for k in full)
        del fresh
        dist.barrier()


def scenario_bn(engine: Engine, out: Path, results: dict) -> None:
    world = dist.get_world_size()
    stats = [t.detach().clone() for t in bn_stat_tensors(engine.module)]
    gathered = [[torch.empty_like(t) for _ in range(world)] for t in stats]
    for t, g in zip(stats, gathered):
        dist.all_gather(g, t)
    expected = [torch.stack(g).mean(0) for g in gathered]
    results["bn_differ_before"] = any(not torch.equal(g[0], g[-1]) for g in gathered)
    n = average_bn_stats(engine.module)
    after = bn_stat_tensors(engine.module)
    results["bn_tensors_averaged"] = n
    results["bn_close_to_mean"] = all(torch.allclose(a, e, atol=1e-6) for a, e in zip(after, expected))
    check = [[torch.empty_like(t) for _ in range(world)] for t in after]
    for t, g in zip(after, check):
        dist.all_gather(g, t)
    results["bn_equal_after"] = all(torch.equal(g[0], x) for g in check for x in g)


def scenario_micro_batch(out: Path, results: dict) -> None:
    """Accumulation changes keep the global batch: the weights after two steps match one micro-batch of the
    whole per-rank batch (model in eval mode, so BN does not make micro-batches differ)."""
    per_rank = GLOBAL_BATCH // dist.get_world_size()
    for stage in (2, 3):
        runs = {}
        # micro-batch per step: the whole per-rank batch at once; 2 at a time; whole, then 4 at a time
        for name, micros in (("one_big", (per_rank, per_rank)), ("small", (2, 2)), ("changed", (per_rank, 4))):
            engine = build(stage, micro=micros[0], optim="rmsprop_tf")
            engine.module.eval()  # BN from running statistics: the gradient is a plain sum over samples
            gas = []
            for step, micro in enumerate(micros):
                engine.set_micro_batch_size(micro)
                gas.append(engine.grad_accum_steps)
                rank, world = dist.get_rank(), dist.get_world_size()
                for x, y in step_batches(step, rank, world, engine.micro_batch_size):
                    engine.backward(F.cross_entropy(engine(x), y))
                    engine.step()
                assert engine.global_batch_size == GLOBAL_BATCH
            runs[name] = full_params(engine)
            results[f"micro_z{stage}_{name}_gas"] = gas
            del engine
        ref = runs["one_big"]
        for name in ("small", "changed"):
            diff = max(float((runs[name][k] - ref[k]).abs().max()) for k in ref)
            results[f"micro_z{stage}_{name}_maxdiff"] = diff
        results[f"micro_z{stage}_moved"] = max(float((ref[k] - make_model(0).state_dict()[k]).abs().max())
                                               for k in ref)


def scenario_universal(src: Path, out: Path, results: dict) -> None:
    """A ZeRO-2 checkpoint written by another world size: convert, load with load_universal, compare."""
    ckpt = src / "ckpt_z2"
    results["universal_saved_world"] = saved_world_size(ckpt, TAG)
    uni = convert_to_universal(ckpt, TAG, out / "ckpt_z2_universal" / TAG)
    engine = build(2, seed=3, load_universal=True)
    client = engine.load(uni.parent, uni.name)
    results["universal_client_step"] = client.get("step")
    reference = consolidate_fp32_state_dict(ckpt, TAG)
    params = full_params(engine)
    results["universal_weights_maxdiff"] = max(float((params[k] - reference[k]).abs().max()) for k in params)
    # same global batches as the saving run's continuation: same micro-batch composition, same updates
    results["universal_continue"] = [train_step(engine, STEPS), train_step(engine, STEPS + 1)]

    # the sharded ZeRO-3 EMA of the other world size, re-sharded here from all its ranks' files
    files = sorted(src.glob("ema_state_z3_rank*.pt"))
    states = [torch.load(f, weights_only=False) for f in files]
    for stage in (3, 2):
        e = build(stage)
        ema = ModelEMA(e.module, decay=0.9, gathered_parameters=e.gathered_parameters)
        ema.load_state_dict(states)
        full = ema.full_state_dict()
        save_tensors(full, out / f"ema_resharded_into_z{stage}.pt")
        del e


def scenario_channels_last(results: dict) -> None:
    """A model whose conv weights are channels_last (``model.to(memory_format=torch.channels_last)``, as timm
    users do) builds at every ZeRO stage: the engine makes its parameters contiguous before DeepSpeed's
    byte-view broadcast, says so once, and trains exactly like the contiguous model."""
    import logging

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    handler = Collect()
    engine_log = logging.getLogger("pipeline.engine")
    engine_log.addHandler(handler)
    try:
        for stage in (0, 1, 2, 3):
            model = make_model(0).to(memory_format=torch.channels_last)
            key = f"cl_z{stage}"
            results[f"{key}_channels_last_before"] = sum(
                1 for p in model.parameters() if p.dim() == 4 and not p.is_contiguous())
            handler.messages.clear()
            optim_cfg = OptimConfig(name="adamw", weight_decay=1e-4, lr_per_256=LR * 256 / GLOBAL_BATCH)
            engine = Engine.build(model, train_cfg(stage), optim_cfg, {}, micro_batch_size=MICRO)
            results[f"{key}_messages"] = [m for m in handler.messages if "contiguous" in m]
            results[f"{key}_losses"] = [train_step(engine, step) for step in range(2)]
            results[f"{key}_contiguous_after"] = all(p.is_contiguous() for p in full_params(engine).values())
            # ZeRO 1/2 turn the parameters into views of their flat buffers (one per param group), so no
            # parameter layout of the user's would survive initialize anyway
            params = list(engine.module.parameters())
            results[f"{key}_storages"] = len({p.untyped_storage().data_ptr() for p in params})
            results[f"{key}_params"] = len(params)
            results[f"{key}_param_groups"] = len(engine.optimizer.param_groups)
            del engine
    finally:
        engine_log.removeHandler(handler)


def scenario_bf16(out: Path, results: dict) -> None:
    """DeepSpeed accepts our autocast section (bf16 on CPU) and trains; bf16 weights (BN included) train at
    ZeRO 0 and 2 with fp32 inputs, and their consolidated checkpoint holds the fp32 master weights."""
    engine = build(2, precision="bf16")
    results["bf16_losses"] = [train_step(engine, s) for s in range(3)]
    results["bf16_param_dtype"] = str(next(engine.module.parameters()).dtype)
    del engine
    for stage in (0, 2):
        engine = build(stage, precision="bf16_weights")
        results[f"bf16w_z{stage}_losses"] = [train_step(engine, s) for s in range(3)]
        results[f"bf16w_z{stage}_dtypes"] = sorted({str(t.dtype) for t in engine.module.state_dict().values()})
        engine.save(out / "ckpt_bf16w", f"z{stage}", {})
        full = consolidate_fp32_state_dict(out / "ckpt_bf16w", f"z{stage}")
        w = full["0.weight"]
        results[f"bf16w_z{stage}_consolidated_fp32_master"] = (
            w.dtype == torch.float32 and not torch.equal(w, w.bfloat16().float())
            and torch.equal(w.bfloat16(), dict(engine.module.named_parameters())["0.weight"].detach()))
        del engine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--universal-from", default=None)
    parser.add_argument("--only", default=None,
                        help="comma-separated scenarios (train, micro, universal, bf16, channels_last)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else {"train", "micro", "universal", "bf16", "channels_last"}
    results: dict = {}
    # the first engine starts the process group
    build(0)
    rank, world = dist.get_rank(), dist.get_world_size()
    results["world_size"] = world
    if "train" in only:
        scenario_train(out, results)
    if "micro" in only:
        scenario_micro_batch(out, results)
    if "universal" in only and args.universal_from:
        scenario_universal(Path(args.universal_from), out, results)
    if "bf16" in only and world == 1:
        scenario_bf16(out, results)
    if "channels_last" in only:
        scenario_channels_last(results)
    (out / f"results_rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from pipeline.distributed import exit_process  # noqa: E402

    main()
    exit_process(0)
