"""The one place that chooses who runs a bundle: TensorRT, edgecpm's native kernels or onnxruntime.

`kernels` (the `--kernels` option, $EDGECPM_KERNELS, `edgecpm.load(kernels=...)`):
- "auto" (default): the bundle's TensorRT engine where it holds one pinned to this GPU; else the native
  kernels where they implement the bundle on this CPU's vectorised path (docs/BENCHMARKS.md); else
  onnxruntime. Where the kernels decode but do not prefill (fp32 bundles), onnxruntime prefills the same
  KV state over the same memory-mapped weights.
- "tensorrt", "native", "onnxruntime": that one, or an error saying why it cannot.
- "native-exact": the native kernels with exact (float) activations in every quantized linear instead of int8 ones:
  accuracy level 0's arithmetic, slower (docs/QUANTIZATION.md, "Activation precision").

`kv_cache` ("float32" default, "float16"; `--kv-cache`): what the KV cache stores. Half floats halve its memory (the
planner's largest context doubles) and are the native kernels' alone: they then run the whole bundle, prompts too.

Every backend reports who ran prefill and decode (`backend.kernels`), and why not native where it is not.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from edgecpm.backend import Backend
from edgecpm.bundle import Manifest, read_manifest
from edgecpm.errors import BundleError, GenerationError
from edgecpm.runtimes.kv import KV_CACHES, HostKV
from edgecpm.sparse.choice import AttentionChoice, reaches_sparse

if TYPE_CHECKING:
    from edgecpm.arch.base import SparseAttentionConfig

KERNELS = ("auto", "tensorrt", "native", "native-exact", "onnxruntime")
NATIVE_KERNELS = ("auto", "native", "native-exact")


class PromptDecodeSplit:
    """Prompts on one backend, decode steps on another, both computing on one KV state (neither hosts the other)."""

    def __init__(self, prompts: Backend, steps: Backend, kv: HostKV):
        self.prompts, self.steps, self.kv = prompts, steps, kv
        self.max_context, self.vocab_size = steps.max_context, steps.vocab_size
        self.kernels = {"prefill": prompts.kernels["prefill"], "decode": steps.kernels["decode"], "native_unavailable": None,
                        "attention": "dense", "kv_cache": kv.dtype.name}

    @property
    def position(self) -> int:
        return self.kv.position

    def prefill(self, token_ids):
        return self.prompts.prefill(token_ids)

    def decode(self, token_id: int):
        return self.steps.decode(token_id)

    def reset(self) -> None:
        self.kv.position = 0

    def truncate(self, position: int) -> None:
        self.kv.truncate(position)


def _onnxruntime(bundle: Path, manifest: Manifest, threads, prepack, spin, **shared) -> Backend:
    from edgecpm.runtimes.onnxruntime.backend import OnnxRuntimeBackend

    if prepack is None:
        # MatMulNBits needs prepacked weights for its int8-activation kernels (SmolLM2 int8 without: 1.4 vs 57 tok/s);
        # the standard flavour, run as an exact reference of the TensorRT input, is not rewritten into them.
        prepack = manifest.flavour == "ort"
    return OnnxRuntimeBackend(bundle / manifest.model_file, manifest, threads=threads, prepack=prepack, spin=spin, **shared)


def _native(bundle: Path, manifest: Manifest, threads, prepack, spin, *, required: bool,
            sparse: SparseAttentionConfig | None = None, graph_differs: bool = False,
            exact: bool = False, kv_cache: str = "float32") -> tuple[Backend | None, str | None]:
    """The native kernels (None and why not, unless `required`). `graph_differs`: the graph attends otherwise than
    asked (a sparse graph, dense or other sparse fields asked), so onnxruntime may not prefill for the kernels.
    `exact`: float activations in every quantized linear (`--kernels native-exact`). A half `kv_cache` is the
    kernels' alone: required, and no onnxruntime graph prefills into it."""
    required = required or kv_cache != "float32"
    from edgecpm.runtimes.native import KernelsUnavailable
    from edgecpm.runtimes.native.backend import NativeBackend
    from edgecpm.runtimes.native.decoder import EXACT_ALL, EXACT_DEFAULT

    try:
        # sparse attention (or attention the graph does not compute) runs on the kernels alone, even where onnxruntime
        # would decode faster
        native = NativeBackend(bundle, manifest, threads=threads, sparse=sparse, exact=EXACT_ALL if exact else EXACT_DEFAULT,
                               only_if_faster=not required and sparse is None and not graph_differs, kv_cache=kv_cache)
    except KernelsUnavailable as error:
        if required:
            what = "InfLLM v2 sparse attention runs on the native kernels, which are" if sparse else "native kernels"
            raise BundleError(f"{what} unavailable: {error}", path=bundle) from None
        return None, str(error)
    if native.prefills or sparse is not None or graph_differs or kv_cache != "float32":  # prompts as decode steps
        return native, None
    prompts = _onnxruntime(bundle, manifest, threads, prepack, spin, kv=native.kv,
                           shared_initializers=native.in_place_tensors())
    return PromptDecodeSplit(prompts, native, native.kv), None


