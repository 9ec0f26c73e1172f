"""Preference training of diffusion models: Diffusion-DPO, RankDPO, BalancedDPO and SFT on Ray Train.

One explicit loop. ``train_func(config)`` is the ``train_loop_per_worker`` of a ``TorchTrainer``;
it reads this worker's shard of the preference Parquet (``raypref.prefdata`` layout) through
``ray.train.get_dataset_shard("train")`` and calls :func:`train_step` once per optimizer step.
:func:`train_step` is a plain function of a :class:`TrainState` and a list of micro-batches of rows,
so tests and benchmarks drive it without Ray.

Design choices (why):

- One forward pass per micro-batch: the images of every prompt that the method needs are stacked
  into one ``[N, C, H, W]`` batch (``N = sum of images per prompt``, e.g. ``B * K``). All images
  of a prompt share one noise draw and one timestep, as Diffusion-DPO / RankDPO require.
- Noise and t are keyed by ``(data.seed, step, prompt_id)``, never by worker or micro-batch, so
  the update does not depend on how rows are split across workers or accumulation steps.
- The loss is ``sum(per-prompt losses) / (prompts in the global step)`` and gradients are SUMMED
  over workers with ``all_reduce`` (as in ``raypref.pretrain``): the update is exactly that of one
  worker holding the global batch. No DDP wrapper, because the reference forward runs through the
  same module with LoRA disabled (DDP's reducer expects one forward per backward).
- Reference model (``raypref.train_state``): LoRA -> the same network with adapters disabled; full
  fine-tuning -> a frozen copy of the denoiser swapped in for the reference forward.
- Mixed precision: autocast bf16 (or fp16 with a GradScaler) only on CUDA devices that support it;
  CPU always runs fp32. Per-sample errors are computed in fp32 (``per_sample_error``).
- Non-finite loss: every worker raises ``FloatingPointError`` naming the step before the optimizer
  step, so no checkpoint of a poisoned model is ever written.
- Resume: the checkpoint holds the trainable tensors, optimizer, step and (after a refresh) the
  reference; the data stream restarts at an epoch boundary (noise is keyed by step, so it is fresh).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any, Callable, Iterable, Iterator

import torch

from raypref.diffusion import per_sample_error
from raypref.losses import (
    balanced_dpo_loss, diffusion_dpo_loss, dpo_metrics, rank_dpo_loss, rank_pair_accuracy, sft_loss,
)
from raypref.raytrain import torch_trainer
from raypref.train_config import METHODS, PRESETS, TrainConfig
from raypref.collate import COLUMNS, collate
from raypref.train_state import (
    TrainState,
    autocast,
    build_state,
    export_model,
    load_checkpoint,
    phase,
    reference_mode,
    refresh_reference,
    save_checkpoint,
)

TRAIN_STATE = "train_state.pt"
METRIC_KEYS = {  # per-prompt means reported each step (dpo_metrics' keys for the pairwise methods)
    "pairwise": (
        "loss",
        "pref_loss",
        "implicit_acc",
        "margin",
        "reward_w",
        "reward_l",
        "kl_proxy",
        "policy_err",
        "ref_err",
    ),
    "sft": ("loss", "policy_err"),
}
LORA_DIR = "lora"
PIPELINE_DIR = "pipeline"


def errors(state: TrainState, batch: dict, reference: bool = False) -> torch.Tensor:
    """Per-image denoising error [N] of the policy (with grad) or the reference (no grad)."""
    pipe = state.pipe
    schedule = pipe.noise_schedule()
    x_t = schedule.add_noise(batch["x0"], batch["noise"], batch["t"])
    target = schedule.target(batch["x0"], batch["noise"], batch["t"])
    if reference:
        with torch.no_grad(), reference_mode(state), autocast(state):
            pred = pipe.predict(x_t, batch["t"], batch["cond"])
    else:
        with autocast(state):
            pred = pipe.predict(x_t, batch["t"], batch["cond"])
    return per_sample_error(pred, target)


def batch_loss(state: TrainState, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(sum over prompts of per-prompt losses, metrics as local means) for one forward batch."""
    cfg = state.cfg.loss
    n_rows = batch["n_rows"]
    if cfg.method == "sft":
        with phase(state, "forward_policy"):
            err = errors(state, batch)
        per_row = torch.zeros(n_rows, device=err.device).index_add(0, batch["row"], err)
        counts = torch.zeros(n_rows, device=err.device).index_add(0, batch["row"], torch.ones_like(err))
        loss = sft_loss(per_row / counts)
        return loss.sum(), {"loss": loss.detach().mean(), "policy_err": err.detach().mean()}
    with phase(state, "forward_reference"):
        ref = errors(state, batch, reference=True)  # reference first: adapters toggled outside the graph
    with phase(state, "forward_policy"):
        err = errors(state, batch)
    if cfg.method == "rankdpo":
        b, k = batch["phi"].shape
        e, r, phi = err.view(b, k), ref.view(b, k), batch["phi"]
        loss = rank_dpo_loss(e, r, phi, cfg.beta / 2, weights=cfg.rank_weights)
        best, worst = phi.argmax(1, keepdim=True), phi.argmin(1, keepdim=True)
        m = dpo_metrics(e.gather(1, best)[:, 0], e.gather(1, worst)[:, 0], r.gather(1, best)[:, 0],
                        r.gather(1, worst)[:, 0], cfg.beta)
        m["implicit_acc"] = rank_pair_accuracy(e.detach(), r, phi)
        m["pref_loss"] = loss.detach().mean()  # "loss" less the sft_weight term
        if cfg.sft_weight > 0:
            loss = loss + cfg.sft_weight * e.gather(1, best)[:, 0]
        m["loss"] = loss.detach().mean()
        return loss.sum(), m
    w, lo, prow = batch["pairs"].unbind(1)
    fn = balanced_dpo_loss if cfg.method == "balanced" else diffusion_dpo_loss
    kwargs = {"vote_weight": batch["pair_w"]} if cfg.method == "balanced" else {"label": batch["pair_label"]}
    pair_loss = fn(err[w], err[lo], ref[w], ref[lo], cfg.beta, **kwargs)
    if cfg.method == "dpo":
        pair_loss = pair_loss * batch["pair_w"]
    # each prompt counts once: mean over its pairs
    n_pairs = torch.zeros(n_rows, device=err.device).index_add(0, prow, torch.ones_like(pair_loss))
    per_row = torch.zeros(n_rows, device=err.device).index_add(0, prow, pair_loss) / n_pairs
    m = dpo_metrics(err[w], err[lo], ref[w], ref[lo], cfg.beta)
    m["pref_loss"] = per_row.detach().mean()  # "loss" less the sft_weight term
    if cfg.sft_weight > 0:  # mean winner error over the prompt's pairs
        per_row = (
            per_row + cfg.sft_weight * torch.zeros(n_rows, device=err.device).index_add(0, prow, err[w]) / n_pairs
        )
    m["loss"] = per_row.detach().mean()
    return per_row.sum(), m


