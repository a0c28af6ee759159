"""`xpack check`: every file of an artifact against the sha256 its manifest.json holds (runtimes/integrity.py)."""

from __future__ import annotations

from pathlib import Path

import click

from xpack.cli.params import emit
from xpack.errors import XpackError
from xpack.runtimes.artifacts import MANIFEST_FILE
from xpack.runtimes.integrity import artifact_folder, check_files, manifest_files


@click.command()
@click.argument("artifact", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def check(ctx, artifact, as_json):
    """Check an artifact's files against the sha256 values in its manifest.json.

    Every file is read and hashed (streaming, in parallel, with progress on stderr), like
    `hf cache verify` or llama-gguf-hash; exit 1 names the first file that is missing, has another
    size or another hash. ARTIFACT is a folder written by `xpack merge` or `xpack export`, or one
    file of it. A file that passes gets a stamp in xpack's cache, so `xpack run` and `xpack verify`,
    which check at load, do not read it again until it changes.

    \b
    Example:
      xpack check ./gemma3-xray-gguf
      xpack check ./merged --json
    """
    folder = artifact_folder(artifact)
    if folder is None:
        where = artifact if artifact.is_dir() else artifact.parent
        listed = "does not list " + artifact.name if artifact.is_file() and (where / MANIFEST_FILE).is_file() else f"has no {MANIFEST_FILE}"
        raise XpackError(f"{where} {listed}; xpack check needs a folder written by `xpack merge` or `xpack export`")
    if not manifest_files(folder):
        raise XpackError(f"{folder / MANIFEST_FILE} lists no files with sha256 values; re-export the artifact")
    report = check_files(folder, [artifact.name] if artifact.is_file() else None)
    lines = [f"{folder}: {report.files} files, {report.bytes / 1e6:.1f} MB, "
             + (f"every sha256 matches {MANIFEST_FILE} ({report.mb_per_s:.0f} MB/s)" if report.ok else f"{len(report.bad)} bad")]
    lines += [f"BAD {line}" for line in report.bad]
    emit(report.as_dict(), as_json, lines)
    if not report.ok:
        if not as_json:
            click.echo(f"Error: {folder}/{report.bad[0]}; re-export or re-copy the artifact", err=True)
        ctx.exit(1)
