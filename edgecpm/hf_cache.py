"""Finding a model id (`org/name`) in the local Hugging Face cache, without the network.

The cache layout is huggingface_hub's: `<cache>/models--org--name/refs/main` names a commit and
`snapshots/<commit>/` holds the files. Fetching is opt-in (`download=True`, `edgecpm export --download`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from edgecpm.errors import EdgecpmError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps models: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def cached_snapshot(repo_id: str, cache_dir: Path | None = None) -> Path | None:
    """The snapshot `refs/main` points at, else the most recently written one; None when not cached."""
    repo_dir = (cache_dir or hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    main_ref = repo_dir / "refs" / "main"
    if main_ref.is_file():
        pinned = snapshots / main_ref.read_text(encoding="utf-8").strip()
        if pinned.is_dir():
            return pinned
    candidates = [path for path in snapshots.iterdir() if path.is_dir()] if snapshots.is_dir() else []
    return max(candidates, key=lambda path: path.stat().st_mtime) if candidates else None


def resolve_checkpoint(source: str, *, download: bool = False) -> Path:
    """A local path as is; a model id from the cache (or fetched, only when `download`)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if not REPO_ID.match(source):
        raise EdgecpmError("no such file or directory (and not a model id like org/name)", path=source)
    snapshot = _download(source) if download else cached_snapshot(source)
    if snapshot is None:
        raise EdgecpmError(f"model id not found in the local Hugging Face cache ({hub_cache_dir()}); "
                           "pass --download to fetch it", path=source)
    return _checkpoint_in_snapshot(snapshot, source)


def _checkpoint_in_snapshot(snapshot: Path, repo_id: str) -> Path:
    """An HF directory is the snapshot itself; a GGUF repository must hold exactly one .gguf file."""
    if (snapshot / "config.json").is_file():
        return snapshot
    ggufs = sorted(snapshot.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        names = ", ".join(p.name for p in ggufs[:4])
        raise EdgecpmError(f"the snapshot holds several GGUF files ({names}); pass the path of one", path=snapshot)
    raise EdgecpmError(f"the cached snapshot of {repo_id} has neither config.json nor a .gguf file", path=snapshot)


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise EdgecpmError("--download needs huggingface_hub (pip install huggingface_hub)", path=repo_id) from None
    try:
        return Path(snapshot_download(repo_id))
    except Exception as exc:  # network, auth and not-found errors all come from here
        reason = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise EdgecpmError(f"download failed ({exc.__class__.__name__}: {reason})", path=repo_id) from None