def _tensorrt(bundle: Path, manifest: Manifest, *, required: bool) -> tuple[Backend | None, str]:
    from edgecpm.runtimes.tensorrt import engine_for_this_device

    record, reason = engine_for_this_device(bundle, manifest)
    if record is None:
        if required:
            raise BundleError(f"no TensorRT engine can run here: {reason}", path=bundle)
        return None, reason
    from edgecpm.runtimes.tensorrt.backend import TensorRTBackend

    return TensorRTBackend(bundle, manifest, record), ""


def _sparse_needed(manifest: Manifest, attention: AttentionChoice | None) -> SparseAttentionConfig | None:
    """The sparse config to run, or None where attention is dense: by choice, or because the bundle's context never
    reaches the config's dense_len (below which sparse attention is dense attention, spec §6.2)."""
    sparse = (attention or AttentionChoice()).for_bundle(manifest)
    return sparse if reaches_sparse(sparse, manifest.max_context) else None


def _graph_sparse(manifest: Manifest) -> SparseAttentionConfig | None:
    """The sparse config the bundle's graph itself attends with (None: its graph attends densely)."""
    return manifest.sparse_attention if manifest.graph_attention == "sparse" else None


def load_backend(bundle_dir: str | Path, manifest: Manifest | None = None, *, threads: int | None = None,
                 prepack: bool | None = None, spin: bool = True, kernels: str | None = None,
                 attention: AttentionChoice | None = None, kv_cache: str | None = None) -> Backend:
    """The bundle's backend, chosen by `kernels` (default: $EDGECPM_KERNELS, else "auto"; see the module doc).

    `threads`: CPU threads (default: physical cores). `prepack` (onnxruntime) repacks weights into MLAS's layouts
    (default: on for the `ort` flavour, off for `standard`). `spin` (onnxruntime's default, and what its peers run
    with) keeps idle intra-op threads spinning between the many small decode ops; pass False where other busy
    processes share the cores. `attention` (edgecpm.sparse.choice): dense or InfLLM v2 sparse, by default the bundle's
    recorded choice. The native kernels run any choice; a graph exported sparse (manifest.graph_attention) runs its
    own sparse_config on onnxruntime and TensorRT, and only that; a dense graph runs dense attention. What the chosen
    backend cannot run is an error when asked for explicitly; a sparse choice taken from a bundle with a dense graph
    runs densely and says so in `backend.kernels["attention"]` (see `_sparse`). `kv_cache`: see the module doc.
    """
    bundle = Path(bundle_dir)
    manifest = manifest or read_manifest(bundle)
    kernels = kernels or os.environ.get("EDGECPM_KERNELS") or "auto"
    if kernels not in KERNELS:
        raise GenerationError(f"unknown kernels {kernels!r} (choose from {', '.join(KERNELS)})")
    kv_cache = kv_cache or "float32"
    if kv_cache not in KV_CACHES:
        raise GenerationError(f"unknown KV cache {kv_cache!r} (choose from {', '.join(KV_CACHES)})")
    if kv_cache != "float32" and kernels not in NATIVE_KERNELS:
        raise GenerationError(f"a {kv_cache} KV cache is the native kernels' (--kernels native), not {kernels}'s")
    sparse, graph = _sparse_needed(manifest, attention), _graph_sparse(manifest)
    if sparse is not None or graph is not None:
        return _sparse(bundle, manifest, threads, prepack, spin, kernels, sparse, graph,
                       explicit=bool(attention and attention.explicit), kv_cache=kv_cache)
    if kernels in ("auto", "tensorrt") and (manifest.engines or kernels == "tensorrt") and kv_cache == "float32":
        backend, _ = _tensorrt(bundle, manifest, required=kernels == "tensorrt")
        if backend is not None:
            return backend
    native_unavailable = "not requested"
    if kernels in NATIVE_KERNELS:
        backend, native_unavailable = _native(bundle, manifest, threads, prepack, spin, required=kernels != "auto",
                                              exact=kernels == "native-exact", kv_cache=kv_cache)
        if backend is not None:
            return backend
    backend = _onnxruntime(bundle, manifest, threads, prepack, spin)
    backend.kernels["native_unavailable"] = native_unavailable
    return backend


