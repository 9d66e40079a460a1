"""trainer: steps, batches, checkpoints, timeouts, stop_on; health: the OPD doctor's thresholds."""

from __future__ import annotations

from pydantic import Field

from opd_ray.spec.base import Section


class TimeoutsSpec(Section):
    """How long the driver waits on its actors before it names the one that is stuck (nothing waits forever)."""

    start_s: float = Field(
        900, gt=0, description="actors starting: models loaded, engines up, learner ranks joined, a restart back"
    )
    step_s: float = Field(
        1800,
        gt=0,
        description="one shard on one rollout worker or teacher (a stuck one is killed, restarted and its shard "
        "re-issued), one learner update, one evaluation call (stuck learners stop the run)",
    )
    sync_s: float = Field(600, gt=0, description="new weights reaching every rollout engine")
    checkpoint_s: float = Field(1800, gt=0, description="learners saving or loading a checkpoint or the final student")
    eval_s: float = Field(
        3600,
        gt=0,
        description="one actor's share of a greedy evaluation (a stuck one is killed, restarted and its share "
        "re-issued, at most trainer.max_actor_restarts times)",
    )
    build_wait_s: float = Field(
        3600, gt=0, description="another process building the models this spec uses in the shared model cache"
    )


class HealthSpec(Section):
    """The OPD doctor (opd_ray/health/): the thresholds of its named conditions. Each compares the mean of
    the last `window` steps ("now") with the mean of the first `window` trained steps ("start")."""

    enabled: bool = True
    """run the OPD doctor: health/... signals every step and its named conditions"""
    window: int = Field(10, ge=1, description="steps averaged for 'now' and for 'the start'")
    collapse_repetitive_share: float = Field(
        0.5, gt=0, le=1, description="collapse: this share of responses repeat a 4-gram more than 3 times, ..."
    )
    collapse_cut_off_share: float = Field(
        0.9,
        gt=0,
        le=1,
        description="...or this share is cut off at the length limit while the entropy falls; never_ends: this "
        "share cut off over a whole window",
    )
    collapse_entropy_ratio: float = Field(
        0.5, gt=0, lt=1, description="collapse: student entropy now / at the start at or below this"
    )
    explosion_entropy_ratio: float = Field(
        1.5, gt=1, description="entropy_explosion: student entropy now / at the start at or above this"
    )
    alignment_steps: int = Field(
        50, ge=2, description="no_alignment is judged from this step on (the paper's signals need time to move)"
    )
    low_start_overlap: float = Field(
        0.6,
        ge=0,
        le=1,
        description="no_alignment: the run started below this overlap@k (probe.min_overlap's default: the paper's "
        "successful runs start ~0.7), ...",
    )
    min_overlap_rise: float = Field(0.02, ge=0, description="...and since then overlap@k rose less than this...")
    min_entropy_gap_narrowing: float = Field(
        0.1, ge=0, description="...and the entropy gap narrowing by less than this share of its start"
    )
    teacher_uniform_tolerance: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="teacher_broken: the teacher's log-probs of the sampled tokens within this relative distance "
        "of -ln|V| and spread by less than this share of ln|V| (a uniform teacher), ...",
    )
    teacher_min_logprob_std: float = Field(1e-3, ge=0, description="...or spread by less than this (constant)")
    reward_drop: float = Field(
        0.05, gt=0, le=1, description="reward_divergence: the sample reward fell this much below its start..."
    )
    reward_drop_sigmas: float = Field(
        2.0,
        ge=0,
        description="...and by at least this many standard errors of the two windows' difference (a 0/1 "
        "reward over the windows' samples): 16 samples a step move a window's mean by ~0.03 by chance",
    )
    kl_drop: float = Field(0.2, gt=0, lt=1, description="...while the sampled reverse KL fell by this share")
    grad_spike_factor: float = Field(
        10, gt=1, description="grad_spike: a step's gradient norm at least this many times the window's median"
    )


class TrainerSpec(Section):
    steps: int = Field(100, ge=1)
    """OPD steps (one update each)"""
    prompts_per_step: int = Field(64, ge=1)
    """prompts sampled per step (x rollout.samples_per_prompt sequences)"""
    weight_sync_interval: int = Field(1, ge=1)
    """updates between weight syncs to the rollout engines"""
    max_staleness: int = Field(
        0,
        ge=0,
        description="asynchronous mode: rollouts of up to this many later steps run while the learners "
        "train; 0 = synchronous, fully on-policy. The rollout buffer holds at most max_staleness + 1 launched steps",
    )
    prompts_per_shard: int | None = Field(
        None,
        ge=1,
        description="prompts in one unit of rollout/teacher work, handed to whichever actor is free; "
        "null = prompts_per_step / rollout.num_workers (one shard per worker)",
    )
    eval_every: int = Field(0, ge=0, description="0 = only before and after training")
    reuse_teacher_accuracy: bool = Field(
        True,
        description="the teachers' accuracy before training is measured once per teacher, eval set and decoding "
        "settings and then read from the cache (driver/accuracy_cache.py); false = measure it again",
    )
    save_final: bool = True
    """save the trained student in run_dir/student (a Hugging Face folder)"""
    checkpoint_every: int = Field(
        0,
        ge=0,
        description="steps between checkpoints, and one at the last step (a finished run can be extended); 0 = none",
    )
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept")
    max_actor_restarts: int = Field(3, ge=0, description="restarts of each rollout worker / teacher replica")
    max_bad_steps: int = Field(
        3, ge=1, description="consecutive steps with a non-finite loss (updates skipped) before the run stops"
    )
    timeouts: TimeoutsSpec = TimeoutsSpec()
    stop_on: list[str] = Field(
        default_factory=list,
        description="conditions of the OPD doctor (health) that stop the run when they fire, e.g. [collapse]",
    )

    def shard_size(self, num_workers: int) -> int:
        return self.prompts_per_shard or max(1, -(-self.prompts_per_step // num_workers))


# The repetition rule (opd_ray/data/repetition.py): the cold start's filter and the doctor's count.
REPEAT_NGRAM = 4
MAX_NGRAM_REPEATS = 3
