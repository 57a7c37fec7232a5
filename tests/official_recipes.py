"""The official ViT-B/16 ImageNet-1k recipe of every method, value by value, with the file each comes from: what
params/presets/imagenet.yaml must resolve to (tests/test_official_recipes.py). One row per (method, key).

`key` is a dotted path into the params that method's training node sees (pipeline.config.method_params: pretrain.*
with the method's own keys over it; dBOT: each stage's), or `=name`, a value derived from them (DERIVED in the test:
the EMA momenta per update, patch counts of the masks, ...). `eval` rows are the one evaluation harness of every
method (MAE's fine-tune and linear-probe protocols at ViT-B).

Where this project cannot or does not follow the official code, the row keeps the official value and records `ours`
(what the preset resolves to instead) and `why`; the test pins `ours`, so that changes fail too.
Repositories, at the commits read: mae = facebookresearch/mae (3d650de), dbot = liuxingbin/dbot (branch main,
e935478), sdae = AbrahamYabo/SdAE (79ed28c; README.md 82e3f33), rcmae = youngwanLEE/rc-mae (d2fa73d),
boot = LightDXY/BootMAE (f951200).
"""
from typing import NamedTuple


class Row(NamedTuple):
    method: str
    key: str
    official: object
    source: str
    ours: object = None
    why: str = ""


def _vit_b(method: str, repo_file: str) -> list[Row]:
    """The ViT-B/16 encoder at 224 px, the same for every method."""
    return [Row(method, "data.img_size", 224, repo_file), Row(method, "model.patch_size", 16, repo_file),
            Row(method, "model.embed_dim", 768, repo_file), Row(method, "model.depth", 12, repo_file),
            Row(method, "model.num_heads", 12, repo_file)]


def _mae_decoder(method: str, repo_file: str) -> list[Row]:
    """MAE's decoder: 8 blocks of 512 with 16 heads."""
    return [Row(method, "model.decoder_dim", 512, repo_file), Row(method, "model.decoder_depth", 8, repo_file),
            Row(method, "model.decoder_heads", 16, repo_file)]


def _augment(method: str, repo_file: str) -> list[Row]:
    """MAE's pre-training augmentation: RandomResizedCrop(224, scale (0.2, 1), bicubic) + horizontal flip."""
    return [Row(method, "pretrain.crop_scale", [0.2, 1.0], repo_file), Row(method, "pretrain.hflip", True, repo_file)]


MAE = [
    *_vit_b("mae", "mae models_mae.py: mae_vit_base_patch16_dec512d8b"),
    *_mae_decoder("mae", "mae models_mae.py: mae_vit_base_patch16_dec512d8b"),
    *_augment("mae", "mae main_pretrain.py: transform_train"),
    Row("mae", "pretrain.epochs", 1600, "mae FINETUNE.md: the released models are trained 1600 epochs (FT 83.6)"),
    Row("mae", "pretrain.batch_size", 4096, "mae PRETRAIN.md: effective batch 64 x 8 nodes x 8 GPUs = 4096"),
    Row("mae", "pretrain.blr", 1.5e-4, "mae PRETRAIN.md: --blr 1.5e-4"),
    Row("mae", "pretrain.weight_decay", 0.05, "mae PRETRAIN.md: --weight_decay 0.05"),
    Row("mae", "pretrain.warmup_epochs", 40, "mae PRETRAIN.md: --warmup_epochs 40"),
    Row("mae", "pretrain.min_lr", 0.0, "mae main_pretrain.py: --min_lr default 0."),
    Row("mae", "pretrain.clip_grad", None, "mae engine_pretrain.py: loss_scaler(...) without clip_grad"),
    Row("mae", "pretrain.mask_ratio", 0.75, "mae PRETRAIN.md: --mask_ratio 0.75"),
    Row("mae", "mae.norm_pix_loss", True, "mae PRETRAIN.md: --norm_pix_loss"),
    Row("mae", "mae.drop_path", 0.0, "mae models_mae.py: encoder Blocks without drop path"),
]

