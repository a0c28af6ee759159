"""`xpack serve`: one artifact behind an OpenAI-compatible local API (runtimes/serve/)."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import click

from xpack.cli.params import no_check_option
from xpack.errors import XpackError
from xpack.profiles.machine import resolve_for_machine
from xpack.profiles.profile import load_profile, profile_names
from xpack.runtimes.registry import RUNTIMES, load, runtime_for
from xpack.runtimes.serve.app import build_app
from xpack.runtimes.serve.config import ServeConfig

_DEFAULTS = ServeConfig()
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@click.command()
@click.option("--artifact", required=True, type=click.Path(exists=True, path_type=Path), help="What to serve: a .gguf file, a folder from `xpack export`, or a merged checkpoint folder.")
@click.option("--profile", "profile_ref", required=True, metavar="NAME|FILE", help=f"Hardware profile: {', '.join(profile_names())}, or a TOML file.")
@click.option("--host", default=_DEFAULTS.host, show_default=True, help="Address to listen on; anything but loopback lets other machines in (use --api-key).")
@click.option("--port", default=_DEFAULTS.port, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on (0: any free one).")
@click.option("--api-key", envvar="XPACK_API_KEY", help="Require `Authorization: Bearer KEY` on every route but /health (or set XPACK_API_KEY).")
@click.option("--max-concurrency", default=None, type=click.IntRange(1), help="Generations at once. A GGUF decodes them together (continuous batching; "
              "each one its own KV cache of the profile's n_ctx); ONNX and torch run one.  [default: 4 for a GGUF, 1 otherwise]")
@click.option("--max-queue", default=_DEFAULTS.max_queue, show_default=True, type=click.IntRange(0), help="Requests that may wait for a slot; past that, 429 with Retry-After.")
@click.option("--media-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Image parts may name files under this folder (nowhere else). Without it, images come as data: URIs only.")
@click.option("--model-name", default=None, help="The model id /v1/models lists.  [default: the artifact's name]")
@click.option("--max-body-mb", default=_DEFAULTS.max_body_bytes / 2**20, show_default=True, type=click.FloatRange(0.001), help="Largest request body, images included.")
@click.option("--max-tokens-limit", type=click.IntRange(1), help="The most max_tokens a request may ask for.  [default: the profile's context]")
@click.option("--shutdown-timeout", default=_DEFAULTS.shutdown_timeout_s, show_default=True, type=click.FloatRange(0), help="On SIGTERM or Ctrl-C, seconds in-flight requests get to finish before they are cancelled.")
@click.option("--no-prompt-cache", is_flag=True, help="Prefill every prompt afresh (the same request then gives the same answer bit for bit) "
              "instead of reusing the previous prompt's common prefix (llama.cpp).")
@click.option("--runtime", "runtime_name", type=click.Choice(sorted(RUNTIMES)), help="Force a runtime instead of picking it from the artifact.")
@no_check_option()
def serve(artifact, profile_ref, host, port, api_key, max_concurrency, max_queue, media_dir, model_name, max_body_mb, max_tokens_limit, shutdown_timeout,
          no_prompt_cache, runtime_name, no_check):
    """Serve an artifact behind an OpenAI-compatible API: chat (text and images), completions, streaming.

    The model is loaded once, after its files are checked against its manifest; requests queue for it
    (a full queue answers 429), a client that disconnects stops its generation, and SIGTERM finishes
    or cancels what is in flight, then exits 0. /metrics is Prometheus text.

    \b
    Example:
      xpack serve --artifact ./gemma3-xray.gguf --profile cpu16 --port 8000
      curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Describe a normal chest X-ray."}]}'
    """
    try:
        import uvicorn
    except ImportError:
        raise XpackError("xpack serve needs uvicorn, starlette and prometheus-client; install them with `pip install 'xpack[serve]'`") from None
    config = ServeConfig(
        host=host, port=port, api_key=api_key or None, max_concurrency=max_concurrency, max_queue=max_queue, media_dir=media_dir,
        model_name=model_name or artifact.resolve().name.removesuffix(".gguf"), max_body_bytes=int(max_body_mb * 2**20),
        max_tokens_limit=max_tokens_limit, shutdown_timeout_s=shutdown_timeout, prompt_cache=not no_prompt_cache,
    )
    if host not in LOOPBACK and not api_key:
        click.echo(f"warning: listening on {host} without --api-key: anyone who can reach this machine can use the model", err=True)
    profile, notes = resolve_for_machine(load_profile(profile_ref))
    for note in notes:
        click.echo(f"note: {note}", err=True)
    name = runtime_name or runtime_for(artifact, profile)
    click.echo(f"loading {artifact} with the {name} runtime on profile {profile.name} ({profile.device}, {profile.threads} threads)", err=True)
    runtime = load(artifact, profile, name, check=not no_check)
    try:
        app = build_app(runtime, config)
    except BaseException:
        runtime.close()
        raise
    click.echo(f"loaded in {runtime.load_s:.2f} s; serving {config.model_name!r} on http://{_url_host(host)}:{port}/v1", err=True)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=shutdown_timeout,
                                           lifespan="on", server_header=False))
    with _signals_end_serving():
        try:
            server.run()
        except SystemExit:  # uvicorn's answer to a port it could not bind (it has logged the reason)
            raise XpackError(f"could not listen on {host}:{port} (in use, or not an address of this machine); pick another --port or --host") from None
    click.echo("stopped", err=True)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@contextlib.contextmanager
def _signals_end_serving():
    """SIGTERM and Ctrl-C are how a server is stopped: uvicorn finishes or cancels what is in flight, and then raises the
    signal again for the handler that was there before; ignored here, so the command exits 0 instead of dying by it."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
