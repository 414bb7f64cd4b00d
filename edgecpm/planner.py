"""The memory and context planner: what an export of a model will hold in memory on a device, and the longest
context that fits the device's budget.

Everything is arithmetic on the architecture's config and the storage the export will use (precision, the
QuantSpec), so a plan exists before a single tensor is read and an export that cannot fit is refused before
anything is written. Weight bytes follow the exporter's storage rules (exporters/onnx, edgecpm/quant):

- a quantized weight: its codes (int6 values sit in 8-bit codes, ternary in 2 bits), one scale per block (per
  output channel where the spec's layout says so: 8-bit codes for TensorRT) at the export precision, and for
  asymmetric blocks one packed zero point per block;
- a float weight: its elements at the export precision; norms and biases always so;
- a tied embedding table read by the head: once when quantized (one shared initializer) or under
  `tied_head="shared"`, twice under `"duplicate"` (a transposed float copy for the head's MatMul);
- the rotary cos/sin tables, baked at the export precision for `max_context` positions.

KV bytes per token are what the exported graph caches (MLA: the latent and the shared roped key). Under InfLLM v2
sparse attention the native kernels also hold, allocated at max context in fp32, each layer's compressed keys (Kc1, Kc2:
one row per kernel) and under use_nope the keys before RoPE (`sparse_state_bytes`).
Runtime allowances (the runtime's own code and arenas, a prefill pass's activations) are planning estimates,
named as such; they are not measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edgecpm.errors import UnsupportedError
from edgecpm.quant.spec import QuantSpec

if TYPE_CHECKING:
    from edgecpm.arch.base import DecoderConfig, SparseAttentionConfig
    from edgecpm.devices.profile import DeviceProfile

DTYPE_BYTES = {"fp32": 4, "fp16": 2}
STORED_BITS = {"int8": 8, "int6": 8, "int4": 4, "ternary": 2}  # int6 values are stored in 8-bit codes
# Planning allowances (estimates, not measurements): the runtime's own resident memory beyond weights and KV
# (Python, tokenizers, onnxruntime or the CUDA context and TensorRT's libraries), and the prompt tokens one
# prefill pass computes at once (the native kernels run passes of 16; graph runtimes take longer prompts whole).
RUNTIME_BYTES = {"cpu": 300_000_000, "gpu": 600_000_000}
PREFILL_PASS = {"native": 16, "onnxruntime": 512, "tensorrt": 512}
FALLBACK_SCHEMES = ("int8", "int4")  # what a refusal suggests, most precise first
MIN_CONTEXT = 512  # the shortest context worth planning for (or the model's own maximum, if shorter)


@dataclass(frozen=True)
class Storage:
    """How an export stores the model: activation/float precision, quantization and the tied-head layout."""

    precision: str = "fp32"
    quant: QuantSpec | None = None
    tied_head: str = "duplicate"

    @property
    def label(self) -> str:
        return self.precision if self.quant is None or not self.quant.enabled else f"{self.quant.scheme} weights, {self.precision}"


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes an export holds at run time and the largest context that fits the budget (None without a device)."""

    storage: Storage
    weight_bytes: int
    weight_bytes_by_role: dict[str, int]
    kv_bytes_per_token: int
    kv_dtype: str
    runtime_bytes: int          # estimate: the runtime itself (on GPUs the CUDA context and TensorRT's libraries)
    prefill_pass_tokens: int
    activation_bytes_per_context_token: int  # estimate: a prefill pass's attention scores per cached position
    model_max_context: int
    sparse: SparseAttentionConfig | None = None  # InfLLM v2 sparse attention the export runs (its state is counted)
    sparse_row_bytes: int = 0  # bytes of one row of that state over every layer and KV head (sparse_rows counts them)
    device: str | None = None
    budget_bytes: int | None = None
    max_context: int | None = None  # the largest context that fits (capped by the model's and the profile's)
    notes: tuple[str, ...] = field(default_factory=tuple)

    def total_bytes(self, context: int) -> int:
        """Resident bytes with `context` positions allocated."""
        return (self.weight_bytes + self.runtime_bytes + self.rope_bytes(context) + self.sparse_bytes(context)
                + context * (self.kv_bytes_per_token + self.activation_bytes_per_context_token))

    def sparse_bytes(self, context: int) -> int:
        return 0 if self.sparse is None else self.sparse_row_bytes * sparse_rows(self.sparse, context)

    def rope_bytes(self, context: int) -> int:
        return self.weight_bytes_by_role.get("rope_bytes_per_position", 0) * context

    @property
    def fits(self) -> bool:
        return self.max_context is not None and self.max_context >= min(MIN_CONTEXT, self.model_max_context)

    def to_dict(self, context: int | None = None) -> dict[str, Any]:
        """`context`: the positions an export allocates (default: the largest that fits)."""
        context = context or self.max_context
        roles = {k: v for k, v in self.weight_bytes_by_role.items() if k != "rope_bytes_per_position"}
        return {
            "storage": self.storage.label, "device": self.device, "weight_bytes": self.weight_bytes,
            "weight_bytes_by_role": roles, "kv_bytes_per_token": self.kv_bytes_per_token, "kv_dtype": self.kv_dtype,
            "runtime_bytes_estimate": self.runtime_bytes, "prefill_pass_tokens": self.prefill_pass_tokens,
            "budget_bytes": self.budget_bytes, "max_context": self.max_context, "model_max_context": self.model_max_context,
            "context": context, "total_bytes": None if context is None else self.total_bytes(context),
            "fits": self.fits if self.device else None, "notes": list(self.notes),
            "sparse_state_bytes": None if self.sparse is None or context is None else self.sparse_bytes(context),
        }


