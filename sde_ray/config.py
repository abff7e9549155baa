"""The one typed config tree of sde_ray, with strict YAML loading and dotted overrides.

Precedence is CLI override > YAML file > the defaults written here. Loading is strict: an unknown
key or a value of the wrong type raises `ConfigError` naming the dotted key and the closest valid
names, and `validate()` rejects invalid combinations before any Ray worker starts. Every field
carries its documentation in `metadata["doc"]`; `describe()` prints them.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config key, value or combination that cannot be used; the message names the key."""


def doc(default: Any, text: str) -> Any:
    """A dataclass field with a default (copied for mutables) and its documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata={"doc": text})
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


ScheduleKind = Literal["linear", "cosine", "sigmoid", "step", "constant"]


@dataclass
class ScheduleConfig:
    """A curriculum curve on t = step / total_steps, rising from `start` to `end`."""

    kind: ScheduleKind = doc("cosine", "Curve shape: linear | cosine | sigmoid | step | constant.")
    warmup: float = doc(0.0, "Fraction of training held at `start` before the curve begins.")
    start: float = doc(0.0, "Value at t <= warmup.")
    end: float = doc(1.0, "Value at t = 1.")
    sigmoid_steepness: float = doc(10.0, "Steepness of the sigmoid curve (logistic slope at its centre).")
    num_steps: int = doc(4, "Number of equal plateaus for the `step` curve.")


@dataclass
class LoraConfig:
    enabled: bool = doc(False, "Wrap the backbone with peft LoRA adapters.")
    r: int = doc(8, "LoRA rank (VLM2Vec's best Phi-3.5-V model uses 8).")
    alpha: int = doc(16, "LoRA alpha.")
    dropout: float = doc(0.05, "LoRA dropout.")
    target_modules: list[str] = doc(["q_proj", "k_proj", "v_proj", "o_proj"], "Module names to adapt.")


@dataclass
class ModelConfig:
    kind: Literal["dual_encoder", "vlm"] = doc(
        "dual_encoder", "dual_encoder: CLIP/SigLIP-style towers; vlm: VLM2Vec-style last-token embedder."
    )
    name_or_path: str = doc(
        "tiny-clip",
        "Hugging Face id or local path passed to from_pretrained. The names tiny-clip, tiny-siglip, "
        "tiny-qwen2-vl, tiny-qwen2.5-vl and tiny-qwen3-vl build a randomly initialised tiny model (and "
        "tokenizer/processor) in code.",
    )
    vision_name_or_path: str = doc(
        "",
        "Assemble a dual encoder (transformers' VisionTextDualEncoderModel) from this vision checkpoint (HF id or "
        "local path) and model.text_name_or_path; needs model.name_or_path='' and kind=dual_encoder.",
    )
    text_name_or_path: str = doc("", "The text checkpoint of an assembled dual encoder (with model.vision_name_or_path).")
    pooling: Literal["cls", "mean"] = doc(
        "cls",
        "Assembled dual encoders: each tower's embedding is its first token (cls) or the attention-masked mean of "
        "its last hidden states (mean; sentence-transformers' pooling). Other checkpoints pool as their heads do.",
    )
    projection_dim: int = doc(
        0,
        "Assembled dual encoders: width of the joint space; 0: the text tower's width, with the text projection "
        "(and a vision projection of the same shape) initialised to the identity, so it starts as the towers' own pooling.",
    )
    init_from: str = doc(
        "",
        "Warm start: copy the weights of this exported model (a run directory or its model/ folder) into the "
        "freshly built encoder; the architecture must match. Empty: the checkpoint's/random weights.",
    )
    image_size: int = doc(
        32,
        "Input resolution of the tiny models (for tiny VLMs: their processor's default max_pixels, image_size² "
        "rounded up to a multiple of patch×merge); CLIP/SigLIP checkpoints use their processor's.",
    )
    min_pixels: int = doc(
        0,
        "VLMs (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): images keep their aspect ratio and are resized to multiples of "
        "patch×merge with at least this many pixels (the processor's smart_resize); visual tokens = pixels / "
        "(patch×merge)², e.g. 256·28² -> 256 tokens on Qwen2-VL. 0: the image processor's own.",
    )
    max_pixels: int = doc(
        0,
        "VLMs: at most this many pixels per image (bounds an image's visual tokens, the padded width of the "
        "batches' patch arrays and the sequence length). 0: the image processor's own (Qwen2-VL's is 16,384 "
        "tokens: set it).",
    )
    video_frames: int = doc(
        0,
        "VLMs (Qwen2-VL, Qwen2.5-VL): frames per video side (MMEB-V2 video sets; sampled uniformly when the shards "
        "are written, sde_ray/data/convert_v2.py), fed to the backbone as video (temporal patches, video grid). "
        "0: no video columns (image-only jobs keep their batch layout and sequence length).",
    )
    video_max_pixels: int = doc(
        0,
        "VLMs with video_frames > 0: the pixels of a whole video (all frames) are bounded by this; each frame gets "
        "an even share (at most model.max_pixels), so video tokens <= video_max_pixels / (patch×merge)² x temporal "
        "patch. 0: video_frames × max_pixels / temporal patch size.",
    )
    max_text_length: int = doc(48, "Token limit for queries and targets.")
    prompt_format: Literal["vlm2vec", "chat"] = doc(
        "vlm2vec",
        "VLMs: vlm2vec: MMEB's text as it is, the image block where its placeholder was (VLM2Vec); chat: the "
        "reference embedders' (Qwen3-VL-Embedding's) chat turns: the query's task instruction in the system turn, "
        "none on candidates (model.default_instruction there), the image then the content in the user turn, "
        "pooled at the end of the assistant prompt.",
    )
    default_instruction: str = doc(
        "Represent the user's input.", "prompt_format=chat: the system turn of a side without a task instruction."
    )
    image_token: str = doc("<|image_1|>", "MMEB's image placeholder, swapped for the backbone's own token.")
    check_inputs: bool = doc(
        False,
        "Debug switch: VLMs check every batch's image-pad token counts against its image grids. Each check reads "
        "the device (a host sync per side); by default it runs on the model's first forward only (the batches "
        "come from the same BatchProcessor), and the forward reads nothing back from the device.",
    )
    normalize: bool = doc(True, "L2-normalise embeddings before the contrastive logits.")
    gradient_checkpointing: bool = doc(False, "Enable activation checkpointing in the backbone.")
    lora: LoraConfig = doc(LoraConfig(), "Optional LoRA adapters.")


@dataclass
class SynthConfig:
    seed: int = doc(0, "Seed of the synthetic MMEB generator.")
    train_per_subset: int = doc(384, "Training pairs per synthetic MMEB-train subset.")
    eval_per_dataset: int = doc(100, "Queries per synthetic MMEB-eval dataset.")
    num_candidates: int = doc(8, "Candidates per eval query (the positive is candidate 0).")
    noisy_correspondence: float = doc(0.0, "Fraction of training pairs whose positive is swapped for a mismatch.")
    image_size: int = doc(32, "Side of the generated square images, in pixels.")
    mixed_sizes: bool = doc(
        False, "Resize each generated image to one of five shapes around image_size (square, 2:1 wide, 1:3 tall, "
        "larger, 3:2): data for a VLM's dynamic resolution."
    )


@dataclass
class DataConfig:
    source: Literal["synthetic", "mmeb"] = doc(
        "synthetic", "synthetic: generate the built-in synthetic MMEB into the cache; mmeb: use `mmeb_train_dir`."
    )
    cache_dir: str = doc("~/.cache/sde_ray", "Where generated data and converted shards are cached.")
    mmeb_train_dir: str = doc("", "Root of MMEB-train as released (one folder per subset).")
    mmeb_eval_dir: str = doc("", "Root of MMEB-eval as released (one folder per dataset).")
    shards: list[str] = doc([], "WebDataset shard paths or globs (local or fsspec URLs); empty: the converted cache.")
    subsets: list[str] = doc([], "MMEB-train subsets to use; empty means all found.")
    split: str = doc("original", "MMEB-train split: original | diverse_instruction | train (legacy).")
    samples_per_shard: int = doc(1024, "Samples per .tar shard written by the converter (one Ray Data read task each).")
    shard_check: Literal["manifest", "headers", "sha256"] = doc(
        "manifest", "How a launch checks each shard that its manifest lists: manifest (its byte size, a stat or a "
        "listing; counts from the manifest, no shard opened), headers (also parse every tar header: the pre-issue-28 "
        "check, seconds per 100k samples: docs/benchmarks.md) or sha256 (also hash every byte against the conversion's checksum; "
        "`sde-ray data verify` does this once). A mismatching shard is skipped, counted and reported."
    )
    shuffle_seed: int = doc(0, "Seed of the per-epoch shard-order and sample shuffle (the epoch order, docs/data.md).")
    shuffle_window: int = doc(
        8192, "Rows of the sample-shuffle window (rounded down to whole global batches): consecutive rows of "
        "the epoch's shard-ordered stream permuted together; each worker holds its share of one window decoded."
    )
    epoch_lookahead: bool = doc(
        True, "Open the next epoch's Ray dataset on a background thread once the current epoch is in its last "
        "shuffle window, so the next epoch's first window is read while this one trains (no stall at each "
        "epoch start; one more window decoded per worker meanwhile). Batches and resume positions are unchanged."
    )
    preprocess_concurrency: int = doc(1, "Concurrent Ray Data CPU tasks that read a shard, decode, resize and tokenize.")
    preprocess_batch_size: int = doc(64, "Rows the batch processor handles per call (bounds a task's decoded pixels).")
    data_cpus: float = doc(1.0, "CPUs reserved for Ray Data, never handed to training workers.")
    target_block_mb: float = doc(
        32.0, "Ray Data block size target (MB) of the preprocessed stream; near one processor chunk avoids "
        "re-concatenating chunks into Ray's 128 MB default blocks (docs/data.md)."
    )
    batching: Literal["random", "same_subset", "teacher_cluster"] = doc(
        "random", "Which rows share a global batch (the epoch order, docs/data.md): random (windowed shuffle), "
        "same_subset (each global batch from one subset, by the sample key; VLM2Vec-V2) or teacher_cluster (the "
        "clusters of data.negatives_sidecar laid end to end; B3). Rows that fill no whole batch sit out the epoch."
    )
    negatives_sidecar: str = doc(
        "", "Folder of a `sde-ray mine` sidecar (sample key -> mined negative keys, teacher cluster) joined by "
        "sample key: mined negatives with loss.negatives_per_query, clusters with data.batching=teacher_cluster."
    )
    synth: SynthConfig = doc(SynthConfig(), "The synthetic MMEB generator.")
    synth_v2: bool = doc(
        False, "data.source=synthetic: also train on the synthetic MMEB-V2 (moving-shape videos as frame folders, "
        "rendered document pages; sde_ray/data/synth_v2.py) and score a held-out synthetic V2 after training: "
        "image / video / visdoc / overall (configs/mmeb_v2_synth.yaml). Video sides need a VLM with "
        "model.video_frames > 0; other models see a video's middle frame.",
    )


@dataclass
class SpectralConfig:
    mode: Literal["gather", "gram", "auto"] = doc(
        "auto", "gather: all-gather rows then SVD; gram: all-reduce FᵀF then eigh; auto: pick by shape."
    )
    noise_estimator: Literal["gavish_donoho", "iqr"] = doc(
        "gavish_donoho", "Robust estimate of the noise entry std s from the bulk of the spectrum."
    )
    tw_margin: float = doc(3.0, "Tracy-Widom margin: the MP edge is raised by this many min(N,d)^(-2/3) relative units.")
    fence: Literal["iqr", "energy", "log_gap"] = doc("iqr", "Rule that separates strong from weak above the noise edge.")
    iqr_k: float = doc(1.5, "Tukey fence multiplier k in Q3 + k·IQR.")
    energy_fraction: float = doc(0.5, "For fence=energy: strong directions hold this share of the signal energy.")
    partition: Literal["hard", "soft"] = doc(
        "hard",
        "hard: 0/1 strong/weak/noise masks (the paper's reading; a σ at a threshold flips sets); soft: logistic "
        "memberships in log σ around the same thresholds, so Δ is continuous in σ (needs fence=iqr). docs/spectral.md.",
    )
    soft_width: float = doc(
        1.0, "partition=soft: logistic width in log σ, in Tracy-Widom units min(N,d)^(-2/3) (as tw_margin)."
    )
    eps_strong: float = doc(0.1, "ε_s: strength of the strong-subspace perturbation.")
    eps_weak: float = doc(0.1, "ε_w: how far weak directions are scaled down at α = 1.")
    eps_noise: float = doc(0.5, "ε_n: how hard noise directions are attenuated at α = 0.")
    rho: float = doc(0.1, "Frobenius bound: ‖Δ‖_F ≤ ρ‖Σ‖_F.")
    strong_perturbation: Literal["random", "adversarial"] = doc(
        "random", "ξ for strong directions: uniform in [-1, 1], or the sign that increases the contrastive loss."
    )
    alpha: ScheduleConfig = doc(ScheduleConfig(kind="cosine"), "Curriculum α(t) of the enhancement.")
    auto_gram_ratio: float = doc(
        1.0, "mode=auto picks gram when N·d·ratio >= d² (i.e. the global batch is at least d/ratio rows)."
    )


@dataclass
class FANoiseConfig:
    power: float = doc(0.5, "Per-direction noise std ∝ σ_i^p (sublinear for p < 1).")
    strength: float = doc(0.1, "Peak relative noise energy (share of ‖F‖²_F).")
    schedule: ScheduleConfig = doc(ScheduleConfig(kind="cosine", start=1.0, end=0.0), "Noise strength over training.")
    inject: Literal["both", "query", "target"] = doc("both", "Which modality's features get the noise.")


@dataclass
class DisNCLConfig:
    invariant_fraction: float = doc(0.5, "Share of the embedding dimensions used as the modality-invariant part.")
    soft_target_smoothing: float = doc(0.1, "Weight of intra-modal similarity in the soft many-to-many targets.")
    soft_target_temperature: float = doc(0.1, "Temperature of the intra-modal similarity used for soft targets.")
    mismatch_temperature: float = doc(0.1, "Temperature of the pair-confidence weights (lower: harsher down-weighting).")
    w_exclusive: float = doc(0.1, "Weight of the decorrelation between invariant and exclusive parts.")
    mismatch_warmup: float = doc(0.1, "Fraction of training with all pair weights 1 (similarities are meaningless at init).")


@dataclass
class DSRSDConfig:
    shared_dim: int = doc(32, "Dimension of the shared (projection) stream.")
    w_decorrelation: float = doc(0.05, "Weight of the off-diagonal shared-covariance penalty.")
    w_orthogonality: float = doc(0.05, "Weight of the shared/private orthogonality penalty.")
    w_regression: float = doc(0.1, "Weight of the cross-modal regression between shared factors.")
    w_instance: float = doc(1.0, "Weight of InfoNCE on the full features (what the evaluator embeds); 0: shared stream only.")


@dataclass
class GapConfig:
    remedy: Literal["procrustes", "shared_projection"] = doc("procrustes", "Which modality-gap remedy to regularise.")
    w_gap: float = doc(0.1, "Weight of the gap regulariser.")
    k: int = doc(8, "Rank of the shared subspace for shared_projection.")
    w_centroid: float = doc(0.1, "Weight of the squared centroid gap ‖μ_q − μ_t‖² of normalised features.")


LossName = Literal["sde", "infonce", "fanoise", "disncl", "dsrsd", "gap"]


@dataclass
class LossConfig:
    name: LossName = doc("sde", "Objective: sde | infonce | fanoise | disncl | dsrsd | gap.")
    temperature: float = doc(0.05, "InfoNCE temperature τ in [0.01, 1] (VLM2Vec uses 0.02 with pretrained backbones).")
    learnable_temperature: bool = doc(
        False, "Learn log(1/τ) as a parameter (no weight decay), clamped in place to [0, ln 100] after each step.")
    lambda_schedule: ScheduleConfig = doc(
        ScheduleConfig(kind="linear", start=0.5, end=1.0), "λ(t) weighting instance vs spectral terms; start = λ_0."
    )
    w_hellinger: float = doc(1.0, "Weight of the Hellinger spectral-distribution term.")
    w_subspace: float = doc(1.0, "Weight of the subspace-consistency term.")
    w_snr: float = doc(0.1, "Weight of the SNR regulariser.")
    hellinger_on: Literal["singular", "energy"] = doc("singular", "Distributions compared: σ/Σσ or σ²/Σσ².")
    hellinger_numerical_rank: bool = doc(
        True,
        "SDE: no Hellinger gradient through directions below the numerical rank (σ ≤ σ_1·max(N,d)·eps), whose "
        "singular vectors are rounding noise and make the step depend on the row order; false: the old behaviour.",
    )
    subspace_k: int = doc(8, "Rank k of the compared top-k right singular subspaces.")
    subspace_form: Literal["projector", "surrogate"] = doc(
        "surrogate", "projector: ‖P_q − P_t‖²/2k; surrogate: 1 − ‖F_t V_q‖²/‖F_t‖² with detached bases."
    )
    duplicate_targets: Literal["ignore", "mask", "multi_positive"] = doc(
        "ignore", "Identical targets in a batch: ignore (one-hot), mask them from negatives, or count them positive."
    )
    duplicate_key: Literal["pair", "target"] = doc(
        "pair", "What makes rows duplicates for mask/multi_positive: pair = they share their target or their "
        "query (transitively: a label text -> image subset repeats its queries), target = identical targets only."
    )
    negatives_per_query: int = doc(
        0, "Explicit negatives per query (the dataset's neg_* columns or a mined sidecar) added, shared across "
        "the global batch, to the InfoNCE candidates; 0 = in-batch negatives only."
    )
    fanoise: FANoiseConfig = doc(FANoiseConfig(), "FANoise settings.")
    disncl: DisNCLConfig = doc(DisNCLConfig(), "DisNCL settings.")
    dsrsd: DSRSDConfig = doc(DSRSDConfig(), "DSRSD-Net settings.")
    gap: GapConfig = doc(GapConfig(), "Modality-gap regulariser settings.")


@dataclass
class TrainConfig:
    max_steps: int = doc(60, "Optimizer steps in the run.")
    global_batch_size: int = doc(64, "Samples per optimizer step across all workers (the contrastive batch).")
    micro_batch_size: int = doc(
        0,
        "Rows per encoder forward pass on each worker (a GradCache chunk; bounds activation memory only, the "
        "contrastive and spectral batch stay train.global_batch_size). 0: the whole local batch "
        "(global / workers), the plain one-forward step.",
    )
    chunk_tokens: int = doc(
        0,
        "Token budget of one GradCache chunk on each worker, for batches whose rows differ in length (dynamic "
        "resolution, documents): a chunk ends before the row that would take its padded token positions "
        "(sequences × trimmed width, queries + targets + negatives; a VLM's visual tokens included) over it, "
        "and holds at most train.micro_batch_size rows when that is set. Every rank runs as many chunks as the "
        "rank that needs most (one all-reduce per step); DeepSpeed's accumulation is then the step's own "
        "(managed_gradient_accumulation=false). 0: chunks of train.micro_batch_size rows.",
    )
    lr: float = doc(1e-3, "Peak learning rate.")
    vision_lr_scale: float = doc(
        1.0, "The vision tower's learning rate as a multiple of train.lr (its own AdamW parameter groups, on "
        "the same schedule); 0 freezes the tower (no gradient, no optimizer state). For a pretrained tower "
        "next to one trained from scratch (docs/models.md, bring your own checkpoints).")
    text_lr_scale: float = doc(
        1.0, "The text tower's (a VLM: the language model's) learning rate as a multiple of train.lr; 0 freezes "
        "it. The objective's own parameters (a learnable temperature) keep train.lr.")
    weight_decay: float = doc(0.01, "AdamW weight decay.")
    adam_beta1: float = doc(0.9, "AdamW β1.")
    adam_beta2: float = doc(
        0.98, "AdamW β2. 0.98 is CLIP's / open_clip's choice for contrastive training; transformers' Trainer "
        "(VLM2Vec's recipes) uses 0.999."
    )
    adam_eps: float = doc(1e-6, "AdamW ε (CLIP's 1e-6; transformers' Trainer uses 1e-8).")
    warmup_steps: int = doc(10, "Linear learning-rate warm-up steps.")
    lr_schedule: Literal["cosine", "linear", "constant"] = doc("cosine", "Decay after warm-up.")
    grad_clip: float = doc(1.0, "Gradient norm clip (0 disables).")
    seed: int = doc(0, "Global seed (model init, enhancement noise).")
    checkpoint_every: int = doc(20, "Steps between checkpoints (a final one is always written).")
    checkpoint_every_minutes: float = doc(
        0.0, "Also checkpoint when this many minutes have passed since the last one (wall clock, the slowest "
        "rank's; 0: by step only): bounds the GPU time a preemption can lose.")
    checkpoint_upload: Literal["async", "sync"] = doc(
        "async", "Periodic checkpoints: saved to node-local scratch, then uploaded in the background while "
        "training goes on (async; Ray Train's CheckpointUploadMode.ASYNC) or before the next step (sync). "
        "The final and the preemption checkpoints are always uploaded before the workers return.")
    keep_checkpoints: int = doc(2, "Checkpoints kept on storage.")
    checkpoint_frozen: bool = doc(
        False, "Also write the frozen parameters (a LoRA or frozen tower's base weights) into every checkpoint. "
        "Off: a checkpoint holds the trainable parameters, optimizer and objective state, and names the base "
        "by id and content hash; a resume rebuilds the frozen part from the base (docs/training.md).")
    eval_every: int = doc(0, "Steps between on-the-fly P@1 validations (0: only at the end).")
    log_every: int = doc(5, "Steps between metric reports.")
    stop_check_every: int = doc(
        10, "Steps between two readings of the driver's stop flag (a SIGTERM, sde_ray/train/preemption.py): "
        "rank 0's Ray actor call and one all-reduce, a host sync, so not every step; it is also read at every "
        "logged step. A SIGTERM stops the run within this many steps (size the grace period to it).")
    nan_policy: Literal["raise", "skip"] = doc("raise", "A non-finite loss or gradient (on any rank) aborts the run, or skips that step whole.")
    max_nan_skips: int = doc(3, "With nan_policy=skip, consecutive non-finite steps tolerated before aborting.")
    output_dir: str = doc("runs/default", "Run outputs: resolved config, metrics, checkpoints, plots, results.")
    storage_path: str = doc("", "Ray Train storage (shared FS or s3:// for multi-node); empty: <output_dir>/ray.")
    run_name: str = doc("sde", "Ray Train run name; relaunching with the same name resumes.")
    on_config_change: Literal["refuse", "fork", "override"] = doc(
        "refuse", "Relaunch into an output_dir recorded under another config: refuse (list the differing keys), "
        "fork (a new run <output_dir>-fork-<hash>) or override (continue; logged in config_history.jsonl)."
    )


@dataclass
class ScalingConfig:
    num_workers: int = doc(2, "Training workers (fixed size).")
    min_workers: int = doc(0, "Elastic lower bound; 0 disables elastic training.")
    max_workers: int = doc(0, "Elastic upper bound (used with min_workers).")
    cpus_per_worker: float = doc(1.0, "CPUs per training worker.")
    use_gpu: bool = doc(False, "One GPU per worker (NCCL); CPU runs use gloo.")
    max_failures: int = doc(2, "Worker-group restarts from the latest checkpoint before giving up.")
    elastic_resize_monitor_interval_s: float = doc(10.0, "How often an elastic run reconsiders its size.")
    address: str = doc("", "Ray cluster address; empty: join RAY_ADDRESS if set, else start a local Ray.")
    worker_node_resource: str = doc(
        "", "A custom Ray resource marking the nodes that training workers and eval actors may use (each asks "
        "0.001 of it: placement only; CPUs and GPUs still bound how many fit), e.g. gpu_node for nodes started "
        "with --resources='{\"gpu_node\": 1}'; empty: any node, the head included.")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = doc(2, "ZeRO stage 0-3.")
    precision: Literal["fp32", "bf16", "fp16"] = doc("fp32", "Training precision (fp16 needs a GPU).")
    offload_optimizer: bool = doc(False, "ZeRO-Offload of optimizer state to CPU memory.")
    zero_init: bool = doc(
        False, "ZeRO-3 full fine-tuning: the backbone loads already partitioned (transformers' from_pretrained "
        "under DeepSpeed's zero.Init), so no rank ever holds the whole model. Needs zero_stage 3 and a "
        "from_pretrained checkpoint in model.name_or_path; not with LoRA or model.init_from.")
    overrides: dict[str, Any] = doc({}, "Raw DeepSpeed JSON keys applied last (logged on rank 0).")


@dataclass
class TuneConfig:
    num_samples: int = doc(4, "Trials to sample from the search space.")
    metric: str = doc("val_p_at_1", "Metric the scheduler and search optimise.")
    mode: Literal["max", "min"] = doc("max", "Whether the metric is maximised or minimised.")
    search_alg: Literal["random", "grid", "optuna", "hyperopt"] = doc("random", "Search algorithm.")
    scheduler: Literal["asha", "hyperband", "fifo"] = doc("asha", "Trial scheduler (early stopping).")
    grace_period: int = doc(1, "ASHA/HyperBand: reports before a trial may be stopped.")
    reduction_factor: int = doc(2, "ASHA/HyperBand reduction factor.")
    max_concurrent_trials: int = doc(0, "Concurrent trials; 0: as many as the cluster's CPUs/GPUs fit.")
    space: dict[str, Any] = doc({}, "Search space: dotted config key -> {type: choice|uniform|loguniform|randint|grid, ...}.")


@dataclass
class EvalConfig:
    data_dir: str = doc("", "MMEB-eval layout root; empty: the synthetic eval split in the cache.")
    datasets: list[str] = doc([], "Datasets to evaluate; empty means all found.")
    batch_size: int = doc(64, "Encoding batch size.")
    num_workers: int = doc(1, "Ray workers encoding in parallel (one GPU each when the cluster has GPUs).")
    decode_concurrency: int = doc(
        0, "Ray Data CPU tasks reading, decoding, resizing and tokenising the eval items for the encoding "
        "workers (one CPU each); 0: as many as Ray Data's autoscaling gives.")
    val_data_dir: str = doc(
        "", "MMEB-eval layout root validated on during training (what sweeps tune on). Empty: the synthetic "
        "set's validation split (its own draw: no query of the evaluation split), else `data_dir`'s first rows, "
        "which the final evaluation scores too (the driver says so).")
    val_queries: int = doc(200, "Validation queries: the first ceil(val_queries / #datasets) rows of each dataset.")
    gap_remedy: Literal["none", "procrustes", "shared_projection"] = doc("none", "Eval-time modality-gap remedy.")


@dataclass
class LoggingConfig:
    wandb: bool = doc(True, "Log to Weights & Biases on rank 0.")
    wandb_project: str = doc("sde_ray", "W&B project.")
    wandb_group: str = doc("", "W&B group (sweeps set one per sweep).")
    wandb_mode: Literal["offline", "online", "disabled", "auto"] = doc(
        "auto", "auto: online when WANDB_API_KEY is set, else offline."
    )
    console_every: int = doc(5, "Steps between console progress lines.")


@dataclass
class MineConfig:
    """`sde-ray mine`: offline hard-negative mining with a teacher checkpoint (sde_ray/mine.py)."""

    top_k: int = doc(4, "Negatives kept per query after the false-negative filter.")
    margin: float = doc(
        0.05, "Drop candidates whose cosine is above (positive's cosine − margin): likely false negatives."
    )
    within_subset: bool = doc(True, "Search candidates among targets of the query's own subset only.")
    num_workers: int = doc(2, "Encoding actors (one GPU each when the cluster has GPUs).")
    batch_size: int = doc(64, "Rows per encoding batch.")
    cluster_size: int = doc(
        0, "Mean rows per teacher cluster (k-means on the teacher's targets) for data.batching=teacher_cluster; "
        "must divide train.global_batch_size (0: no clusters)."
    )


@dataclass
class EmbedConfig:
    """`sde-ray embed` (Ray Data batch inference over a corpus) and `sde-ray search` (sde_ray/embed/)."""

    instruction: str = doc(
        "", "Instruction of every item, in MMEB's prompt format (`<|image_1|>\\n<instruction>: <text>\\n`, as "
        "`sde_ray.data.mmeb.format_prompt`); empty: each item's text as it is.")
    side: Literal["query", "target"] = doc(
        "target", "Model side the items are encoded as (query: the eval's queries; target: its candidates).")
    text_column: str = doc("text", "Parquet column (WebDataset member suffix) of an item's text; absent: no text.")
    image_column: str = doc(
        "image", "Parquet column of an item's image (encoded bytes, or a path relative to the table's folder); "
        "in WebDataset shards the first of jpg, jpeg, png, webp, img when this member is absent.")
    id_column: str = doc("id", "Parquet column of an item's id; absent: `<file stem>:<row>`.")
    rows_per_file: int = doc(4096, "Rows per output parquet file (the unit a rerun skips when finished).")
    batch_size: int = doc(64, "Rows per encoding batch.")
    num_workers: int = doc(1, "Encoding actors (one GPU each when the cluster has GPUs).")
    decode_concurrency: int = doc(1, "CPU tasks decoding images and tokenizing (one CPU each).")
    search_chunk_rows: int = doc(65536, "Corpus rows per chunk of the exact top-k (bounds its memory).")
    hnsw_m: int = doc(32, "faiss HNSW graph degree of the approximate index.")
    hnsw_ef_search: int = doc(64, "faiss HNSW search breadth (recall vs speed).")
    hnsw_ef_construction: int = doc(80, "faiss HNSW build breadth.")


@dataclass
class ServeConfig:
    """`sde-ray serve`: the Ray Serve `/v1/embeddings` endpoint (sde_ray/embed/serve.py)."""

    host: str = doc("127.0.0.1", "HTTP host of Serve's proxy.")
    port: int = doc(8000, "HTTP port of Serve's proxy (0: a free port).")
    num_replicas: int = doc(1, "Model replicas (one GPU each when the cluster has GPUs).")
    max_batch_size: int = doc(32, "serve.batch: most items encoded together.")
    batch_wait_timeout_s: float = doc(0.01, "serve.batch: longest wait for a batch to fill.")
    max_items: int = doc(64, "Most items in one request (more: HTTP 413).")
    max_image_bytes: int = doc(8 << 20, "Largest encoded image accepted (more: HTTP 413).")
    max_image_pixels: int = doc(4096 * 4096, "Largest decoded image (width x height) accepted (more: HTTP 413).")
    max_text_chars: int = doc(16384, "Longest text accepted (more: HTTP 413).")
    image_root: str = doc("", "Folder local image paths/URLs must lie under; empty: local files are refused.")


@dataclass
class Config:
    model: ModelConfig = doc(ModelConfig(), "The encoder.")
    data: DataConfig = doc(DataConfig(), "Data source, shards and the Ray Data pipeline.")
    spectral: SpectralConfig = doc(SpectralConfig(), "SDE's spectral stage.")
    loss: LossConfig = doc(LossConfig(), "The objective.")
    train: TrainConfig = doc(TrainConfig(), "Optimisation, checkpoints and outputs.")
    scaling: ScalingConfig = doc(ScalingConfig(), "Ray Train workers and fault tolerance.")
    deepspeed: DeepSpeedConfig = doc(DeepSpeedConfig(), "DeepSpeed engine.")
    tune: TuneConfig = doc(TuneConfig(), "Ray Tune sweeps.")
    eval: EvalConfig = doc(EvalConfig(), "MMEB evaluation.")
    logging: LoggingConfig = doc(LoggingConfig(), "Console and W&B.")
    mine: MineConfig = doc(MineConfig(), "Offline hard-negative mining.")
    embed: EmbedConfig = doc(EmbedConfig(), "Batch embedding of a corpus and search over it.")
    serve: ServeConfig = doc(ServeConfig(), "The HTTP embedding endpoint.")


# ---------------------------------------------------------------------------------------------
# Strict conversion from plain YAML data


def _close_names(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f"{hint} Valid keys: {', '.join(sorted(valid))}."


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Checks `value` against `annotation`, converting ints to floats; raises ConfigError on mismatch."""
    origin = get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}.")
        return _build(annotation, value, key)
    if annotation is Any:
        return value
    if origin is Literal:
        choices = get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}.")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in get_args(annotation):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}.")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}.")
        (item_type,) = get_args(annotation)
        return [_convert(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}.")
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}.")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}.")
        return value
    if annotation is float:
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads `3e-4` as a string; users mean a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}.")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}.")
        return value
    raise ConfigError(f"{key}: unsupported annotation {annotation!r}.")