DBOT = [
    *_vit_b("dbot", "dbot PRETRAIN.md: ./run.sh ... base_patch16"),
    *_mae_decoder("dbot", "dbot models_mae.py: MaskedAutoencoderViT decoder defaults (8 x 512, 16 heads)"),
    *_augment("dbot", "dbot main_pretrain.py: transform_train"),
    Row("dbot", "=stages", 2, "dbot PRETRAIN.md: --stage_epochs 0 800 1600 (2 stages)"),
    Row("dbot", "pretrain.epochs", 800, "dbot PRETRAIN.md: --stage_epochs 0 800 1600 (800 epochs a stage)"),
    Row("dbot", "pretrain.batch_size", 4096, "dbot PRETRAIN.md: --batch_size 128 x 4 nodes x 8 GPUs = 4096"),
    Row("dbot", "pretrain.blr", 1.5e-4, "dbot PRETRAIN.md: --blr 1.5e-4"),
    Row("dbot", "pretrain.weight_decay", 0.05, "dbot PRETRAIN.md: --weight_decay 0.05"),
    Row("dbot", "pretrain.warmup_epochs", 40, "dbot run.sh: --warmup_epochs 40 (util/lr_sched.py: per stage)"),
    Row("dbot", "pretrain.min_lr", 0.0, "dbot main_pretrain.py: --min_lr default 0."),
    Row("dbot", "pretrain.clip_grad", 3.0, "dbot PRETRAIN.md: --clip_grad 3.0 (ViT-B only)"),
    Row("dbot", "pretrain.mask_ratio", 0.75, "dbot PRETRAIN.md: --mask_ratio 0.75"),
    Row("dbot", "dbot.drop_path", 0.2, "dbot PRETRAIN.md: --sdpr 0.2"),
    Row("dbot", "dbot.decoder_drop_path", 0.2, "dbot models_mae.py: drop_path_rate also in the decoder blocks"),
    Row("dbot", "dbot.beta", 2.0, "dbot models_mae.py: the smooth-L1 feature loss, beta 2.0"),
    Row("dbot", "dbot.target_norm", True, "dbot PRETRAIN.md: --norm_feature_loss"),
    Row("dbot", "dbot.teacher_final_norm", False, "dbot main_pretrain.py: --tlayernorm default 0"),
    Row("dbot", "dbot.carry_optimizer_state", True,
        "dbot main_pretrain.py: one AdamW for every stage; at a stage end only the student is re-initialised"),
    Row("dbot", "=stage0_teacher_depth", 12, "dbot PRETRAIN.md: --init_teacher_encoder_depth 12 (ViT-B)"),
    Row("dbot", "dbot.chains", {"random": "random_init"},
        "dbot PRETRAIN.md: teacher_resume NULL = the random teacher (main_pretrain.py: a copy of the student's init)"),
]

SDAE = [
    *_vit_b("sdae", "sdae main_pretrain.py: --model mae_vit_base_patch16 --model_teacher vit_base_patch16"),
    *_mae_decoder("sdae", "sdae models_mae.py: mae_vit_base_patch16 (decoder 8 x 512, 16 heads)"),
    *_augment("sdae", "sdae main_pretrain.py: transform_train"),
    Row("sdae", "pretrain.epochs", 300, "sdae README.md: --epochs 300 (main_pretrain.py default 300)"),
    Row("sdae", "pretrain.batch_size", 768, "sdae main_pretrain.py: --batch_size 96 per GPU, help: 96 batch x 8 gpu"),
    Row("sdae", "pretrain.blr", 2.666e-4, "sdae README.md: --blr 2.666e-4"),
    Row("sdae", "pretrain.weight_decay", 0.04,
        "sdae main_pretrain.py: --weight_decay 0.04 (--weight_decay_end is never used)"),
    Row("sdae", "pretrain.warmup_epochs", 60, "sdae README.md: --warmup_epochs 60"),
    Row("sdae", "pretrain.min_lr", 0.0, "sdae main_pretrain.py: --min_lr default 0."),
    Row("sdae", "pretrain.clip_grad", None, "sdae main_pretrain.py: no --clip_grad"),
    Row("sdae", "pretrain.mask_ratio", 0.75, "sdae README.md: --mask_ratio 0.75"),
    Row("sdae", "sdae.drop_path", 0.25, "sdae README.md: --drop_path 0.25 (teacher: drop_path_rate=0.0)"),
    Row("sdae", "sdae.folds", 3, "sdae README.md: --ncrop_loss 3"),
    Row("sdae", "=masked_patches", 147, "sdae README.md: --shrink_num 147 (every masked token goes to the teacher)"),
    Row("sdae", "sdae.teacher_init", "random",
        "sdae main_pretrain.py: models_teacher.vit_base_patch16, its own init (no --model_teacher_path)"),
    Row("sdae", "sdae.cosine_axis", "tokens",
        "sdae engine_pretrain.py: F.cosine_similarity's default dim=1 on (B x 3, 49, 768)"),
    Row("sdae", "sdae.momentum.schedule", "cosine", "sdae util/cosine_scheduler.py (main_pretrain.py)"),
    Row("sdae", "sdae.momentum.update", "epoch", "sdae README.md: --ema_op per_epoch --ema_frequent 1"),
    Row("sdae", "=ema", [0.96, 0.99], "sdae README.md: --momentum_teacher 0.96 --momentum_teacher_final 0.99"),
    Row("sdae", "sdae.evaluate_weights", "student", "sdae main_finetune.py: --model_mode default model (the student)"),
]

