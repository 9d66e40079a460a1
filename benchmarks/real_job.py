"""The SmolLM2 example's job (examples/smollm2_distill.yaml) as TRL runs it, and one greedy evaluation for every
trained student: the child processes of `vs_trl.py --size smollm2`.

    python benchmarks/real_job.py trl RESULT.json STEPS fair|defaults   # TRL's GKDTrainer on the job
    python benchmarks/real_job.py evaluate RESULT.json STUDENT_FOLDER     # opd-ray's greedy eval of a student

Both read the example's spec, so TRL gets what opd-ray gets: the same imported models, the same ChatML prompt
ids in the order opd-ray's sampler takes them (16 a step), 48 new tokens at temperature 1, AdamW at lr 2e-5
with the same 3-step linear warmup and no weight decay, gradient clipping at 1.0, float32.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "smollm2_distill.yaml"


def example_spec(steps: int, output_dir: Path):
    from opd_ray.recipe.real_models import ensure_imported_models
    from opd_ray.spec import load_spec

    overrides = [f"trainer.steps={steps}", f"run.output_dir={output_dir}", "trainer.eval_every=0"]
    spec = load_spec(str(EXAMPLE), overrides)
    ensure_imported_models(spec)
    return spec


def prompts_in_opd_ray_order(spec, inputs) -> list[dict]:
    """The prompts of steps 1..N as opd-ray's sampler hands them out, with their reference answers' ids."""
    from opd_ray.data.order import PromptSampler

    sampler = PromptSampler(len(inputs.train), spec.run.seed)
    tokenizer = inputs.tokenizer
    rows = []
    for _ in range(spec.trainer.steps):
        for i in sampler.next(spec.trainer.prompts_per_step):
            answer = tokenizer(inputs.train.answers[i] or "", add_special_tokens=False).input_ids
            rows.append({"prompt_ids": inputs.train.prompt_ids[i], "answer_ids": [*answer, tokenizer.eos_token_id]})
    return rows


def same_schedule(model, learner, steps: int) -> tuple:
    """opd-ray's optimizer and schedule (actors/learner_config.py): AdamW, linear warmup over warmup_steps, constant."""
    from opd_ray.actors.learner_config import warmup_cosine

    optimizer = torch.optim.AdamW(model.parameters(), lr=learner.lr, weight_decay=learner.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(learner, steps))


def timed_trainer_class():
    """GKDTrainer timing its phases and counting the response tokens its loss covers (measurement only)."""
    from trl.experimental.gkd import GKDTrainer

    class TimedGKDTrainer(GKDTrainer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.trained_tokens = 0
            self.seconds = {"generate": 0.0, "teacher_forward": 0.0, "student_forward_loss": 0.0, "training_step": 0.0}

        def generate_on_policy_outputs(self, model, inputs, generation_config):
            started = time.perf_counter()
            outputs = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            self.seconds["generate"] += time.perf_counter() - started
            return outputs

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.trained_tokens += int((inputs["labels"][:, 1:] != -100).sum())
            started = time.perf_counter()
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.seconds["student_forward_loss"] += time.perf_counter() - started
            return loss

        def training_step(self, model, inputs, num_items_in_batch=None):
            started = time.perf_counter()
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.seconds["training_step"] += time.perf_counter() - started
            return loss

    return TimedGKDTrainer


def time_forward(model, seconds: dict, key: str) -> None:
    """Adds each forward's wall time to seconds[key] (the teacher's, inside the loss)."""
    starts: list[float] = []
    model.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
    model.register_forward_hook(lambda *_: seconds.__setitem__(key, seconds[key] + time.perf_counter() - starts.pop()))


def gkd_config(spec, output_dir: Path, variant: str):
    """The job's settings in GKDConfig. `fair` overrides two defaults: bf16=True (a CPU without bf16 units
    sends every matmul down a slow path; opd-ray's models are float32) and gradient_checkpointing=True (it
    recomputes every activation in backward and turns the KV cache off in TRL's generation; opd-ray does not
    checkpoint by default). `defaults` keeps both."""
    from trl.experimental.gkd import GKDConfig

    overrides = {"bf16": False, "gradient_checkpointing": False} if variant == "fair" else {}
    return GKDConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=spec.trainer.prompts_per_step,
        gradient_accumulation_steps=1,
        max_steps=spec.trainer.steps,
        max_grad_norm=spec.learner.grad_clip,
        lmbda=1.0,  # every batch sampled from the student: on-policy
        beta=1.0,  # reverse KL
        temperature=spec.rollout.temperature,
        max_new_tokens=spec.rollout.max_new_tokens,
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        save_strategy="no",
        logging_steps=max(1, spec.trainer.steps),
        seed=spec.run.seed,
        dataloader_num_workers=0,
        **overrides,
    )


def run_trl(result: Path, steps: int, variant: str) -> None:
    """TRL's GKDTrainer on the job; the trained student is saved beside `result` for the same evaluation."""
    started = time.perf_counter()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM
    from vs_trl import PromptAnswerCollator

    from opd_ray.data.run_inputs import load_run_inputs

    spec = example_spec(steps, result.parent / "unused-run-dir")
    inputs = load_run_inputs(spec)
    student = AutoModelForCausalLM.from_pretrained(spec.models.student.path, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(spec.teacher_model("teacher").path, dtype=torch.float32)
    trainer_class = timed_trainer_class()
    trainer_class._get_train_sampler = lambda self, dataset=None: SequentialSampler(dataset or self.train_dataset)
    trainer = trainer_class(
        model=student,
        teacher_model=teacher,
        args=gkd_config(spec, result.parent / f"trl-{variant}", variant),
        train_dataset=Dataset.from_list(prompts_in_opd_ray_order(spec, inputs)),
        processing_class=inputs.tokenizer,
        data_collator=PromptAnswerCollator(inputs.tokenizer.pad_token_id),
        optimizers=same_schedule(student, spec.learner, steps),
    )
    time_forward(trainer.teacher_model, trainer.seconds, "teacher_forward")
    loop_started = time.perf_counter()
    trainer.train()
    loop_s = time.perf_counter() - loop_started
    student_dir = result.parent / f"trl-{variant}-student"
    trainer.model.save_pretrained(student_dir)
    inputs.tokenizer.save_pretrained(student_dir)
    record = {"tokens": trainer.trained_tokens, "loop_s": loop_s, "steps": steps, "phases": trainer.seconds}
    record.update(before_loop_s=loop_started - started, student=str(student_dir))
    result.write_text(json.dumps(record))


def evaluate(result: Path, student: str) -> None:
    """Greedy accuracy of a trained student on the example's eval prompts, as opd-ray measures its own (a vLLM
    engine with the rollout engine's settings; a cut-off answer is wrong)."""
    from opd_ray.actors.vllm_engine import create_engine, greedy
    from opd_ray.data.run_inputs import load_run_inputs
    from opd_ray.driver.evaluation import accuracy_of

    spec = example_spec(1, result.parent / "unused-run-dir")
    inputs = load_run_inputs(spec)
    model = spec.models.student.model_copy(update={"path": student})
    llm = create_engine(model, spec.rollout.engine, spec.run.seed)
    completions = greedy(llm, inputs.eval.subset(list(range(len(inputs.eval)))), spec.rollout.max_new_tokens)
    result.write_text(json.dumps({"accuracy": accuracy_of(completions, inputs.eval, inputs.verifier)}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    command, result_path, *rest = sys.argv[1:]
    if command == "trl":
        run_trl(Path(result_path), int(rest[0]), rest[1])
    else:
        os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCHDYNAMO_DISABLE": "1"})
        evaluate(Path(result_path), rest[0])
