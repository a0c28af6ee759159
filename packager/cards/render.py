"""Model cards (a Jinja template + data) and manifests (hashes, settings, figures) of xpack artifacts."""

from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path

from xpack import __version__
from xpack.packager.io.sources import HUB_ID
from xpack.packager.io.tensors import sha256_file
from xpack.runtimes.artifacts import CARD_FILE, MANIFEST_FILE
from xpack.runtimes.integrity import write_stamp

DEFAULT_INTENDED_USE = (
    "The intended use is that of the adapter merged here; its own documentation did not state one. "
    "Use it for research and evaluation of the fine-tuned behaviour on the target machine."
)
DEFAULT_LIMITATIONS = (
    "- The merged model inherits the limitations and biases of the base model and of the adapter's training data.\n"
    "- It has not been evaluated beyond the adapter's own training; check its outputs with `xpack verify` "
    "and with domain experts before relying on them.\n"
    "- In a medical setting it is not a medical device: every output must be reviewed by a qualified professional."
)
_SECTION_HINTS = {
    "intended_use": re.compile(r"intended use|uses|use cases", re.I),
    "limitations": re.compile(r"limitation|bias|out of scope|risks", re.I),
}


def front_matter(text: str) -> dict:
    """The YAML front matter of a model card (empty when there is none or it does not parse)."""
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return {}
    import yaml

    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def card_sections(text: str) -> dict[str, str]:
    """Markdown sections of a card whose headings say intended use / limitations (merged per kind)."""
    found: dict[str, list[str]] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(#{1,6})\s+(.*)$", lines[i])
        kind = next((k for k, rx in _SECTION_HINTS.items() if m and rx.search(m.group(2))), None)
        if not kind:
            i += 1
            continue
        level = len(m.group(1))
        body = []
        i += 1
        while i < len(lines):
            n = re.match(r"^(#{1,6})\s", lines[i])
            if n and len(n.group(1)) <= level:
                break
            body.append(lines[i])
            i += 1
        chunk = "\n".join(body).strip()
        if chunk:
            found.setdefault(kind, []).append(chunk)
    return {k: "\n\n".join(v) for k, v in found.items()}


def render(template: str, **data) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("xpack.packager.cards", "templates"),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    return env.get_template(template).render(**data)


def hub_id(*candidates) -> str | None:
    """The first candidate that is a Hugging Face model id (owner/name[@revision]) and not a path on this machine: what
    a card's ``base_model`` may say, since the Hub reads it as a model id (issue #14: the demo's card named a cache
    folder). None when there is none: the key is then left out."""
    for c in candidates:
        if not isinstance(c, str) or c.startswith((".", "/", "~")) or Path(c).expanduser().exists():
            continue
        ref = c.partition("@")[0]
        if HUB_ID.match(ref):
            return ref
    return None


def yaml_block(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000).strip()


def file_table(folder: Path, hashes: dict[str, str] | None = None, skip=(CARD_FILE, MANIFEST_FILE)) -> list[dict]:
    """Every file of an artifact folder with its size and sha256 (reusing hashes already computed)."""
    hashes = hashes or {}
    rows = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in skip:
            rows.append({"name": rel, "bytes": p.stat().st_size, "sha256": hashes.get(rel) or sha256_file(p)})
    return rows


def write_manifest(folder: Path, data: dict, hashes: dict[str, str] | None = None) -> dict:
    """Write manifest.json: ``data`` plus the xpack version, the date and every file's hash (the card included)."""
    manifest = {
        "xpack_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **data,
        "files": {r["name"]: {"bytes": r["bytes"], "sha256": r["sha256"]} for r in file_table(folder, hashes, skip=(MANIFEST_FILE,))},
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    for name, entry in manifest["files"].items():  # just hashed: the first load need not read them again
        write_stamp(folder / name, entry["sha256"])
    return manifest