def _sparse(bundle: Path, manifest: Manifest, threads, prepack, spin, kernels: str, sparse: SparseAttentionConfig | None,
            graph: SparseAttentionConfig | None, *, explicit: bool, kv_cache: str) -> Backend:
    """Who runs `sparse` (None: dense) on a bundle whose graph attends with `graph` (None: densely), one of them set.

    The native kernels run any choice; the graph (onnxruntime, or a TensorRT engine built from it) only its own. A
    dense graph asked for sparse attention explicitly is an error elsewhere, and taken from the bundle runs densely;
    a sparse graph asked for anything else is an error elsewhere (its sparse_config is baked into the graph).
    """
    graph_runs_it = sparse == graph
    why_not = f"--kernels {kernels}"
    if graph_runs_it and kernels in ("auto", "tensorrt") and (manifest.engines or kernels == "tensorrt") and kv_cache == "float32":
        backend, why_not = _tensorrt(bundle, manifest, required=kernels == "tensorrt")
        if backend is not None:  # its kernels["attention"] is the graph's: sparse
            return backend
    if kernels in NATIVE_KERNELS:
        required = kernels != "auto" or (explicit and graph is None)
        backend, why_not = _native(bundle, manifest, threads, prepack, spin, required=required, sparse=sparse,
                                   graph_differs=not graph_runs_it, exact=kernels == "native-exact", kv_cache=kv_cache)
        if backend is not None:
            return backend
    if graph_runs_it and kernels != "tensorrt":
        backend = _onnxruntime(bundle, manifest, threads, prepack, spin)
        backend.kernels["attention"] = "sparse"
        backend.kernels["native_unavailable"] = why_not
        return backend
    if graph is not None:
        asked = "dense attention" if sparse is None else "other sparse_config fields"
        raise BundleError(f"this bundle's graph attends sparsely with the sparse_config it was exported with; {asked} "
                          f"need --kernels native (not {kernels}), or a re-export with that --attention/--sparse-config",
                          path=bundle)
    if kernels in ("tensorrt", "onnxruntime") and explicit:
        raise BundleError(f"InfLLM v2 sparse attention runs on the native kernels, not {kernels}, with this bundle's dense "
                          "graph: use --kernels native, re-export with --attention sparse, or --attention dense", path=bundle)
    dense = load_backend(bundle, manifest, threads=threads, prepack=prepack, spin=spin, kernels=kernels,
                         attention=AttentionChoice("dense"), kv_cache=kv_cache)
    dense.kernels["attention"] = f"dense (sparse attention needs the native kernels or a sparse graph: {why_not})"
    return dense