def lr_factor(step: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then constant (the Diffusion-DPO schedule)."""
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def _world() -> tuple[int, Any]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_world_size(), dist
    return 1, None


def train_step(state: TrainState, micro_batches: list[list[dict]]) -> dict[str, float] | None:
    """One optimizer step over ``grad_accum`` micro-batches of rows (this worker's share).

    Loss = sum of per-prompt losses / prompts in the GLOBAL step; gradients summed over workers.
    Returns metrics averaged over all workers' prompts, or None when no worker had a usable row
    (no update, step not advanced). Raises FloatingPointError on a non-finite loss, before the
    optimizer step, on every worker.
    """
    world, dist = _world()
    batches = [collate(rows, state) for rows in micro_batches]
    skipped = sum(b["skipped"] for b in batches)
    n_local = sum(b["n_rows"] for b in batches)
    counts = torch.tensor([float(n_local), float(skipped)], dtype=torch.float64)
    if dist is not None:
        dist.all_reduce(counts)
    n_global = int(counts[0].item())
    state.skipped_rows += int(counts[1].item())
    if n_global == 0:
        return None
    for g in state.optimizer.param_groups:
        g["lr"] = state.cfg.optim.lr * lr_factor(state.step, state.cfg.optim.warmup_steps)
    state.optimizer.zero_grad(set_to_none=True)
    loss_total = torch.zeros((), dtype=torch.float64)
    sums: dict[str, float] = {}
    for b in batches:
        if b["n_rows"] == 0:
            continue
        loss_sum, metrics = batch_loss(state, b)
        loss = loss_sum / n_global
        loss_total += loss.detach().double().cpu()
        with phase(state, "backward"):
            (state.scaler.scale(loss) if state.scaler else loss).backward()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) * b["n_rows"]
    keys = METRIC_KEYS["sft" if state.cfg.loss.method == "sft" else "pairwise"]  # same on every worker
    stats = torch.tensor([loss_total.item()] + [sums.get(k, 0.0) for k in keys], dtype=torch.float64)
    if dist is not None:
        dist.all_reduce(stats)
    if not math.isfinite(stats[0].item()):
        raise FloatingPointError(
            f"non-finite loss {stats[0].item()} at step {state.step + 1}; stopping before the optimizer step, "
            f"no checkpoint written for this step")
    if dist is not None:
        for p in state.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
    with phase(state, "optimizer"):
        if state.scaler:
            state.scaler.unscale_(state.optimizer)
        gnorm = torch.nn.utils.clip_grad_norm_(
            state.params, state.cfg.optim.grad_clip if state.cfg.optim.grad_clip > 0 else float("inf"))
        if state.scaler:
            state.scaler.step(state.optimizer)
            state.scaler.update()
        else:
            state.optimizer.step()
    state.step += 1
    every = state.cfg.loss.ref_refresh_every
    if every and state.step % every == 0:
        refresh_reference(state)
    out = {"step": state.step, "loss": stats[0].item(), "grad_norm": float(gnorm),
           "lr": state.optimizer.param_groups[0]["lr"], "prompts": n_global, "skipped_rows": state.skipped_rows}
    out.update({k: v / n_global for k, v in zip(keys, stats[1:].tolist()) if k != "loss"})
    return out


def micro_batches(rows_iter: Iterable[list[dict]], grad_accum: int) -> Iterable[list[list[dict]]]:
    """Group micro-batches of rows into optimizer steps of ``grad_accum`` micro-batches."""
    group = []
    for rows in rows_iter:
        group.append(rows)
        if len(group) == grad_accum:
            yield group
            group = []


def run_loop(state: TrainState, epoch_rows: Callable[[], Iterable[list[dict]]],
             report: Callable[[dict, str | None], None], rank: int = 0) -> None:
    """Train until ``optim.max_steps``. ``epoch_rows()`` yields one epoch of micro-batches (lists of
    row dicts); ``report(metrics, checkpoint_dir_or_None)`` is called by every worker (only rank 0
    passes a directory). A directory is only valid during the call."""
    cfg = state.cfg
    started = time.time()
    while state.step < cfg.optim.max_steps:
        stepped = False
        for group in micro_batches(epoch_rows(), cfg.optim.grad_accum):
            metrics = train_step(state, group)
            if metrics is None:
                continue
            stepped = True
            metrics["elapsed_s"] = time.time() - started
            last = state.step >= cfg.optim.max_steps
            if state.step % cfg.run.checkpoint_every == 0 or last:
                if rank == 0:
                    with tempfile.TemporaryDirectory() as d:
                        save_checkpoint(state, d)
                        report(metrics, d)
                else:
                    report(metrics, None)
            elif state.step % cfg.run.log_every == 0:
                report(metrics, None)
            if last:
                break
        if not stepped:
            raise ValueError(f"an epoch of {cfg.data.path} gave no usable row for method {cfg.loss.method!r} "
                             f"({state.skipped_rows} rows skipped)")


def cached_epochs(read_epoch: Callable[[], Iterable[list[dict]]]) -> Callable[[], Iterator[list[dict]]]:
    """``read_epoch`` (one pass over the data, e.g. a Ray Data shard) read once, then replayed from
    memory in the same order. An epoch abandoned part-way (training stopped) is not replayed: the next
    call reads again, so a replay is always a complete epoch."""
    cached: list[list[dict]] = []
    complete = False

    def epochs():
        nonlocal complete
        if complete:
            yield from cached
            return
        cached.clear()
        for rows in read_epoch():
            cached.append(rows)
            yield rows
        complete = True

    return epochs


def train_func(config: dict) -> None:
    """Ray Train worker loop. ``config``: {"cfg": TrainConfig}."""
    import ray.train
    import ray.train.torch

    cfg: TrainConfig = config["cfg"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(max(1, int(cfg.run.cpus_per_worker)))
    device = ray.train.torch.get_device() if cfg.run.use_gpu else torch.device("cpu")
    state = build_state(cfg, device=device)
    world, dist = _world()
    if dist is not None:  # what DDP does at wrap time: every worker starts from rank 0's weights
        with torch.no_grad():
            for p in state.params:
                dist.broadcast(p.data, src=0)
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            load_checkpoint(state, d)
    shard = ray.train.get_dataset_shard("train")

    def read_epoch():
        for batch in shard.iter_batches(batch_size=cfg.micro_batch_size, batch_format="pyarrow", drop_last=True):
            yield batch.to_pylist()

    epoch_rows = read_epoch if cfg.data.cache == "none" else cached_epochs(read_epoch)

    def report(metrics, directory):
        checkpoint = ray.train.Checkpoint.from_directory(directory) if directory else None
        ray.train.report(metrics, checkpoint=checkpoint)

    run_loop(state, epoch_rows, report, rank)
    if rank == 0 and cfg.run.export_dir:
        export_model(state, os.path.expanduser(cfg.run.export_dir))


def read_data(cfg: TrainConfig):
    """The preference Parquet as a Ray Dataset (the columns training reads). Pick-a-Pic-layout data is
    checked row by row first (a bad row is an error naming file, row and column before any step) and
    converted to K = 2 rows as it streams."""
    import ray

    from raypref import pickapic

    path = cfg.data.path if "://" in cfg.data.path else os.path.abspath(os.path.expanduser(cfg.data.path))
    fmt = cfg.data.format
    if fmt == "auto":
        fmt = "raypref" if "://" in path else pickapic.detect_format(path)
    if fmt == "pickapic":
        pickapic.check(path, keep_ties=cfg.data.ties == "keep")
        return pickapic.read(path).map_batches(pickapic.to_rows, batch_format="pyarrow", batch_size=64,
                                               fn_kwargs={"ties": cfg.data.ties})
    return ray.data.read_parquet(path).select_columns(COLUMNS)


def build_trainer(cfg: TrainConfig, dataset=None):
    """A TorchTrainer for ``cfg``; resources come from the config, never hard-coded."""
    return torch_trainer(
        train_func, {"cfg": cfg}, cfg.run, {"train": dataset if dataset is not None else read_data(cfg)}
    )


def parse_config(argv: list[str] | None = None, description: str | None = None) -> TrainConfig:
    """Preset -> YAML (--config) -> --method -> section.key=value overrides."""
    from raypref.config import job_parser, load_config, merge

    parser = job_parser(description or __doc__.split("\n")[0], PRESETS)
    parser.add_argument("--method", choices=METHODS, help="shorthand for loss.method=...")
    args = parser.parse_args(argv)
    cfg = load_config(PRESETS[args.preset](), args.config)
    if args.method:
        cfg = merge(cfg, {"loss": {"method": args.method}})
    return load_config(cfg, None, args.overrides)


def main(argv: list[str] | None = None, description: str | None = None) -> dict:
    """The preference-training job: parse the config, join (or start) Ray, fit, print the result."""
    import ray

    from raypref.config import to_dict

    cfg = parse_config(argv, description)
    print(json.dumps(to_dict(cfg), indent=1))
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))  # a running cluster if any, else a local one
    result = build_trainer(cfg).fit()
    out = {"metrics": result.metrics, "checkpoint": result.checkpoint.path if result.checkpoint else None}
    print(json.dumps(out, indent=1, default=str))
    return out