RCMAE = [
    *_vit_b("rcmae", "rcmae scripts/pretrain_rc_mae_vit_base_1600ep.sh: --model rc_vit_base_patch16"),
    *_mae_decoder("rcmae", "rcmae models_rc.py: rc_vit_base_patch16 (decoder 8 x 512, 16 heads)"),
    *_augment("rcmae", "rcmae run_pretrain.py: transform_train"),
    Row("rcmae", "pretrain.epochs", 1600, "rcmae scripts/pretrain_rc_mae_vit_base_1600ep.sh: --epochs 1600"),
    Row("rcmae", "pretrain.batch_size", 4096,
        "rcmae scripts/pretrain_rc_mae_vit_base_1600ep.sh: --batch_size 256 x 8 GPUs x --accum_iter 2"),
    Row("rcmae", "pretrain.blr", 1.5e-4, "rcmae scripts/pretrain_rc_mae_vit_base_1600ep.sh: --blr 1.5e-4"),
    Row("rcmae", "pretrain.weight_decay", 0.05,
        "rcmae scripts/pretrain_rc_mae_vit_base_1600ep.sh: --weight_decay 0.05"),
    Row("rcmae", "pretrain.warmup_epochs", 40, "rcmae scripts/pretrain_rc_mae_vit_base_1600ep.sh: --warmup_epochs 40"),
    Row("rcmae", "pretrain.min_lr", 0.0, "rcmae run_pretrain.py: --min_lr default 0.0"),
    Row("rcmae", "pretrain.clip_grad", None, "rcmae engine_pretrain.py: loss_scaler(...) without clip_grad"),
    Row("rcmae", "pretrain.mask_ratio", 0.75, "rcmae scripts/pretrain_rc_mae_vit_base_1600ep.sh: --mask_ratio 0.75"),
    Row("rcmae", "mae.norm_pix_loss", True, "rcmae scripts/pretrain_rc_mae_vit_base_1600ep.sh: --norm_pix_loss"),
    Row("rcmae", "rcmae.consistency_weight", 1.0, "rcmae scripts/pretrain_rc_mae_vit_base_1600ep.sh: --gamma 1.0"),
    Row("rcmae", "rcmae.drop_path", 0.0, "rcmae models_rc.py: encoder Blocks without drop path (as MAE)"),
    Row("rcmae", "rcmae.momentum.schedule", "repo",
        "rcmae engine_pretrain.py: momentum_schedule[data_iter_step], the step within the epoch"),
    Row("rcmae", "rcmae.momentum.update", "step", "rcmae engine_pretrain.py: the EMA after every micro-batch"),
    Row("rcmae", "=ema", [0.996 ** 2, 1.0],
        "rcmae run_pretrain.py: --momentum_teacher 0.996 -> 1 (cosine_scheduler); engine_pretrain.py applies it "
        "after each of the --accum_iter 2 micro-batches of an optimiser step: 0.996^2 per step"),
    Row("rcmae", "rcmae.evaluate_weights", "teacher",
        "rcmae scripts/pretrain_rc_mae_vit_base_1600ep.sh: fine-tunes --checkpoint_key teacher"),
]