# Keys that existed once: loading one names its replacement instead of "unknown key".
REMOVED_KEYS: dict[str, str] = {
    "train.grad_accumulation": (
        "train.grad_accumulation was removed: it split the contrastive batch. The contrastive and spectral "
        "batch is always train.global_batch_size; set train.micro_batch_size (rows per forward pass, "
        "GradCache chunks) to bound memory instead."
    ),
}


def _unknown_key(dotted: str, key: str, names: list[str]) -> ConfigError:
    if dotted in REMOVED_KEYS:
        return ConfigError(REMOVED_KEYS[dotted])
    return ConfigError(f"Unknown config key '{dotted}'.{_close_names(key, names)}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise _unknown_key(dotted, str(key), names)
        kwargs[key] = _convert(value, hints[key], dotted)
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    """A plain nested dict (YAML/JSON friendly) of a config dataclass."""
    return dataclasses.asdict(config)


def from_dict(data: dict | None, cls: type = Config) -> Any:
    """Builds a config strictly from nested plain data; missing keys take their defaults."""
    return _build(cls, data or {}, "")


def _leaf_annotation(parts: list[str]) -> Any:
    """The annotation of the dotted key `parts` in the Config tree; None past a free mapping or an
    unknown name (`_set_path` reports those with the valid names)."""
    cls: Any = Config
    for part in parts:
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        cls = hints[part]
    return cls


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a', 'b', 'c'], value): parsed as YAML (3 -> int, [1,2] -> list), except
    for a string-typed key, whose text is taken verbatim (a path keeps its `#`, `: `, quotes and
    spaces); a string key's value wholly in '...' or "..." is unquoted as YAML would.

    The one place a value is parsed from a string: the CLI edge (and a sweep file's `overrides:`).
    Values set from Python (the CLI's --output-dir, resolved paths) never pass through here.
    """
    if "=" not in text:
        raise ConfigError(f"Override '{text}' must look like key.sub=value.")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"Override '{text}' has an empty key part.")
    parts = key.split(".")
    quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
    if _leaf_annotation(parts) is str and not quoted:
        return parts, raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"Override '{text}': value is not valid YAML ({exc}).") from exc
    return parts, value


def _set_path(node: Any, annotation: Any, parts: list[str], value: Any, done: str, full: str) -> Any:
    """A copy of `node` (a config dataclass or a free mapping) with `parts` set to `value`."""
    part, dotted = parts[0], f"{done}.{parts[0]}" if done else parts[0]
    if dataclasses.is_dataclass(annotation):
        names = [f.name for f in dataclasses.fields(annotation)]
        if part not in names:
            raise _unknown_key(dotted, part, names)
        hint = typing.get_type_hints(annotation)[part]
        if len(parts) == 1:
            return dataclasses.replace(node, **{part: _convert(value, hint, dotted)})
        if not dataclasses.is_dataclass(hint) and get_origin(hint) is not dict:
            raise ConfigError(f"'{dotted}' is a value, not a section; cannot set '{full}'.")
        return dataclasses.replace(node, **{part: _set_path(getattr(node, part), hint, parts[1:], value, dotted, full)})
    out = dict(node)  # a free mapping (deepspeed.overrides, tune.space): no schema below this point
    if len(parts) == 1:
        out[part] = copy.deepcopy(value)
        return out
    child = out.get(part, {})
    if not isinstance(child, dict):
        raise ConfigError(f"'{dotted}' is not a mapping; cannot set '{full}'.")
    out[part] = _set_path(child, dict, parts[1:], value, dotted, full)
    return out


def with_values(config: Any, assignments: dict[str, Any] | list[tuple[str, Any]], check: bool = True) -> Any:
    """A copy of `config` with dotted keys set to typed values (each checked against the schema,
    in order), validated unless `check` is False. The one way a dotted key is set: CLI overrides,
    sweep assignments and resolved paths all come through here; `config` itself is not changed."""
    items = assignments.items() if isinstance(assignments, dict) else assignments
    out = copy.deepcopy(config)
    for key, value in items:
        parts = key.split(".") if isinstance(key, str) else list(key)
        out = _set_path(out, type(out), parts, value, "", ".".join(parts))
    if check:
        validate(out)
    return out


def replace(config: Config, overrides: list[str]) -> Config:
    """A new validated config with dotted override strings (CLI syntax) applied to an existing one."""
    return with_values(config, [(".".join(parts), value) for parts, value in map(parse_override, overrides)])


def read_yaml(path: str | os.PathLike) -> dict:
    """The mapping in a YAML config file; every problem with the file is one `<path>: ...` line.

    A relative path is relative to the current directory (never to the package or the repo)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found (relative paths are read from {Path.cwd()}).")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a YAML config file.")
    try:
        text = path.read_text(encoding="utf-8")
        if "\x00" in text:
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "NUL byte")
        data = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (binary or not UTF-8).") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc}).") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {_yaml_problem(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}.")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: the problem and where (1-based line, column)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}."


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- dotted overrides, strictly checked and validated."""
    return replace(from_dict(read_yaml(path) if path else {}), list(overrides or []))


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Cross-field validation (runs on the driver before any worker starts)


def worker_counts(scaling: ScalingConfig) -> list[int]:
    """Every world size the run may have: one for fixed runs, min..max for elastic ones."""
    if scaling.min_workers or scaling.max_workers:
        return list(range(scaling.min_workers, scaling.max_workers + 1))
    return [scaling.num_workers]


def is_elastic(scaling: ScalingConfig) -> bool:
    return bool(scaling.min_workers or scaling.max_workers)


def local_batch_size(config: Config, world_size: int) -> int:
    """Per-worker rows of one optimizer step (this worker's share of the contrastive batch)."""
    train = config.train
    if world_size < 1 or train.global_batch_size % world_size:
        raise ConfigError(
            f"train.global_batch_size ({train.global_batch_size}) must be divisible by the world size "
            f"({world_size}); with elastic scaling, by every worker count in [min_workers, max_workers]."
        )
    return train.global_batch_size // world_size


def chunk_size(config: Config, world_size: int) -> int:
    """Rows per encoder forward pass (`train.micro_batch_size`; 0 means the whole local batch)."""
    local = local_batch_size(config, world_size)
    chunk = config.train.micro_batch_size or local
    if local % chunk:
        raise ConfigError(
            f"train.micro_batch_size ({chunk}) must divide the local batch train.global_batch_size / workers "
            f"({config.train.global_batch_size} / {world_size} = {local}); with elastic scaling, for every "
            "worker count in [min_workers, max_workers]."
        )
    return chunk


def check_precision(config: Config) -> None:
    for key in ("micro_batch_size", "chunk_tokens"):
        if config.deepspeed.precision == "fp16" and getattr(config.train, key):
            raise ConfigError(
                f"train.{key} (GradCache chunks) does not support deepspeed.precision=fp16: the dynamic loss "
                f"scale would scale the cached feature gradients twice; use bf16 or train.{key}=0."
            )
    if config.deepspeed.precision == "fp16" and not config.scaling.use_gpu:
        raise ConfigError("deepspeed.precision=fp16 needs a GPU (scaling.use_gpu=true); use bf16 or fp32 on CPU.")


def _check_schedule(schedule: ScheduleConfig, key: str) -> None:
    if not 0.0 <= schedule.warmup < 1.0:
        raise ConfigError(f"{key}.warmup must be in [0, 1), got {schedule.warmup}.")
    for name in ("start", "end"):
        value = getattr(schedule, name)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key}.{name} must be in [0, 1], got {value}.")
    if schedule.num_steps < 1:
        raise ConfigError(f"{key}.num_steps must be >= 1.")


def _leaves(instance: Any, prefix: str = "") -> typing.Iterator[tuple[str, Any]]:
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric key accepts: `low`/`high` bounds (None: unbounded), each closed or open;
    `why` is said with the error when the bound is not obvious."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def admits(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


def at_least(low: float, why: str = "") -> Range:
    return Range(low, why=why)


def above(low: float, why: str = "") -> Range:
    return Range(low, low_open=True, why=why)


def within(low: float, high: float, low_open: bool = False, high_open: bool = False, why: str = "") -> Range:
    return Range(low, high, low_open, high_open, why)


# The one place a numeric key's range is written (cross-field rules live in `validate`). A bad value
# here would otherwise reach the workers and fail there, once per allowed retry.
RANGES: dict[str, Range] = {
    "train.global_batch_size": at_least(1),
    "train.micro_batch_size": at_least(0, why="0: the whole local batch"),
    "train.chunk_tokens": at_least(0, why="0: chunks of train.micro_batch_size rows"),
    "train.warmup_steps": at_least(0),
    "train.weight_decay": at_least(0),
    "train.grad_clip": at_least(0),
    "train.adam_eps": above(0),
    "train.vision_lr_scale": at_least(0),
    "train.text_lr_scale": at_least(0),
    "train.keep_checkpoints": at_least(1),
    "train.eval_every": at_least(0),
    "train.max_nan_skips": at_least(0),
    "train.seed": at_least(0),
    "scaling.max_failures": at_least(0),
    "scaling.elastic_resize_monitor_interval_s": above(0),
    "model.image_size": at_least(1),
    "model.min_pixels": at_least(0),
    "model.max_pixels": at_least(0),
    "model.video_frames": at_least(0),
    "model.video_max_pixels": at_least(0),
    "model.max_text_length": at_least(1),
    "model.lora.r": at_least(1),
    "model.lora.alpha": above(0),
    "eval.batch_size": at_least(1),
    "eval.num_workers": at_least(1),
    "eval.decode_concurrency": at_least(0),
    "eval.val_queries": at_least(1),
    "embed.rows_per_file": at_least(1),
    "embed.batch_size": at_least(1),
    "embed.num_workers": at_least(1),
    "embed.decode_concurrency": at_least(1),
    "embed.search_chunk_rows": at_least(1),
    "embed.hnsw_m": at_least(2),
    "embed.hnsw_ef_search": at_least(1),
    "embed.hnsw_ef_construction": at_least(1),
    "serve.port": at_least(0),
    "serve.num_replicas": at_least(1),
    "serve.max_batch_size": at_least(1),
    "serve.batch_wait_timeout_s": at_least(0),
    "serve.max_items": at_least(1),
    "serve.max_image_bytes": at_least(1),
    "serve.max_image_pixels": at_least(1),
    "serve.max_text_chars": at_least(1),
    "data.shuffle_seed": at_least(0),
    "data.synth.train_per_subset": at_least(1),
    "data.synth.eval_per_dataset": at_least(1),
    "data.synth.num_candidates": at_least(2),
    "data.synth.image_size": at_least(1),
    "data.synth.seed": at_least(0),
    "spectral.tw_margin": at_least(0),
    "spectral.iqr_k": at_least(0),
    "spectral.auto_gram_ratio": above(0),
    "loss.w_hellinger": at_least(0),
    "loss.w_subspace": at_least(0),
    "loss.w_snr": at_least(0),
    "loss.dsrsd.w_decorrelation": at_least(0),
    "loss.dsrsd.w_orthogonality": at_least(0),
    "loss.dsrsd.w_regression": at_least(0),
    "loss.dsrsd.w_instance": at_least(0),
    "loss.disncl.w_exclusive": at_least(0),
    "loss.gap.w_gap": at_least(0),
    "loss.gap.w_centroid": at_least(0),
    "tune.num_samples": at_least(1),
    "tune.grace_period": at_least(1),
    "tune.reduction_factor": at_least(2),
    "tune.max_concurrent_trials": at_least(0),
    "logging.console_every": at_least(1),
    "model.lora.dropout": within(0, 1),
    "model.projection_dim": at_least(0),
    "spectral.energy_fraction": within(0, 1),
    "train.max_steps": at_least(1),
    "train.checkpoint_every": at_least(1),
    "train.checkpoint_every_minutes": at_least(0, why="0: by step only"),
    "train.log_every": at_least(1),
    "train.stop_check_every": at_least(1),
    "train.lr": above(0),
    "train.adam_beta1": within(0, 1, high_open=True),
    "train.adam_beta2": within(0, 1, high_open=True),
    "loss.temperature": within(0.01, 1, why="the temperature clamp's range; a value outside would be moved to "
                                            "the bound at the first step"),
    "loss.subspace_k": at_least(1),
    "loss.negatives_per_query": at_least(0),
    "loss.fanoise.power": above(0),
    "loss.fanoise.strength": at_least(0),
    "loss.disncl.invariant_fraction": within(0, 1, low_open=True),
    "loss.disncl.soft_target_temperature": above(0),
    "loss.disncl.mismatch_temperature": above(0),
    "loss.disncl.soft_target_smoothing": within(0, 1),
    "loss.disncl.mismatch_warmup": within(0, 1),
    "loss.dsrsd.shared_dim": above(0),
    "loss.gap.k": above(0),
    "spectral.eps_strong": at_least(0),
    "spectral.eps_weak": within(0, 1, why="it scales σ down, never flips it"),
    "spectral.eps_noise": within(0, 1, why="it scales σ down, never flips it"),
    "spectral.rho": at_least(0),
    "spectral.soft_width": above(0),
    "scaling.cpus_per_worker": above(0),
    "data.data_cpus": at_least(0),
    "data.samples_per_shard": at_least(1),
    "data.preprocess_batch_size": at_least(1),
    "data.preprocess_concurrency": at_least(1),
    "data.shuffle_window": at_least(1),
    "data.target_block_mb": above(0),
    "data.synth.noisy_correspondence": within(0, 1),
    "mine.top_k": at_least(1),
    "mine.num_workers": at_least(1),
    "mine.batch_size": at_least(1),
    "mine.cluster_size": at_least(0),
    "mine.margin": at_least(0),
}


def check_range(key: str, value: float) -> None:
    """Raises ConfigError naming `key` when `value` is outside `RANGES[key]`."""
    allowed = RANGES[key]
    if not allowed.admits(value):
        why = f" ({allowed.why})" if allowed.why else ""
        raise ConfigError(f"{key} must be {allowed}{why}, got {value}.")


def _check_ranges(config: Config) -> None:
    """Every float is finite (NaN passes every `<`/`>` test, so it needs its own check), and every
    key of `RANGES` is within its range."""
    values = dict(_leaves(config))
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}.")
    for key in RANGES:
        check_range(key, values[key])


