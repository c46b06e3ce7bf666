"""Generic training engine (accelerate), optimisers and schedules, atomic checkpoints, pretraining glue.

``Trainer``/``TrainerConfig`` (trainer.py), ``OptimConfig``/``ScheduleConfig`` (optim.py) and the checkpoint
helpers are generic: distillation, pruning and SUPERB training use them too. ``speechssl.train.pretrain`` holds
``PretrainConfig`` and ``run_pretrain`` for ``speechssl pretrain`` (imported lazily: it needs models and data).
"""
from speechssl.train.optim import OptimConfig, ScheduleConfig, build_optimizer, build_scheduler, default_param_groups
from speechssl.train.trainer import Trainer, TrainerConfig, TrainingDiverged

__all__ = [
    "Trainer", "TrainerConfig", "TrainingDiverged", "OptimConfig", "ScheduleConfig", "build_optimizer",
    "build_scheduler", "default_param_groups",
]