def _quantized_bytes(numel: int, k: int, bits: int, block: int, symmetric: bool, scale_bytes: int) -> int:
    blocks = (numel // k) * -(-k // block)
    zero_points = 0 if symmetric else -(-blocks * bits // 8)
    return -(-numel * bits // 8) + blocks * scale_bytes + zero_points


def weight_bytes(config: DecoderConfig, storage: Storage) -> dict[str, int]:
    """Bytes per role ("layers", "embeddings", "lm_head", "norms") as the export stores them, plus
    "rope_bytes_per_position" (the baked cos/sin tables grow with max_context)."""
    from edgecpm.arch import get_architecture

    float_bytes = DTYPE_BYTES[storage.precision]
    quant = storage.quant if storage.quant is not None and storage.quant.enabled else None
    roles = {"layers": 0, "embeddings": 0, "lm_head": 0, "norms": 0}
    architecture = get_architecture(config.architecture)
    shapes = architecture.tensor_shapes(config)
    for name, shape in shapes.items():
        numel = int(np.prod(shape))
        role = ("embeddings" if name == "model.embed_tokens.weight" else "lm_head" if name == "lm_head.weight"
                else "layers" if len(shape) >= 2 else "norms")
        stays_float = quant is None or len(shape) < 2 or name.endswith(architecture.float_weights or ("\0",))
        tq = None if stays_float else quant.for_tensor(name)
        block = shape[-1] if tq is not None and tq.per_channel else tq.block_size if tq is not None else 0
        roles[role] += numel * float_bytes if tq is None else _quantized_bytes(
            numel, shape[-1], STORED_BITS[tq.scheme], block, tq.symmetric, float_bytes)
    if config.tie_word_embeddings:
        table = "model.embed_tokens.weight"
        table_quantized = quant is not None and quant.for_tensor(table) is not None
        if not table_quantized and storage.tied_head == "duplicate":
            roles["lm_head"] += int(np.prod(shapes[table])) * float_bytes
    roles["rope_bytes_per_position"] = 2 * (config.rope.rotary_dim // 2) * float_bytes  # cos and sin, [positions, rotary_dim / 2]
    return roles


def kv_bytes_per_token(config: DecoderConfig, kv_dtype: str) -> int:
    return config.kv_values_per_token() * DTYPE_BYTES[kv_dtype]


def sparse_rows(sparse: SparseAttentionConfig, context: int) -> int:
    """Rows of head_dim values per KV head and layer that InfLLM v2's state holds at `context` positions."""
    from edgecpm.sparse.infllmv2 import SparseGeometry, kernel_count

    g = SparseGeometry.of(sparse)
    return (kernel_count(context, g.kernel_size, g.kernel_stride) + kernel_count(context, g.kernel_size2, g.kernel_stride2)
            + (context if g.use_nope else 0))


def sparse_state_bytes(config: DecoderConfig, sparse: SparseAttentionConfig, context: int) -> int:
    """Bytes of the native kernels' InfLLM v2 state at `context` positions (fp32, every layer)."""
    return _sparse_row_bytes(config) * sparse_rows(sparse, context)


def _sparse_row_bytes(config: DecoderConfig) -> int:
    return config.num_hidden_layers * config.num_key_value_heads * config.head_dim * DTYPE_BYTES["fp32"]


def _runtime(profile: DeviceProfile | None) -> tuple[int, str]:
    """Runtime allowance and the backend whose prefill pass is planned for (the profile's first). TensorRT's
    workspace limit bounds the builder's tactic scratch, not what the engine holds at run time: an engine's own
    activation memory is the prefill pass's allowance."""
    backend = "onnxruntime" if profile is None else profile.backends[0]
    return RUNTIME_BYTES["gpu" if backend == "tensorrt" else "cpu"], backend


def plan_memory(config: DecoderConfig, storage: Storage, profile: DeviceProfile | None = None,
                sparse: SparseAttentionConfig | None = None) -> MemoryPlan:
    roles = weight_bytes(config, storage)
    total_weights = sum(v for k, v in roles.items() if k != "rope_bytes_per_position")
    runtime, backend = _runtime(profile)
    prefill = PREFILL_PASS[backend]
    kv_dtype = storage.precision  # exported graphs cache keys and values at the activation precision
    per_token = kv_bytes_per_token(config, kv_dtype)
    scores = config.num_attention_heads * prefill * 4  # fp32 softmax rows of one prefill pass, per cached position
    plan = MemoryPlan(storage=storage, weight_bytes=total_weights, weight_bytes_by_role=roles, kv_bytes_per_token=per_token,
                      kv_dtype=kv_dtype, runtime_bytes=runtime, prefill_pass_tokens=prefill,
                      activation_bytes_per_context_token=scores, model_max_context=config.max_position_embeddings,
                      sparse=sparse, sparse_row_bytes=_sparse_row_bytes(config) if sparse is not None else 0)
    if profile is None:
        return plan
    budget = profile.budget_bytes
    room = budget - total_weights - runtime
    per_position = per_token + scores + roles["rope_bytes_per_position"]
    fit = max(0, room // per_position) if room > 0 else 0
    while fit > 0 and plan.total_bytes(fit) > budget:  # the sparse state's rows come per kernel, not per position
        fit -= max(1, (plan.total_bytes(fit) - budget) // per_position)
    caps = [config.max_position_embeddings] + ([profile.export.max_context] if profile.export.max_context else [])
    notes = []
    if profile.export.max_context and profile.export.max_context < config.max_position_embeddings:
        notes.append(f"{profile.name} caps the context at {profile.export.max_context}")
    return MemoryPlan(**{**plan.__dict__, "device": profile.name, "budget_bytes": budget,
                         "max_context": int(min([fit, *caps])), "notes": tuple(notes)})


def _gb(count: int) -> str:
    return f"{count / 2**30:.2f} GiB"  # as device profiles and `inspect` state sizes


def check_fits(config: DecoderConfig, plan: MemoryPlan, *, requested_context: int | None = None,
               profile: DeviceProfile | None = None, model_name: str = "the model") -> None:
    """Refuses (before anything is written) a plan that does not fit, naming a quantization that would."""
    if plan.device is None:
        return
    needed = requested_context or min(MIN_CONTEXT, plan.model_max_context)
    if plan.max_context is not None and plan.max_context >= needed:
        return
    what = f"{model_name} at {plan.storage.label}"
    if plan.weight_bytes + plan.runtime_bytes >= (plan.budget_bytes or 0):
        problem = f"needs {_gb(plan.weight_bytes)} of weights but {plan.device} leaves {_gb(plan.budget_bytes)} for the model"
    else:
        problem = (f"fits only {plan.max_context} positions in {plan.device}'s {_gb(plan.budget_bytes)} budget "
                   f"({needed} asked)")
    hint = _fallback_hint(config, plan, needed, profile)
    raise UnsupportedError(f"{what} {problem}; {hint}", field="--device")


def _fallback_hint(config: DecoderConfig, plan: MemoryPlan, needed: int, profile: DeviceProfile | None) -> str:
    if profile is None:
        return "choose a smaller quantization"
    current = plan.storage.quant.scheme if plan.storage.quant is not None and plan.storage.quant.enabled else "none"
    ladder = ("none", *FALLBACK_SCHEMES)
    for scheme in ladder[ladder.index(current) + 1 if current in ladder else len(ladder):]:
        quant = QuantSpec(scheme=scheme, block_size=32).for_flavour(profile.export.flavour)
        storage = Storage(plan.storage.precision, quant, plan.storage.tied_head)
        candidate = plan_memory(config, storage, profile)
        if candidate.max_context is not None and candidate.max_context >= needed:
            return (f"--quant {scheme} would fit ({_gb(candidate.weight_bytes)} of weights, context up to "
                    f"{candidate.max_context})")
    return "it does not fit even at int4; choose a larger device or a smaller model"
