"""Command line: parse flags into Settings, then start the server. No logic of its own.

Flags are generated from the Settings fields, so `--help`, defaults and environment variables
cannot drift apart.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import typing
from collections.abc import Sequence

from pydantic import ValidationError

import tokenmill
from tokenmill.config import Settings


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"TOKENMILL_{name.upper()}"
        default = "none" if field.default is None else field.default
        help_text = f"{field.description} [default: {default}; env: {env}]"
        kwargs: dict = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        choices = _literal_choices(field.annotation)
        if field.annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif choices:
            kwargs["choices"] = choices
        parser.add_argument(flag, **kwargs)


def _literal_choices(annotation) -> list[str] | None:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(v) for v in typing.get_args(annotation)]
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description=tokenmill.__doc__)
    parser.add_argument("--version", action="version", version=f"tokenmill {tokenmill.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="start the OpenAI-compatible server",
        description="Start the OpenAI-compatible server. Every flag can also be set as an environment variable.",
    )
    _add_settings_flags(serve)
    bench = commands.add_parser(
        "bench",
        help="load-test an OpenAI-compatible server, or tokenmill in several serving modes",
        description="Closed-loop streaming load with a seeded prompt set; reports throughput, TTFT, "
        "inter-token and end-to-end latency percentiles.",
    )
    from tokenmill.bench.command import add_arguments

    add_arguments(bench)
    ray_serve = commands.add_parser(
        "ray-serve",
        help="serve on Ray Serve: replicas across a Ray cluster (needs tokenmill[ray])",
        description="Deploy tokenmill on Ray Serve (a local Ray cluster, or --ray-address). Every replica runs "
        "the app `serve` runs, with the same flags; Ray routes between replicas.",
    )
    _add_settings_flags(ray_serve)
    ray_serve.add_argument(
        "--num-replicas", type=int, default=1, help="Ray replicas (each loads the model) [default: 1]"
    )
    ray_serve.add_argument(
        "--autoscale-min", type=int, default=None, help="autoscale on ongoing requests, from this many replicas"
    )
    ray_serve.add_argument("--autoscale-max", type=int, default=None, help="... up to this many")
    ray_serve.add_argument(
        "--cpus-per-replica",
        type=float,
        default=None,
        help="Ray CPUs reserved per replica [default: --threads, else 1]",
    )
    ray_serve.add_argument(
        "--ray-address", default=None, help="join this Ray cluster ('auto' = the local head) instead of starting one"
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    return Settings(**overrides)


def _settings_or_report(args: argparse.Namespace) -> Settings | None:
    """The settings, or None after one line per problem on stderr (the caller exits 2)."""
    try:
        return settings_from_args(args)
    except ValidationError as error:
        for problem in error.errors():
            where = ".".join(str(p) for p in problem["loc"])
            message = str(problem["msg"]).removeprefix("Value error, ")
            print(
                f"tokenmill: invalid setting {where}: {message}" if where else f"tokenmill: {message}", file=sys.stderr
            )
        return None


def serve(settings: Settings) -> int:
    from tokenmill.server import create_app
    from tokenmill.server.shutdown import DrainingServer

    if settings.log_format == "json":
        fmt = '{"time": "%(asctime)s", "level": "%(levelname)s", "logger": "%(name)s", "message": %(message)r}'
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=settings.log_level.upper(), format=fmt)
    app = create_app(settings, freeze_heap=settings.gc_freeze)
    config = uvicorn_config(settings, app)
    lifecycle = app.state.serving.lifecycle
    DrainingServer(config, lifecycle, settings.drain_timeout, app.state.start_runner).run()
    return lifecycle.exit_code


def uvicorn_config(settings: Settings, app):
    import math

    import uvicorn

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # tokenmill logs each request itself, with its request id
        # uvicorn annotates it as int but hands it to loop.call_later: a fraction works as given
        timeout_keep_alive=settings.keep_alive_timeout,  # type: ignore[arg-type]
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout) + 10,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        from tokenmill.bench.command import run

        if args.baselines or args.cpp_baselines:  # baselines load the model as the first --serve-args serves it
            serve_flags = shlex.split((args.serve_args or [""])[0])
            args.baseline_settings = _settings_or_report(parser.parse_args(["serve", *serve_flags]))
            if args.baseline_settings is None:
                return 2
        return run(args)
    settings = _settings_or_report(args)
    if settings is None:
        return 2
    if args.command == "serve":
        return serve(settings)
    if args.command == "ray-serve":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            print(
                "tokenmill: ray-serve needs the ray extra: pip install 'tokenmill[ray]' (or -e '.[ray]')",
                file=sys.stderr,
            )
            return 2
        from tokenmill.deploy import ray as ray_deploy

        options = ray_deploy.RayOptions(
            args.num_replicas, args.autoscale_min, args.autoscale_max, args.cpus_per_replica
        )
        return ray_deploy.run(settings, options, args.ray_address)
    return 2