BOOTMAE = [
    *_vit_b("bootmae", "boot scripts/pretrain/bash_pre_BootMAE_Base_800.sh: --model bootmae_base"),
    *_augment("bootmae", "boot datasets.py: RandomResizedCrop(224, scale (0.2, 1)) + RandomHorizontalFlip"),
    Row("bootmae", "pretrain.epochs", 800,
        "boot scripts/pretrain/bash_pre_BootMAE_Base_800.sh: --epochs 801, checkpoint-799 fine-tuned (800 epochs)"),
    Row("bootmae", "pretrain.batch_size", 4096,
        "boot README.md: --batch_size 256 on 16 V100 = 4096 (its text also says 2048; the script: 256 per GPU)"),
    Row("bootmae", "pretrain.blr", 1.5e-4,
        "boot scripts/pretrain/bash_pre_BootMAE_Base_800.sh: --lr 1.5e-4, run_pretraining.py scales it by batch / 256"),
    Row("bootmae", "pretrain.weight_decay", 0.05, "boot run_pretraining.py: --weight_decay default 0.05"),
    Row("bootmae", "pretrain.warmup_epochs", 40,
        "boot scripts/pretrain/bash_pre_BootMAE_Base_800.sh: --warmup_epochs 40"),
    Row("bootmae", "pretrain.min_lr", 1.0e-4,
        "boot scripts/pretrain/bash_pre_BootMAE_Base_800.sh: --min_lr 1e-4 (absolute)"),
    Row("bootmae", "pretrain.clip_grad", None, "boot run_pretraining.py: --clip_grad default None"),
    Row("bootmae", "=masked_patches", 147, "boot scripts/pretrain/bash_pre_BootMAE_Base_800.sh: --mask_num 147"),
    Row("bootmae", "=block_patches", 120, "boot run_pretraining.py: --num_mask_patches default 120 (BEiT blocks)"),
    Row("bootmae", "bootmae.min_block", 16, "boot masking_generator.py: min_num_patches=16"),
    Row("bootmae", "=max_block_patches", 60, "boot run_pretraining.py: --max_mask_patches_per_block 60"),
    Row("bootmae", "bootmae.momentum.schedule", "piecewise", "boot utils.py: linear per epoch in two pieces"),
    Row("bootmae", "bootmae.momentum.update", "step", "boot run_pretraining.py: model_ema.update after every step"),
    Row("bootmae", "=ema", [0.999, 0.9999, 0.99999],
        "boot scripts/pretrain/bash_pre_BootMAE_Base_800.sh: --model_ema_decay 0.999 --model_ema_dynamic; utils.py"),
    Row("bootmae", "=ema_breakpoint_epochs", [100, 400], "boot utils.py: 0.9999 at epoch 100, 0.99999 at 400"),
    Row("bootmae", "bootmae.feature_weight", 1.0,
        "boot scripts/pretrain/bash_pre_BootMAE_Base_800.sh: --feature_weight 1"),
    Row("bootmae", "bootmae.ramp", "epoch", "boot run_pretraining.py: the feature weight set per epoch"),
    Row("bootmae", "bootmae.ramp_fraction", 0.25, "boot run_pretraining.py: min(4 w (e + 1) / E, w)"),
    Row("bootmae", "bootmae.center_weight", True, "boot scripts/pretrain/bash_pre_BootMAE_Base_800.sh: --weight_mask"),
    Row("bootmae", "bootmae.loss_denominator", "masked", "boot run_pretraining.py: mean(weight * err) / mean(mask)"),
    Row("bootmae", "bootmae.feature_decoder", "encoder",
        "boot models/modeling_pretrain_bootmae.py: the feature decoder at the encoder's width"),
    Row("bootmae", "bootmae.decoder_positions", "masked",
        "boot models/modeling_pretrain_bootmae.py: positions added to the mask tokens only"),
    Row("bootmae", "bootmae.block_order", "self_cross_mlp",
        "boot models/modeling_pretrain_bootmae.py: self-attention, cross-attention, MLP"),
    Row("bootmae", "bootmae.drop_path", 0.0, "boot run_pretraining.py: --drop_path default 0"),
    Row("bootmae", "bootmae.evaluate_weights", "student",
        "boot scripts/finetune/bash_fine_BootMAE_Base_800.sh: fine-tunes the student (key model)"),
    Row("bootmae", "model.decoder_dim", 512,
        "boot models/modeling_pretrain_bootmae.py: bootmae_base decoder width 512"),
    Row("bootmae", "=feature_decoder_heads", 12,
        "boot models/modeling_pretrain_bootmae.py: the feature decoder runs with the encoder's 12 heads"),
    Row("bootmae", "=decoder_depth", 2, "boot models/modeling_pretrain_bootmae.py: bootmae_base, 2-block decoders"),
    Row("bootmae", "model.decoder_heads", 12,
        "boot models/modeling_pretrain_bootmae.py: the pixel decoder takes the encoder's 12 heads (42 wide, 504)",
        ours=16, why="the project's attention needs a width divisible by its heads (512 / 12 is not); MAE's 16"),
    Row("bootmae", "bootmae.probe_block", 10,
        "boot scripts/linear/bash_linear_BootMAE_Base_800.sh: the linear probe on block 10, mean-pooled",
        ours=None, why="one evaluation harness: every method is probed on its last block's cls token (MAE's)"),
]

