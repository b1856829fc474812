"""Typed response bodies (they also make the OpenAPI document at /docs)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Prediction(BaseModel):
    index: int = Field(description="Class index in the model's output")
    label: str = Field(description="Class name (ImageNet-1k names for ImageNet classifiers)")
    score: float = Field(description="Softmax probability")


class Tokens(BaseModel):
    input: int = Field(description="Tokens entering the first block (prefix tokens included)")
    output: int = Field(description="Tokens left after the last block")
    per_layer: list[int] = Field(description="Tokens left after each block")


class Timing(BaseModel):
    queue: float = Field(description="Milliseconds waiting in the (model, r) queue")
    inference: float = Field(description="Milliseconds of the batch's forward pass")
    total: float = Field(description="Milliseconds from the request's arrival to the response")


class FidelityEstimate(BaseModel):
    """How closely answers at this r match answers at r=0 on the same images (docs/fidelity.md)."""

    r: int
    kind: Literal["agreement", "cosine"] = Field(
        description="agreement: top-1 agreement with r=0; cosine: cosine of the pooled embedding with r=0"
    )
    samples: int = Field(description="Images compared (0 for r=0, the reference itself)")
    mean: float
    lower: float = Field(description="One-sided 95% lower bound of the mean (Wilson for agreement)")


class ClassifyResponse(BaseModel):
    model: str
    weights: str = Field(description="Where the weights came from: 'pretrained', 'random' or a file path")
    r: int = Field(
        description="Tokens merged per block (capped per block at half the mergeable tokens); for r=auto "
        "the r the server chose for this request's batch"
    )
    merge: str = Field(description="The merge rule: 'tome' or 'mlerp'")
    r_auto: bool = Field(False, description="True when r was chosen by the server (r=auto)")
    target_ms: float | None = Field(None, description="Latency target r=auto aimed at; null for a fixed r")
    predictions: list[Prediction]
    tokens: Tokens
    batch_size: int = Field(description="Images in the batch this request was computed in")
    timing_ms: Timing
    fidelity: FidelityEstimate | None = Field(
        None,
        description="Fidelity of the r this answer was computed at (top-1 agreement); null while unmeasured",
    )
    request_id: str


class RCostInfo(BaseModel):
    r: int
    gmacs: float = Field(description="Analytical GMACs (multiply-accumulates / 1e9) per image (tome.gmacs)")
    speedup: float = Field(description="gmacs at r=0 divided by gmacs at this r")
    output_tokens: int


class MeasuredTiming(BaseModel):
    r: int
    gmacs: float | None = Field(
        description="Analytical GMACs per image at this r (as in costs), for comparison"
    )
    images_per_s: dict[int, float] = Field(
        description="Measured images/s of one batch, per batch size (warm-up, then real batches)"
    )
    dominated_at: list[int] = Field(
        description="Batch sizes at which this r is not at least 3% faster than every smaller r on this "
        "machine: r=auto never chooses it there"
    )


class AutoInfo(BaseModel):
    target_ms: float = Field(description="Latency target of r=auto requests (TOME_LATENCY_TARGET_MS)")
    max_r: int = Field(
        description="The auto ceiling: largest r r=auto chooses (TOME_AUTO_MAX_R, at most r_max)"
    )
    timings: list[MeasuredTiming] = Field(description="The measured timing table r=auto decides from")
    timings_source: Literal["measured", "state"] = Field(
        description="'measured' at this start, or 'state': loaded from TOME_STATE_DIR (re-checked in the "
        "background while idle)"
    )
    timings_by_merge: dict[str, list[MeasuredTiming]] = Field(
        description="The measured timing table of every merge rule (timings is the default rule's). r=auto "
        "requests that name no rule get the (r, rule) pair chosen from these and the fidelity: see "
        "docs/r-auto.md"
    )


class AccuracyDrop(BaseModel):
    labelled: int = Field(description="Labelled images of the profile")
    top1: float = Field(description="Top-1 accuracy at r=0 minus at r (0.012 = 1.2 points)")
    top5: float | None = None


class FidelityRow(BaseModel):
    r: int
    kind: Literal["agreement", "cosine"]
    samples: int
    mean: float | None = Field(description="null while unmeasured")
    lower: float | None = Field(description="One-sided 95% lower bound of the mean; null while unmeasured")
    top5_overlap: float | None = Field(
        None, description="agreement rows: mean share of the r=0 top-5 classes also in the top-5 at r"
    )
    accuracy_drop: AccuracyDrop | None = Field(None, description="From a labelled tome-eval profile")
    meets_floor: bool | None = Field(
        None, description="Whether r=auto may choose this r under TOME_MIN_FIDELITY; null without a floor"
    )


class MergeRuleFidelity(BaseModel):
    """The fidelity table of one merge rule."""

    sources: dict[str, int] = Field(
        description="Comparisons with r=0 per source (calibration, profile, shadow); an image at n r counts n"
    )
    max_r_at_floor: dict[str, int] | None = Field(
        description="Per kind, the largest r r=auto may choose under TOME_MIN_FIDELITY; null without a floor"
    )
    rows: list[FidelityRow]


class FidelityInfo(MergeRuleFidelity):
    """The default merge rule's table (sources, max_r_at_floor, rows), every rule's in by_merge."""

    floor: float | None = Field(description="TOME_MIN_FIDELITY, in each request's own kind; null: none")
    min_samples: int = Field(description="Samples an r needs to meet a floor (TOME_FIDELITY_MIN_SAMPLES)")
    bounds: dict[str, str] = Field(description="How each kind's lower bound is computed")
    shadow_rate: float = Field(description="TOME_SHADOW_RATE: share of r > 0 images re-run at r=0 when idle")
    by_merge: dict[str, MergeRuleFidelity] = Field(
        description="Per merge rule, its own table (the fields above are the default rule's)"
    )


class ModelInfo(BaseModel):
    name: str
    default: bool = Field(description="Used when a request names no model")
    weights: str
    device: str
    dtype: str
    dtype_reason: str = Field(description="Why this dtype: 'set explicitly', or what --dtype auto detected")
    instances: int = Field(description="Inference threads of this model, each running whole batches")
    torch_threads: int = Field(description="torch threads of each instance")
    preprocess_threads: int = Field(description="Threads decoding and preprocessing uploads (shared)")
    decode_between_batches: bool = Field(
        description="Uploads are decoded while no forward pass runs (one instance taking every core)"
    )
    r_min: int
    r_max: int = Field(description="The ceiling: largest r accepted (useful_r, or TOME_MAX_R when lower)")
    useful_r: int = Field(
        description="The model's largest useful r: the smallest r that leaves the fewest output tokens "
        "merging can leave (a larger r changes nothing)"
    )
    default_r: int | Literal["auto"]
    default_merge: str = Field(
        description="TOME_DEFAULT_MERGE: the merge rule of requests that name none, but for r=auto ones "
        "(the server chooses their rule with r)"
    )
    input_size: list[int] = Field(description="[channels, height, width] of the model input")
    patch_size: list[int]
    input_tokens: int
    depth: int
    num_classes: int = Field(description="0 for a backbone without classifier head (/classify refused)")
    notes: list[str]
    costs: list[RCostInfo] = Field(description="Analytical cost (GMACs) of every r from r_min to r_max")
    auto: AutoInfo | None = Field(None, description="r=auto: its target, auto ceiling and measured timings")
    fidelity: FidelityInfo | None = Field(
        None, description="Measured fidelity of every r against r=0, and the floor r=auto keeps"
    )


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class ErrorResponse(BaseModel):
    detail: str
    request_id: str | None = None


class Status(BaseModel):
    status: str
    detail: str | None = None


# -- /v1/embeddings -----------------------------------------------------------------------------------

Pooling = Literal["model", "cls", "mean", "patch"]


class EmbeddingsRequest(BaseModel):
    """OpenAI's and Infinity's embeddings request, for images, with ToMe's r. As multipart form fields
    too, with the images as files."""

    model_config = {"extra": "forbid"}

    input: str | list[str] = Field(
        description="Images: base64 'data:image/...;base64,' URIs, plain base64, or http(s) URLs of hosts "
        "the operator allows (TOME_EMBED_URL_HOSTS); one string or a list (at most TOME_EMBED_MAX_ITEMS)"
    )
    model: str | None = Field(None, description="A loaded model's name (default: the first one)")
    modality: Literal["image"] | None = Field(None, description="Infinity's field; only 'image' is served")
    encoding_format: Literal["float", "base64"] = Field(
        "float",
        description="'base64': little-endian float32 bytes, base64-encoded (what OpenAI's clients ask)",
    )
    dimensions: int | None = Field(None, description="Keep the first N values, then re-normalise")
    normalize: bool = Field(
        True, description="Scale each embedding (each patch's, for 'patch') to unit length"
    )
    pooling: Pooling = Field(
        "model",
        description="'model': the model's own pooling and pre-logits head; 'cls': the class token; 'mean': "
        "the mean over patches; 'patch': one embedding per input patch, [H/p * W/p, D]",
    )
    r: int | str | None = Field(None, description="Tokens merged per block, or 'auto' (the default)")
    target_ms: float | None = Field(None, description="r=auto only: latency target in ms")
    max_r: int | None = Field(None, description="r=auto only: the largest r this request accepts")
    merge: str | None = Field(None, description="'tome' or 'mlerp' (default TOME_DEFAULT_MERGE)")
    min_fidelity: float | None = Field(
        None, description="r=auto only: the lowest cosine with r=0 (lower bound) this request accepts"
    )
    on_error: Literal["fail", "skip"] = Field(
        "fail",
        description="'fail': a bad image makes the request a 4xx naming its index; 'skip': the answer holds "
        "the good images and an 'errors' list (a 4xx only when every image failed)",
    )
    user: str | None = Field(None, description="Accepted for OpenAI compatibility; not used")


class EmbeddingTokens(BaseModel):
    input: int = Field(description="Tokens entering the first block")
    output: int = Field(description="Tokens left after the last block")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int = Field(description="Position of the image in the request's input")
    embedding: list[float] | list[list[float]] | str = Field(
        description="The vector (floats or base64); for 'patch' pooling one row per patch (base64: rows "
        "concatenated, see shape)"
    )
    shape: list[int] = Field(description="[D], or [patches, D] for 'patch' pooling")
    r: int = Field(description="r this image was computed at")
    merge: str = Field(description="The merge rule it was computed with")
    r_auto: bool = Field(description="True when the server chose r (r=auto)")
    tokens: EmbeddingTokens
    fidelity: FidelityEstimate | None = Field(
        None,
        description="Fidelity of the r this image was computed at (cosine of the model's pooled embedding "
        "with r=0); null while unmeasured",
    )


class EmbeddingUsage(BaseModel):
    prompt_tokens: int = Field(description="Input tokens of every embedded image")
    total_tokens: int


class ItemError(BaseModel):
    index: int
    status: int
    message: str


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    weights: str
    pooling: Pooling
    normalize: bool
    usage: EmbeddingUsage
    errors: list[ItemError] = Field(
        default_factory=list, description="with on_error 'skip': images that failed"
    )
    request_id: str
