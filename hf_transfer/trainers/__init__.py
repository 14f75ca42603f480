"""Trainers: the fine-tuning and distillation Trainer subclasses, each beside its config, and what they train with."""
