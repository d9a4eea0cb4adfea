#!/bin/bash
# Ingredient ablation (issue 9): 250 fine-tuning steps from the stage-1 EMA (step 2321) per variant,
# fresh AdamW, lr 1e-4, EMA 0.99, batch 4 (patches: 16 x 64^2, the same pixels per step), seed 0, augment seed 1.
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD
PY=.venv/bin/python
A=${1:-logs/ablation}  # output folder
STAGE1=${STAGE1:-logs/ft/ema_0.999_002321.pt}  # the stage-1 EMA (not committed; the fine-tune of checkpoints/demo resumed from it)
COMMON="--image_size 128 --num_channels 32 --channel_mult 1,1,2,2,2 --num_res_blocks 2 --attention_resolutions 16,8 --lr 1e-4 --ema_rate 0.99 --ema_warmup False --augment_seed 1 --log_interval 25 --save_interval 125 --max_steps 2571"
AUG=flip,rot90,rotate,scale,elastic,bias,phase,gain
DEMO=demo_data/singlecoil_train,demo_data/multicoil_train
SYN=prior_data/singlecoil_synth_train
run() {  # name, flags...
  v=$1; shift
  mkdir -p $A/$v
  [ -f $A/$v/model002321.pt ] || { cp $STAGE1 $A/$v/model002321.pt; cp $STAGE1 $A/$v/ema_0.99_002321.pt; }
  if [ ! -f $A/$v/ema_0.99_002571.pt ]; then
    $PY scripts/image_train.py --log_dir $A/$v $COMMON "$@" --resume_checkpoint $A/$v/model002321.pt > $A/$v/train.out 2>&1
  fi
  echo "$(date +%H:%M) trained $v rc $?" >> $A/progress.txt
}
run full --data_dir $DEMO,$SYN --augment $AUG --batch_size 4
run neither --data_dir $DEMO --augment none --batch_size 4
run no_synth --data_dir $DEMO --augment $AUG --batch_size 4
run no_aug --data_dir $DEMO,$SYN --augment none --batch_size 4
run patch64 --data_dir $DEMO,$SYN --augment $AUG --batch_size 16 --patch_size 64
echo "$(date +%H:%M) ALL DONE" >> $A/progress.txt
