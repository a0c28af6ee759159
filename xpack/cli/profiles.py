"""`xpack profiles list|show|detect` (profiles/)."""

from __future__ import annotations

import click

from xpack.cli.params import XpackGroup, emit
from xpack.profiles.machine import detect_profile, resolve_for_machine
from xpack.profiles.profile import list_profiles, load_profile


@click.group(cls=XpackGroup)
def profiles():
    """Hardware profiles: list the shipped ones, show one, or detect which fits this machine.

    A profile is a TOML file (device, threads, gpu_layers, compute_dtype, n_ctx, memory budget,
    preferred formats, and the seed model card's reference figures); pass a shipped name or a path
    to your own file wherever a profile is asked for.

    \b
    Example:
      xpack profiles list
      xpack profiles show t4 --json
      xpack profiles detect
    """


@profiles.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON.")
def profiles_list(as_json):
    """List the shipped hardware profiles with the seed model card's reference figures.

    \b
    Example:
      xpack profiles list
    """
    found = list_profiles()
    header = ("name", "device", "threads", "dtype", "n_ctx", "budget", "reference (load / 256 tokens / memory)")
    rows = [header]
    for p in found:
        r = p.reference
        ref = f"{r.hardware}: {r.load_s:g} s / {r.tokens256_s:g} s / {r.memory_gb:g} GB" if r else "-"
        budget = f"{p.memory_budget_gb:g} GB" if p.memory_budget_gb else "-"
        rows.append((p.name, p.device, str(p.threads or "all"), p.compute_dtype, str(p.n_ctx), budget, ref))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]).rstrip() for row in rows]
    emit({p.name: p.to_dict() for p in found}, as_json, lines)


@profiles.command("show")
@click.argument("profile_ref", metavar="NAME|FILE")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
def profiles_show(profile_ref, as_json):
    """Show every field of a profile (a shipped name or a TOML file).

    \b
    Example:
      xpack profiles show cpu16
      xpack profiles show ./my-box.toml --json
    """
    profile = load_profile(profile_ref)
    data = profile.to_dict()
    lines = []
    for key, value in data.items():
        if key == "reference":
            continue
        if key == "threads" and value == 0:
            value = "0 (all cores)"
        elif key == "gpu_layers" and value == -1:
            value = "-1 (all)"
        elif isinstance(value, list):
            value = ", ".join(value)
        lines.append(f"{key + ':':<18}{'-' if value is None or value == '' else value}")
    ref = data["reference"]
    if ref:
        lines.append("reference:")
        lines += [f"  {key + ':':<16}{value}" for key, value in ref.items()]
    emit(data, as_json, lines)


@profiles.command("detect")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def profiles_detect(as_json):
    """Say which shipped profile fits this machine, and why (cores, RAM, GPU seen).

    \b
    Example:
      xpack profiles detect
    """
    profile, reason = detect_profile()
    resolved, notes = resolve_for_machine(profile)
    data = {"profile": profile.name, "reason": reason, "threads": resolved.threads, "notes": notes}
    lines = [f"profile: {profile.name}", f"why:     {reason}", *[f"note:    {n}" for n in notes]]
    emit(data, as_json, lines)
