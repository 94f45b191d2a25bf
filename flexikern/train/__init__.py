"""Training: pre-training, FlexiDiT fine-tuning (LoRA distillation, shared), EMA, checkpoints, torchrun.

`train(model, data, TrainConfig(...))` is the one loop (see `flexikern.train.trainer`); data
sources are in `flexikern.train.data`, the losses in `flexikern.train.losses`, the command-line
front (`flexikern train`, `flexikern finetune`) in `flexikern.train.commands`.
"""

from flexikern.train.data import BatchOrder, TensorData, image_folder, shapes_data, teacher_samples
from flexikern.train.losses import diffusion_loss, distillation_loss, vlb_term
from flexikern.train.trainer import (EMA, RECIPES, TrainConfig, TrainSetupError, init_distributed,
                                     load_checkpoint, save_checkpoint, train)

__all__ = ["train", "TrainConfig", "TrainSetupError", "EMA", "RECIPES", "save_checkpoint", "load_checkpoint",
           "init_distributed", "TensorData", "BatchOrder", "image_folder", "shapes_data",
           "teacher_samples", "diffusion_loss", "distillation_loss", "vlb_term"]