EVAL = [   # MAE's protocols at ViT-B, for every method (mae FINETUNE.md, main_finetune.py, main_linprobe.py)
    Row("eval", "finetune.epochs", 100, "mae FINETUNE.md: --epochs 100 (ViT-B)"),
    Row("eval", "finetune.batch_size", 1024, "mae FINETUNE.md: --batch_size 32 x 4 nodes x 8 GPUs"),
    Row("eval", "finetune.blr", 5.0e-4, "mae FINETUNE.md: --blr 5e-4"),
    Row("eval", "finetune.layer_decay", 0.65, "mae FINETUNE.md: --layer_decay 0.65"),
    Row("eval", "finetune.weight_decay", 0.05, "mae FINETUNE.md: --weight_decay 0.05"),
    Row("eval", "finetune.drop_path", 0.1, "mae FINETUNE.md: --drop_path 0.1"),
    Row("eval", "finetune.warmup_epochs", 5, "mae main_finetune.py: --warmup_epochs default 5"),
    Row("eval", "finetune.min_lr", 1.0e-6, "mae main_finetune.py: --min_lr default 1e-6"),
    Row("eval", "finetune.mixup", 0.8, "mae FINETUNE.md: --mixup 0.8"),
    Row("eval", "finetune.cutmix", 1.0, "mae FINETUNE.md: --cutmix 1.0"),
    Row("eval", "finetune.label_smoothing", 0.1, "mae main_finetune.py: --smoothing default 0.1"),
    Row("eval", "finetune.randaug", "rand-m9-mstd0.5-inc1", "mae main_finetune.py: --aa default"),
    Row("eval", "finetune.clip_grad", None, "mae main_finetune.py: --clip_grad default None"),
    Row("eval", "linprobe.epochs", 90, "mae FINETUNE.md: linear probing ViT-B, --epochs 90"),
    Row("eval", "linprobe.batch_size", 16384, "mae FINETUNE.md: --batch_size 512 x 4 nodes x 8 GPUs"),
    Row("eval", "=linprobe_blr", 0.1, "mae FINETUNE.md: --blr 0.1 (lr = 0.1 x 16384 / 256)"),
    Row("eval", "linprobe.optimizer", "lars", "mae main_linprobe.py: LARS"),
    Row("eval", "linprobe.weight_decay", 0.0, "mae main_linprobe.py: --weight_decay default 0"),
    Row("eval", "linprobe.feature", "cls", "mae FINETUNE.md: --cls_token"),
    Row("eval", "linprobe.head", "bn", "mae main_linprobe.py: BatchNorm1d(affine=False) before the head"),
]

RECIPES = MAE + DBOT + SDAE + RCMAE + BOOTMAE + EVAL
