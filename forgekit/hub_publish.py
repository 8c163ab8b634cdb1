"""`forgekit publish DIR --repo ORG/NAME`: upload a verified build to the Hugging Face Hub.

Only the files the build's manifest lists are uploaded (never `.forgekit/` or anything else that
happens to sit in the directory), and only while each still has its recorded digest and the build's
verification passed; `--force` uploads anyway, with a card that says so. The uploaded README.md is
the build's card with its usage block naming the repo. The token comes from where huggingface_hub
looks (HF_TOKEN, `hf auth login`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .build import card
from .build.outputs import verification_status
from .build.published_dir import changed_files, manifest_of
from .errors import ForgeError

VERIFIED = "cpu_verified_by_forgekit"


@dataclass(frozen=True)
class Upload:
    """What a publish would send: the files, the card text, the commit message, and why it is refused."""

    directory: Path
    files: tuple[str, ...]
    card: str
    message: str
    description: str
    problems: tuple[str, ...]


def _status(directory: Path) -> str:
    try:
        return verification_status(json.loads((directory / "forgekit-report.json").read_text()))
    except (OSError, ValueError):
        return "unverified_no_forgekit_report"


def prepare(directory: Path, repo: str) -> Upload:
    """Read the build in `directory` and decide what publishing it to `repo` means."""
    directory = Path(directory)
    manifest = manifest_of(directory)
    changed = changed_files(directory, manifest)
    problems = []
    if changed:
        problems.append(f"{len(changed)} file(s) no longer match the build's manifest ({', '.join(changed[:3])}"
                        f"{', ...' if len(changed) > 3 else ''})")
    status = _status(directory) if "forgekit-report.json" not in changed else "unverified_report_changed"
    if status != VERIFIED:
        problems.append(f"its verification did not pass (status {status})")
    files = tuple(n for n in sorted(manifest.get("files", {})) if (directory / n).is_file())
    text = card.with_repo((directory / "README.md").read_text(errors="replace"), repo) \
        if (directory / "README.md").is_file() else ""
    build_key = manifest.get("build_key", "?")
    return Upload(directory, files, text, f"Upload {manifest.get('recipe', '?')} (forgekit build {build_key[:16]})",
                  f"forgekit build key {build_key}, recipe {manifest.get('recipe', '?')}", tuple(problems))


def refusal(upload: Upload, directory: Path) -> str:
    return f"{directory}: not published: {'; '.join(upload.problems)} (rebuild it, or pass --force)"


def publish(upload: Upload, repo: str, private: bool = False, revision: str | None = None, force: bool = False):
    """Create the repo (if needed) and commit the files in one commit; returns huggingface_hub's CommitInfo."""
    if upload.problems and not force:
        raise ForgeError(refusal(upload, upload.directory))
    text = card.marked_unverified(upload.card, "; ".join(upload.problems)) if upload.problems else upload.card
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo, branch=revision, exist_ok=True)
        with _upload_view(upload, text) as folder:
            return api.upload_folder(repo_id=repo, folder_path=folder, revision=revision,
                                     commit_message=upload.message, commit_description=upload.description)
    except Exception as exc:  # huggingface_hub raises many types; each means "the Hub said no"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ForgeError(f"publishing {upload.directory} to {repo} failed: {type(exc).__name__}: {first}") from None


class _upload_view:
    """A temporary folder holding links to exactly the files to upload, and the card to publish
    (outside the build's directory, so nothing is ever left inside it)."""

    def __init__(self, upload: Upload, card_text: str):
        self.upload, self.card_text = upload, card_text

    def __enter__(self) -> Path:
        self.tmp = Path(tempfile.mkdtemp(prefix="forgekit-publish-"))
        for name in self.upload.files:
            if name == "README.md":
                (self.tmp / name).write_text(self.card_text)
            else:
                os.symlink((self.upload.directory / name).resolve(), self.tmp / name)
        return self.tmp

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