def validate(config: Config) -> None:
    """Rejects invalid combinations with a message naming the keys involved."""
    _check_ranges(config)
    s, d = config.scaling, config.deepspeed
    if is_elastic(s):
        if not (1 <= s.min_workers <= s.max_workers):
            raise ConfigError(
                f"scaling.min_workers ({s.min_workers}) and scaling.max_workers ({s.max_workers}) "
                "must satisfy 1 <= min <= max."
            )
    elif s.num_workers < 1:
        raise ConfigError(f"scaling.num_workers must be >= 1, got {s.num_workers}.")
    for workers in worker_counts(s):
        chunk_size(config, workers)
    if s.worker_node_resource in ("CPU", "GPU", "memory", "object_store_memory"):
        raise ConfigError(f"scaling.worker_node_resource: {s.worker_node_resource!r} is a built-in resource; name a "
                          "custom one the worker nodes were started with (ray start --resources).")
    if d.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {d.zero_stage}.")
    check_precision(config)
    if d.zero_init:
        m = config.model
        problem = ("needs deepspeed.zero_stage=3" if d.zero_stage != 3 else
                   "loads a from_pretrained checkpoint partitioned: model.name_or_path must name one, not a tiny "
                   "in-code model or an assembled dual encoder" if not m.name_or_path or m.name_or_path.startswith("tiny-") else
                   "is for full fine-tuning: LoRA trains too little to partition (the LoRA recipes use ZeRO-1)"
                   if m.lora.enabled else
                   "cannot warm-start: model.init_from loads whole weights into each rank" if m.init_from else "")
        if problem:
            raise ConfigError(f"deepspeed.zero_init {problem}.")
    sp = config.spectral
    if sp.partition == "soft" and sp.fence != "iqr":
        raise ConfigError(
            f"spectral.partition=soft needs spectral.fence=iqr (its threshold is continuous in σ), got {sp.fence!r}."
        )
    _check_schedule(sp.alpha, "spectral.alpha")
    _check_schedule(config.loss.lambda_schedule, "loss.lambda_schedule")
    _check_schedule(config.loss.fanoise.schedule, "loss.fanoise.schedule")
    m = config.model
    if bool(m.vision_name_or_path) != bool(m.text_name_or_path):
        raise ConfigError("model.vision_name_or_path and model.text_name_or_path assemble a dual encoder together; set both.")
    if m.vision_name_or_path and (m.name_or_path or m.kind != "dual_encoder"):
        raise ConfigError(
            "model.vision_name_or_path/text_name_or_path assemble a dual encoder: set model.name_or_path='' "
            f"(it names a whole checkpoint, got {m.name_or_path!r}) and model.kind=dual_encoder (got {m.kind!r})."
        )
    if not m.vision_name_or_path and not m.name_or_path:
        raise ConfigError("model.name_or_path is empty: name a checkpoint, or set model.vision_name_or_path and text_name_or_path.")
    if m.min_pixels and m.max_pixels and m.min_pixels > m.max_pixels:
        raise ConfigError(f"model.min_pixels ({m.min_pixels}) must be <= model.max_pixels ({m.max_pixels}).")
    if m.prompt_format != "vlm2vec" and m.kind != "vlm":
        raise ConfigError(f"model.prompt_format={m.prompt_format} formats a VLM's chat turns; model.kind=dual_encoder "
                          "uses vlm2vec.")
    if (m.min_pixels or m.max_pixels) and m.kind != "vlm":
        raise ConfigError("model.min_pixels/max_pixels size a VLM's dynamic resolution; with model.kind=dual_encoder "
                          "the image processor's fixed size applies (leave them 0).")
    if m.video_frames and m.kind != "vlm":
        raise ConfigError("model.video_frames feeds video to a VLM's video path; model.kind=dual_encoder has none.")
    if config.data.source == "mmeb" and not (config.data.mmeb_train_dir or config.data.shards):
        raise ConfigError("data.source=mmeb needs data.mmeb_train_dir or data.shards.")
    losses = config.loss
    if losses.negatives_per_query and losses.name == "disncl":
        raise ConfigError("loss.name=disncl takes no explicit negatives (soft targets over paired rows); "
                          "set loss.negatives_per_query=0.")
    if config.data.batching == "teacher_cluster" and not config.data.negatives_sidecar:
        raise ConfigError("data.batching=teacher_cluster needs data.negatives_sidecar: a `sde-ray mine` output "
                          "mined with mine.cluster_size > 0 (its teacher clusters).")


def describe(instance: Any = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, documentation) for every leaf field: the reference table in the docs.

    Nested defaults come from the parent's instance, so `loss.fanoise.schedule.start` shows FANoise's
    own default rather than `ScheduleConfig`'s.
    """
    instance = Config() if instance is None else instance
    rows = []
    for f in dataclasses.fields(instance):
        dotted = f"{prefix}{f.name}"
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe(value, dotted + "."))
        else:
            rows.append((dotted, repr(value), f.metadata.get("doc", "")))
    return rows
