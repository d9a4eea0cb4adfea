"""Train a diffusion model on fastMRI-format k-space (upstream improved-diffusion's image_train.py).

Works unchanged as a plain process, under ``mpiexec -n N`` and under ``torchrun --nproc_per_node N``::

    python scripts/image_train.py --data_dir demo_data/singlecoil_train,demo_data/multicoil_train \\
        --log_dir logs/run1 --image_size 128 --num_channels 64 --batch_size 4 --ema_rate 0.9999,0.999 \\
        --ema_warmup True

Every flag is listed by ``--help``; docs/training.md explains them, the checkpoint files and resuming.
"""

import argparse
import gc
import hashlib
import json
import os
import random
import sys
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from improved_diffusion import dist_util, logger
from improved_diffusion.augment import AUGMENT_HELP, AugmentConfig, augment_defaults, config_from_flags
from improved_diffusion.checkpoint import CheckpointSaveError, find_resume_checkpoint
from improved_diffusion.fastmri_data import BadFileError, FileInfo, index_data, load_data
from improved_diffusion.io_util import atomic_write_text
from improved_diffusion.optim_util import PRECISIONS
from improved_diffusion.resample import create_named_schedule_sampler
from improved_diffusion.script_util import (
    MODEL_AND_DIFFUSION_CHOICES,
    MODEL_AND_DIFFUSION_HELP,
    UPSTREAM_TRAIN_FLAGS,
    HelpFormatter,
    add_dict_to_argparser,
    add_upstream_flags,
    args_to_dict,
    create_model_and_diffusion,
    downsampling_factor,
    load_config,
    model_and_diffusion_defaults,
    parse_size,
    save_config,
    upstream_flag_notes,
)
from improved_diffusion.train_util import NonFiniteLossError, TrainLoop

# Test hook: when set, every rank writes <log_dir>/rank_report_<rank>.json (hash of its final parameters and
# the files it read), so the distributed tests can check gradient sync and data sharding.
RANK_REPORT_ENV = "IMPROVED_DIFFUSION_RANK_REPORT"


def train_defaults() -> Dict[str, Any]:
    """Training flags (besides model_and_diffusion_defaults)."""
    return dict(
        data_dir="",
        log_dir="",
        schedule_sampler="uniform",
        lr=1e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,
        max_steps=0,
        batch_size=1,
        microbatch=-1,  # -1 disables microbatches
        ema_rate="0.9999",  # comma-separated list of EMA values
        ema_warmup=False,
        log_interval=10,
        save_interval=10000,
        resume_checkpoint="",
        use_fp16=False,
        precision="",  # fp32 | fp16 | bf16; empty: fp16 if use_fp16 else fp32
        max_nan_steps=10,
        seed=0,
        crop_size="",  # "" (full slices), "128" or "128,96"
        skip_edge_slices=0,
        num_workers=0,
        on_bad_file="error",
        deterministic=False,
    )


TRAIN_HELP: Dict[str, str] = {
    "data_dir": "folder of fastMRI-format h5 files (searched recursively; docs/data.md)",
    "log_dir": "run folder for checkpoints, config.json and logs ('' = $OPENAI_LOGDIR or a temp folder)",
    "schedule_sampler": "how training timesteps are drawn",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "lr_anneal_steps": "anneal the learning rate linearly to 0 over this many steps (0: constant)",
    "max_steps": "stop after this many steps (0: run until stopped, or until lr_anneal_steps)",
    "batch_size": "slices per step per rank",
    "microbatch": "split each batch into chunks of this size for the backward passes (-1: no split)",
    "ema_rate": "comma list of EMA decay rates; one EMA checkpoint is kept per rate",
    "ema_warmup": "ramp the EMA decay up over the first steps (min(rate, (1 + step) / (10 + step)))",
    "log_interval": "steps between log lines",
    "save_interval": "steps between checkpoints",
    "resume_checkpoint": "model%%06d.pt to resume from, or a log folder (its newest complete checkpoint "
    "set); '' = start fresh",
    "use_fp16": "fp16 mixed precision (alias of --precision fp16)",
    "precision": "fp32, fp16 or bf16 ('' = fp16 if use_fp16 else fp32)",
    "max_nan_steps": "stop after this many consecutive steps with a non-finite loss",
    "seed": "seed of the model initialization, data order and timesteps",
    "crop_size": "'' (full slices), 'N' or 'H,W': centre crop of the training images",
    "skip_edge_slices": "leave out this many slices at each end of every volume",
    "num_workers": "data-loader worker processes",
    "on_bad_file": "error: refuse to start on a bad file; skip: leave bad files out with one line each",
    "deterministic": "deterministic cuDNN/torch algorithms (slower; for reproducibility checks)",
}
TRAIN_CHOICES: Dict[str, Sequence[Any]] = {
    "schedule_sampler": ("uniform", "loss-second-moment"),
    "precision": ("", *PRECISIONS),
    "on_bad_file": ("error", "skip"),
}


