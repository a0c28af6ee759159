"""Artifacts are what was written (issue #14 row 3): `xpack check`, the check at load and before export, its stamp."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from xpack.cli import cli
from xpack.errors import XpackError
from xpack.profiles.profile import load_profile
from xpack.runtimes import integrity
from xpack.runtimes.registry import load


def _overwrite(path, offset: int, n: int) -> None:
    """Overwrite ``n`` bytes in place (same size): what a bad disk, a bad copy or a stray `dd` does. XOR 1 keeps
    16-bit weights finite (it never reaches an exponent bit), so a run with --no-check still runs."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 1 for b in old))


@pytest.fixture(scope="module")
def gguf_artifact(twin_factory, tmp_path_factory):
    twin = twin_factory.get("llama")
    out = tmp_path_factory.mktemp("integrity") / "gguf"
    r = CliRunner().invoke(cli, ["export", "--model", str(twin.model_dir), "--format", "gguf", "--quant", "F16", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def artifact(gguf_artifact, tmp_path):
    """A fresh copy per test (a copy has new inodes: no stamp applies to it)."""
    dst = tmp_path / "art"
    shutil.copytree(gguf_artifact, dst)
    return dst


def _gguf(folder):
    return folder / json.loads((folder / "manifest.json").read_text())["gguf_file"]


def test_check_passes_an_intact_artifact_and_says_how_fast(artifact):
    r = CliRunner().invoke(cli, ["check", str(artifact), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    listed = json.loads((artifact / "manifest.json").read_text())["files"]
    assert report["ok"] and report["files"] == len(listed) and report["bytes"] == sum(e["bytes"] for e in listed.values())
    assert report["hashed_bytes"] == report["bytes"]  # `xpack check` always reads everything, stamps or not


@pytest.mark.parametrize("damage", ["overwrite", "truncate", "missing"])
def test_check_names_the_first_bad_file(artifact, damage):
    gguf = _gguf(artifact)
    if damage == "overwrite":
        _overwrite(gguf, gguf.stat().st_size // 2, 1 << 16)
    elif damage == "truncate":
        os.truncate(gguf, gguf.stat().st_size - 1)
    else:
        gguf.unlink()
    r = CliRunner().invoke(cli, ["check", str(artifact)])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    says = {"overwrite": "differs from the manifest's", "truncate": "bytes, the manifest says", "missing": "missing"}[damage]
    assert f"BAD {gguf.name}: " in r.output and says in r.output
    assert r.output.rstrip().splitlines()[-1].startswith(f"Error: {artifact}/{gguf.name}")


def test_run_refuses_a_damaged_artifact_and_no_check_skips(artifact):
    gguf = _gguf(artifact)
    n = min(1 << 20, gguf.stat().st_size // 4)
    _overwrite(gguf, gguf.stat().st_size - n, n)  # up to the last MB: tensor data, the header still reads
    r = CliRunner().invoke(cli, ["run", "--artifact", str(artifact), "--profile", "cpu16", "--prompt", "hi", "--max-tokens", "2"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert f"Error: {artifact}/{gguf.name}: sha256" in r.output and "is damaged or was changed" in r.output and "--no-check" in r.output
    r = CliRunner().invoke(cli, ["run", "--artifact", str(artifact), "--profile", "cpu16", "--prompt", "hi", "--max-tokens", "2", "--no-check"])
    assert r.exit_code == 0, r.output  # the user's call: it runs (and answers whatever the damaged weights give)


def test_the_stamp_makes_a_repeat_free_until_the_file_changes(artifact):
    gguf = _gguf(artifact)
    first = integrity.require_intact(artifact)
    assert first.hashed_bytes == first.bytes  # a copy: nothing stamped yet
    assert integrity.require_intact(artifact).hashed_bytes == 0  # stamped: nothing read
    st = gguf.stat()
    _overwrite(gguf, 4096, 8)
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back: the ctime still tells
    with pytest.raises(XpackError, match="sha256 .* differs from the manifest's"):
        integrity.require_intact(artifact)


def test_export_writes_stamps_so_the_first_load_reads_nothing(gguf_artifact):
    report = integrity.require_intact(gguf_artifact)
    assert report.ok and report.bytes > 0 and report.hashed_bytes == 0


def test_load_checks_a_gguf_file_given_by_itself(artifact):
    gguf = _gguf(artifact)
    _overwrite(gguf, gguf.stat().st_size - 100, 50)
    with pytest.raises(XpackError, match="is damaged or was changed"):
        load(gguf, load_profile("cpu16"))
    (artifact / "manifest.json").unlink()  # a bare file: nothing to check against, it loads
    with load(gguf, load_profile("cpu16")) as rt:
        assert rt.tokenize("hi")


def test_export_refuses_a_damaged_source(twin_factory, tmp_path):
    twin = twin_factory.get("llama")
    merged = tmp_path / "merged"
    r = CliRunner().invoke(cli, ["merge", "--base", str(twin.model_dir), "--adapter", str(twin.adapter_dir), "--out", str(merged)])
    assert r.exit_code == 0, r.output
    weights = next(merged.glob("*.safetensors"))
    _overwrite(weights, weights.stat().st_size - 64, 32)
    out = tmp_path / "gguf"
    r = CliRunner().invoke(cli, ["export", "--model", str(merged), "--format", "gguf", "--quant", "F16", "--out", str(out)])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert f"{merged}/{weights.name}: sha256" in r.output and "the source checkpoint is damaged" in r.output
    assert not out.exists()


def test_check_without_a_manifest_is_one_line(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    r = CliRunner().invoke(cli, ["check", str(tmp_path)])
    assert r.exit_code == 1 and r.output.strip() == f"Error: {tmp_path} has no manifest.json; xpack check needs a folder written by `xpack merge` or `xpack export`"


def test_an_edited_card_does_not_stop_a_run_but_check_says_it(artifact):
    """Users edit the card (and the Modelfile) before publishing: no runtime reads them, so loading does not refuse
    the artifact; `xpack check` still reports every file that differs from the manifest."""
    with open(artifact / "README.md", "a") as f:
        f.write("\nReviewed by the radiology team.\n")
    assert integrity.require_intact(artifact).ok
    r = CliRunner().invoke(cli, ["check", str(artifact)])
    assert r.exit_code == 1 and "BAD README.md: " in r.output
