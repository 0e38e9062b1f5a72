"""Run under torchrun by test_fsdp.py: fine-tune a test model with --fsdp through slmops's recipe, and
stop with a real SIGTERM after step STOP (0: run to the end).

usage: fsdp_driver.py MODEL DATA OUT METHOD STOP RESUME
"""

import os
import signal
import sys

from transformers import TrainerCallback

from slmops.errors import Interrupted
from slmops.options.finetune_options import FinetuneOptions
from slmops.training.recipe import finetune


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and int(os.environ["RANK"]) == 0:  # one process told: all stop
            os.kill(os.getpid(), signal.SIGTERM)


def options(model: str, data: str, out: str, method: str, resume: str | None, **training) -> FinetuneOptions:
    return FinetuneOptions.build(
        model_name_or_path=model, data_name=data, text_template="Review: {phrase}\nTone: {tone}", output_path=out,
        method=method, lora_dropout=0.0, eval_split="train[:4]", resume_from_checkpoint=resume,
        training_args={"max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": 5e-3, "logging_steps": 1,
                       "save_steps": 2, **training})


if __name__ == "__main__":
    model, data, out, method, stop, resume = sys.argv[1:7]
    try:
        finetune(options(model, data, out, method, resume or None, fsdp=True),
                 (StopAt(int(stop)),) if int(stop) else ())
    except Interrupted:
        sys.exit(3)
