"""Training: the runtime, the model-to-trainer contract, the Trainer, optimisers and schedules, checkpoints.

``Runtime`` (runtime.py) is where every loop runs (device, precision, collectives); ``StepOutput`` and the
capabilities in contract.py are what a model gives the ``Trainer`` (trainer.py). Pretraining, distillation and
pruning train on the Trainer; SUPERB's head loop shares the runtime and the optimiser config.
``speechssl.train.pretrain`` holds ``PretrainConfig`` and ``run_pretrain`` (imported lazily: it needs models and
data).
"""
from speechssl.train.contract import StepOutput
from speechssl.train.optim import OptimConfig, ScheduleConfig, build_optimizer, build_scheduler, default_param_groups
from speechssl.train.runtime import Runtime
from speechssl.train.trainer import Trainer, TrainerConfig, TrainingDiverged

__all__ = [
    "Runtime", "StepOutput", "Trainer", "TrainerConfig", "TrainingDiverged", "OptimConfig", "ScheduleConfig",
    "build_optimizer", "build_scheduler", "default_param_groups",
]
