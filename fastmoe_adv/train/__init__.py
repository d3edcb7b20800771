"""The training recipe: expert pre-training (phase 1), then joint randomized adversarial
training of experts and gate (phase 2).

- config.py: ``TrainConfig`` (every knob, its help text and resume rule);
- steps.py: one step of each phase, the per-batch attack draws, the learning-rate schedule;
- state.py: the run folder (lock, overwrite policy), models from checkpoints, start/resume/skip;
- trainer.py: the loop both phases share, ``pretrain`` and ``train``.

Multi-GPU: under ``torchrun`` (``WORLD_SIZE > 1``) both phases run DDP (NCCL on CUDA, gloo on
CPU). ``batch_size`` is the GLOBAL batch; every rank takes its disjoint slice of each global
batch, so the update is the gradient of the mean over the global batch, except that BatchNorm
normalizes with per-rank statistics (ghost batches) and DDP broadcasts rank 0's running
statistics. Each rank's PGD random starts come from its own generator (seeded with the rank).
Only rank 0 writes checkpoints, logs and reports.
"""
from .config import SCHEDULES, TrainConfig, scaled_steps
from .state import CHECKPOINT_FORMAT, build_model, load_model, model_from_payload
from .steps import LRSchedule, Phase2Attack, draw_phase1_plan, draw_phase2_attack, phase1_step, phase2_step
from .trainer import Trainer, TrainingInterrupted, pretrain, train

__all__ = ["TrainConfig", "TrainingInterrupted", "LRSchedule", "Trainer", "build_model", "load_model", "pretrain",
           "train", "phase1_step", "phase2_step", "draw_phase1_plan", "draw_phase2_attack", "Phase2Attack",
           "model_from_payload", "scaled_steps", "CHECKPOINT_FORMAT", "SCHEDULES"]