def create_argparser() -> argparse.ArgumentParser:
    defaults = train_defaults()
    defaults.update(augment_defaults())  # augmentation and patches (docs/training.md); default: none
    defaults.update(model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    add_dict_to_argparser(
        parser,
        defaults,
        help_texts={**TRAIN_HELP, **AUGMENT_HELP, **MODEL_AND_DIFFUSION_HELP},
        choices={**TRAIN_CHOICES, **MODEL_AND_DIFFUSION_CHOICES},
    )
    add_upstream_flags(parser, UPSTREAM_TRAIN_FLAGS)  # so copy-pasted upstream commands run
    return parser


def print_error(err: BaseException) -> None:
    """``error: <line>`` on stderr for each line of ``err`` (rank 0 only; no traceback)."""
    if dist_util.is_main_process():
        for line in str(err).splitlines():
            print(f"error: {line}", file=sys.stderr, flush=True)


def augment_config(args: argparse.Namespace) -> AugmentConfig:
    """The augmentation flags as a config; a patch must suit the UNet (a multiple of its downsampling).

    Raises:
        ValueError: a bad flag, in one line.
    """
    config = config_from_flags(vars(args))
    factor = downsampling_factor(vars(args))
    if config.patch_size % factor:
        raise ValueError(
            f"--patch_size {config.patch_size} must be a multiple of {factor}: the UNet "
            f"(channel_mult {args.channel_mult or 'default'}) halves its input "
            f"{factor.bit_length() - 1} times"
        )
    return config


def index_training_files(args: argparse.Namespace, crop_size: Any, patch_size: int = 0) -> List[FileInfo]:
    """The index pass over every rank's files, before anything is built; rank 0 prints every rank's lines.

    Raises:
        ValueError: (or BadFileError) on every rank when some rank's shard has a bad file (in ``error``
            mode, one line per bad file) or no usable one, so no rank goes on alone.
    """
    notes: List[str] = []
    files, problem = None, None
    try:
        files = index_data(
            data_dir=args.data_dir,
            batch_size=args.batch_size,
            crop_size=crop_size,
            skip_edge_slices=args.skip_edge_slices,
            on_bad_file=args.on_bad_file,
            report=notes.append,
            patch_size=patch_size,
        )
    except ValueError as err:  # BadFileError is a ValueError
        problem = str(err)
    gathered = dist_util.all_gather_object((notes, problem))
    if dist_util.is_main_process():
        for rank_notes, _ in gathered:
            for line in rank_notes:
                print(line, file=sys.stderr, flush=True)
    problems = [p for _, p in gathered if p is not None]
    if problems:
        raise BadFileError("\n".join(problems))
    return files


def choose_log_dir(log_dir: str) -> str:
    """--log_dir, else OPENAI_LOGDIR, else a new temp folder; rank 0's choice is used by every rank."""
    chosen = None
    if dist_util.is_main_process():
        logger.configure(dir=log_dir or None)
        chosen = logger.get_dir()
    chosen = dist_util.broadcast_object(chosen)
    if not dist_util.is_main_process():
        logger.configure(dir=chosen)
    return chosen


def check_config_matches(folder: str, model_config: Dict[str, Any], advice: str) -> None:
    """The config.json in ``folder``, if there is one, must describe the same model and diffusion.

    Raises:
        ValueError: one line listing the differing keys, then ``advice``.
    """
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return
    old = load_config(folder)
    diffs = [f"{k}: {old[k]!r} -> {v!r}" for k, v in model_config.items() if k in old and old[k] != v]
    if diffs:
        raise ValueError(
            f"{folder}/config.json was written for another model/diffusion ({'; '.join(diffs)}); {advice}"
        )


def check_resume(args: argparse.Namespace, model_config: Dict[str, Any]) -> None:
    """Before anything is written: the checkpoint to resume exists, and the config.json of its run and of
    the log dir resumed into describe the model and diffusion of the flags.

    Raises:
        ValueError: in one line.
    """
    if not args.resume_checkpoint:
        return
    try:
        found = find_resume_checkpoint(args.resume_checkpoint)
    except FileNotFoundError as err:
        raise ValueError(str(err)) from None
    log_dir = args.log_dir or os.environ.get("OPENAI_LOGDIR", "")
    if log_dir:
        check_config_matches(log_dir, model_config, "use the same flags or a new --log_dir")
    if found is not None:
        run_dir = os.path.dirname(os.path.abspath(found.model))
        check_config_matches(run_dir, model_config, "resume with that run's model and diffusion flags")


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resume_step(resume_checkpoint: str, ema_rates: List[float]) -> int:
    """Step of the checkpoint that --resume_checkpoint will load (0 for none); decided on rank 0."""
    step = 0
    if resume_checkpoint and dist_util.is_main_process():
        try:
            found = find_resume_checkpoint(resume_checkpoint, ema_rates)
            step = found.step if found is not None else 0
        except (OSError, ValueError):
            step = 0  # TrainLoop reports the problem
    return int(dist_util.broadcast_object(step))


def recording(data: Iterator[Tuple[torch.Tensor, Dict[str, Any]]], seen: set) -> Iterator:
    """Pass batches through, remembering the file names they came from."""
    for batch, kwargs in data:
        seen.update(os.path.basename(f) for f in kwargs.get("fname", []))
        yield batch, kwargs


def param_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the parameters' bytes in name order (equal across ranks iff the weights are)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = create_argparser().parse_args(argv)
    if not args.data_dir:
        raise SystemExit("error: --data_dir is required (a folder of fastMRI-format .h5 files)")
    try:
        crop_size = parse_size(args.crop_size, "--crop_size")
        augment = augment_config(args)
        dist_util.setup_dist()
    except (ValueError, dist_util.LauncherError) as err:
        print_error(err)
        raise SystemExit(2) from None
    rank = dist_util.get_rank()
    # The index pass and the resume check come first: a bad file or a checkpoint of another model stops the
    # run before a model is built or a log dir written.
    model_config = args_to_dict(args, model_and_diffusion_defaults().keys())
    try:
        files = index_training_files(args, crop_size, augment.patch_size)
        check_resume(args, model_config)
    except ValueError as err:
        print_error(err)
        dist_util.cleanup_dist()
        raise SystemExit(2) from None

    log_dir = choose_log_dir(args.log_dir)
    logger.log(
        f"launcher: {dist_util.launcher()}, world size {dist_util.get_world_size()}, device {dist_util.dev()}"
    )
    for note in upstream_flag_notes(args, UPSTREAM_TRAIN_FLAGS):
        logger.log(note)
    logger.log(f"data: {len(files)} files, {sum(f.num_slices for f in files)} slices on this rank")
    if augment.enabled:
        on = ", ".join(f"{n} p={p:g}" for n, p in augment.probabilities) or "none"
        patch = f"{augment.patch_size}x{augment.patch_size} patches" if augment.patch_size else "whole slices"
        logger.log(f"augmentation: {on}; {patch}; seed {augment.seed}")

    if dist_util.is_main_process():
        save_config({**vars(args), "log_dir": log_dir}, log_dir)
    dist_util.barrier()

    # Different seeds per rank: each rank draws its own timesteps and noise (its data shard differs anyway).
    seed_everything(args.seed + rank)

    logger.log("creating model and diffusion...")
    model, diffusion = create_model_and_diffusion(**model_config)
    model.to(dist_util.dev())
    schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)
    n_params = sum(p.numel() for p in model.parameters())
    logger.log(f"model: {n_params / 1e6:.2f} M parameters")

    logger.log("creating data loader...")
    start = resume_step(args.resume_checkpoint, [float(r) for r in str(args.ema_rate).split(",") if r])
    data = load_data(
        files=files,
        batch_size=args.batch_size,
        crop_size=crop_size,
        deterministic=args.deterministic,
        skip_edge_slices=args.skip_edge_slices,
        num_workers=args.num_workers,
        on_bad_file=args.on_bad_file,
        # A resumed run shuffles differently from the run it continues instead of replaying its first batches.
        seed=args.seed + start,
        report=lambda line: print(line, file=sys.stderr, flush=True),
        augment=augment,
        # a resumed run draws new augmentations instead of replaying those of the run it continues
        augment_stream=start,
    )
    report = os.environ.get(RANK_REPORT_ENV) == "1"
    seen_files: set = set()
    if report:
        data = recording(data, seen_files)
        initial_digest = param_digest(model)

    logger.log("training...")
    try:
        loop = TrainLoop(
            model=model,
            diffusion=diffusion,
            data=data,
            batch_size=args.batch_size,
            microbatch=args.microbatch,
            lr=args.lr,
            ema_rate=args.ema_rate,
            log_interval=args.log_interval,
            save_interval=args.save_interval,
            resume_checkpoint=args.resume_checkpoint,
            use_fp16=args.use_fp16,
            precision=args.precision,
            schedule_sampler=schedule_sampler,
            weight_decay=args.weight_decay,
            lr_anneal_steps=args.lr_anneal_steps,
            max_steps=args.max_steps,
            max_nan_steps=args.max_nan_steps,
            ema_warmup=args.ema_warmup,
            log_dir=log_dir,
        )
    except (ValueError, FileNotFoundError) as err:  # a flag TrainLoop refuses, a checkpoint it cannot load
        print_error(err)
        dist_util.cleanup_dist()
        raise SystemExit(2) from None
    try:
        loop.run_loop()
    except NonFiniteLossError as err:
        logger.log(f"error: {err}")
        dist_util.cleanup_dist()
        raise SystemExit(f"error: {err}") from None
    except CheckpointSaveError as err:  # e.g. a full disk; the incomplete set is already removed
        logger.log(f"error: {err}")
        print_error(err)
        raise SystemExit(2) from None
    except BadFileError as err:  # a slice found bad while reading (NaN/inf, all zero, unreadable chunk)
        logger.log(f"error: {err}")
        if dist_util.get_world_size() == 1 and 0 < loop.step != loop.last_saved_step:
            try:
                loop.save()  # the bad batch never reached the model; keep the steps done so far
            except CheckpointSaveError as save_err:
                print_error(save_err)
        print(f"error: {err} (--on_bad_file skip leaves such files out)", file=sys.stderr, flush=True)
        raise SystemExit(2) from None

    # Free DDP's reducer (and its pending gloo work) before the process group goes: a gloo group torn down
    # while DDP still holds work can abort the interpreter at exit ("terminate called without an active
    # exception"), intermittently, under torchrun.
    del loop
    gc.collect()
    if report:
        path = os.path.join(log_dir, f"rank_report_{rank}.json")
        report_data = {
            "rank": rank,
            "initial_params_sha256": initial_digest,
            "params_sha256": param_digest(model),
            "files": sorted(seen_files),
        }
        atomic_write_text(path, json.dumps(report_data))
    dist_util.barrier()
    dist_util.cleanup_dist()


if __name__ == "__main__":
    main()
