#!/usr/bin/env bash
# Stage 2 of checkpoints/demo (README "Train"): fine-tune the stage-1 EMA weights (step 2321) with the
# synthesized contrasts/orientations and augmentations. Run from the repository root after
#   .venv/bin/python datasets/make_demo_data.py
#   .venv/bin/python datasets/make_demo_data.py --output_dir prior_data --kinds singlecoil \
#       --contrasts t1,t2,pd,flair --orientations axial,coronal,sagittal --synth_volumes 2 --synth_holdout slab
#   mkdir -p logs/ft && cp <stage-1 ema_0.999_002321.pt> logs/ft/model002321.pt && cp <same> logs/ft/ema_0.999_002321.pt
# It was stopped with SIGTERM at step 4018 (a complete checkpoint set is saved) and resumed twice with
# --resume_checkpoint logs/ft (to step 6116, then past step 7000); the committed EMA is that of step 7000.
set -euo pipefail
cd "$(dirname "$0")/../.."
OMP_NUM_THREADS=1 exec .venv/bin/python scripts/image_train.py \
  --data_dir demo_data/singlecoil_train,demo_data/multicoil_train,prior_data/singlecoil_synth_train \
  --log_dir logs/ft --image_size 128 --num_channels 32 --channel_mult 1,1,2,2,2 --num_res_blocks 2 \
  --attention_resolutions 16,8 --batch_size 4 --lr 1e-4 --ema_rate 0.999 --ema_warmup False \
  --augment flip,rot90,rotate,scale,elastic,bias,phase,gain --augment_seed 1 \
  --log_interval 100 --save_interval 500 --max_steps 20000 --resume_checkpoint logs/ft/model002321.pt
