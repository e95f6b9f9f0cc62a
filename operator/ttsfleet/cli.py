"""The `ttsfleet` command."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import logging
import random
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ttsfleet import __version__
from ttsfleet.cluster import local, toolchain
from ttsfleet.cluster.pool import PoolError, load_pool_file, scale_gpu_pools

app = typer.Typer(
    help="ttsfleet: Kubernetes operator for GPU text-to-speech fleets.", no_args_is_help=True
)
cluster_app = typer.Typer(
    help="A local Kubernetes cluster with simulated GPU nodes.", no_args_is_help=True
)
app.add_typer(cluster_app, name="cluster")
models_app = typer.Typer(help="Precision variants of the voices.", no_args_is_help=True)
app.add_typer(models_app, name="models")

console = Console()
err_console = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


@app.command()
def version() -> None:
    """Print the version of ttsfleet and of the components it builds on."""
    console.print(f"ttsfleet {__version__}")
    for key, value in toolchain.versions().items():
        console.print(f"  {key.removesuffix('_VERSION').lower()}: {value}")


NameOption = Annotated[str, typer.Option("--name", "-n", help="Cluster name.")]


@cluster_app.command("up")
def cluster_up(
    name: NameOption = local.DEFAULT_NAME,
    nodes: Annotated[
        int | None,
        typer.Option(min=0, max=5000, help="GPU nodes in all, spread over the GPU pools."),
    ] = None,
    pool: Annotated[
        Path | None, typer.Option(help="Node-pool file (YAML); the shipped default if left out.")
    ] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Apiserver port.")] = None,
    reuse: Annotated[
        bool, typer.Option(help="Keep a cluster of this name that is already up.")
    ] = False,
    qps_limits: Annotated[
        bool, typer.Option(help="Keep the components' default client QPS limits.")
    ] = False,
) -> None:
    """Start a local cluster: real control plane, kwok GPU nodes."""
    try:
        pools = load_pool_file(pool)
        if nodes is not None:
            pools = scale_gpu_pools(pools, nodes)
        with console.status(f"Starting cluster {name}..."):
            result = local.up(name, pools, port=port, reuse=reuse, qps_limits=qps_limits)
    except (PoolError, local.ClusterError, toolchain.MissingToolError) as err:
        raise _fail(str(err)) from None
    record = result.record
    verb = "Started" if result.created else "Reused"
    console.print(f"[green]{verb}[/green] cluster [bold]{name}[/bold] in {result.seconds:.1f}s")
    console.print(f"  apiserver:    https://127.0.0.1:{record.apiserver_port}")
    console.print(f"  kubeconfig:   {record.kubeconfig}")
    console.print(f"  pod CIDR:     {record.pod_cidr} (routed to a blackhole on this host)")
    console.print(f"  service CIDR: {record.service_cidr}")
    console.print(f"  prometheus:   {local.prometheus_url(record)} (scrapes pods on local nodes)")
    table = Table("pool", "nodes", "GPU", "per node", title="Node pools", title_justify="left")
    for p in pools.pools:
        if p.gpu is None:
            gpu, per_node = ("local processes" if p.local else "-"), f"{p.cpu} CPU"
        else:
            gpu = f"{p.gpu.product} x{p.gpu.count}"
            per_node = ", ".join(f"{k} {v}" for k, v in p.gpu.mig_layout.items()) or "whole GPUs"
            if p.gpu.mig_layout:
                per_node = f"MIG {p.gpu.mig_strategy}: {per_node} per GPU"
        table.add_row(p.name, str(p.count), gpu, per_node)
    console.print(table)
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)
    console.print(
        f"Use it: export KUBECONFIG=$(ttsfleet cluster kubeconfig {name})", highlight=False
    )


@cluster_app.command("down")
def cluster_down(
    name: Annotated[str, typer.Argument(help="Cluster name.")] = local.DEFAULT_NAME,
) -> None:
    """Stop a local cluster and remove everything it made."""
    try:
        local.down(name)
    except local.ClusterError as err:
        raise _fail(str(err)) from None
    console.print(f"Removed cluster [bold]{name}[/bold]")


@cluster_app.command("kubeconfig")
def cluster_kubeconfig(
    name: Annotated[str, typer.Argument(help="Cluster name.")] = local.DEFAULT_NAME,
) -> None:
    """Print the path of a cluster's kubeconfig."""
    try:
        typer.echo(local.kubeconfig(name))
    except local.ClusterError as err:
        raise _fail(str(err)) from None


@cluster_app.command("status")
def cluster_status() -> None:
    """List local clusters and their health."""
    table = Table("NAME", "APISERVER", "CONTROLLER-MANAGER", "SCHEDULER", "NODES", "KUBECONFIG")

    def mark(ok: bool) -> str:
        return "[green]ok[/green]" if ok else "[red]down[/red]"

    rows = list(local.statuses())
    for h in rows:
        table.add_row(
            h.name, mark(h.apiserver), mark(h.controller_manager), mark(h.scheduler),
            f"{h.ready_nodes}/{h.nodes} Ready", str(h.kubeconfig),
        )  # fmt: skip
    if rows:
        console.print(table)
    else:
        console.print("No local clusters. Start one with `ttsfleet cluster up`.")


@cluster_app.command("runner")
def cluster_runner(
    name: Annotated[str, typer.Argument(help="Cluster name.")] = local.DEFAULT_NAME,
    state_dir: Annotated[Path | None, typer.Option(help="Where pods' files go.")] = None,
) -> None:
    """Act as kubelet and network plugin of the cluster's local nodes (needs root).

    `cluster up` starts it in the background when the pool has local nodes.
    """
    import signal
    import threading

    from ttsfleet.cluster.runner import Runner

    try:
        path = local.kubeconfig(name)
    except local.ClusterError as err:
        raise _fail(str(err)) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    Runner(name, path, state_dir or local.runner_dir(name)).run(stop)


@cluster_app.command("env")
def cluster_env(
    name: Annotated[str, typer.Argument(help="Cluster name.")] = local.DEFAULT_NAME,
) -> None:
    """Print shell exports: `eval "$(ttsfleet cluster env)"` sets KUBECONFIG and PATH."""
    try:
        path = local.kubeconfig(name)
        dirs = ":".join(str(d) for d in toolchain.bin_dirs())
    except (local.ClusterError, toolchain.MissingToolError) as err:
        raise _fail(str(err)) from None
    typer.echo(f"export KUBECONFIG={path}")
    record = local.load(name)
    if record is not None and record.prometheus_port:
        typer.echo(f"export PROMETHEUS_URL={local.prometheus_url(record)}")
    typer.echo(f'export PATH="{dirs}:$PATH"')


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's per-thread malloc arenas before the handler threads start.

    Each thread otherwise gets its own arena and the process keeps their peaks:
    with 1,000 objects this took the operator's peak from 462 to 424 MiB.
    """
    m_arena_max = -8  # from glibc's malloc.h
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(m_arena_max, arenas)


def _api_for(kubeconfig: Path | None, cluster: str | None) -> Any:
    from ttsfleet import kube

    if cluster is not None:
        kubeconfig = local.kubeconfig(cluster)
    return kube.api_client(kubeconfig)


def resolve_target(
    target: str, namespace: str, kubeconfig: Path | None, cluster: str | None
) -> str:
    """An address as given, or one of a TtsDeployment's ready gRPC endpoints."""
    from ttsfleet import kube

    if ":" in target:
        return target
    # One request: one list of the slices (bench and the gateway, which keep going,
    # watch them).
    addresses = kube.ready_endpoints(_api_for(kubeconfig, cluster), namespace, target, "grpc")
    if not addresses:
        raise _fail(
            f"TtsDeployment {namespace}/{target} has no ready endpoints: "
            f"check `kubectl get ttsd -n {namespace} {target}`"
        )
    # One request: any ready endpoint will do; a random one spreads many callers.
    return random.choice(addresses)  # noqa: S311 - load spreading, not secrets


@app.command()
def say(
    text: Annotated[str, typer.Argument(help="What to say.")],
    target: Annotated[
        str, typer.Option(help="A TtsDeployment name (its ready endpoints) or HOST:PORT (gRPC).")
    ] = "joe-local",
    namespace: Annotated[str, typer.Option("--namespace", "-n")] = "default",
    output: Annotated[Path, typer.Option("--output", "-o", help="WAV file to write.")] = Path(
        "out/say.wav"
    ),
    stream: Annotated[bool, typer.Option(help="Stream chunk by chunk as it is made.")] = True,
    rate: Annotated[float | None, typer.Option(help="Speaking rate, 0.5 to 2.")] = None,
    cluster: Annotated[
        str | None, typer.Option(help="A local cluster's name, for its kubeconfig.")
    ] = None,
    kubeconfig: Annotated[Path | None, typer.Option(help="Kubeconfig to resolve NAME.")] = None,
) -> None:
    """Speak TEXT through a TtsDeployment (or a Triton address) and write a WAV."""
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config import ConfigException

    from ttsfleet import client

    try:
        address = resolve_target(target, namespace, kubeconfig, cluster)
        result = (client.stream if stream else client.synthesize)(address, text, rate=rate)
    except (client.SynthesisError, local.ClusterError, ConfigException) as err:
        raise _fail(str(err)) from None
    except ApiException as err:
        raise _fail(f"the Kubernetes API refused: {err.status} {err.reason}") from None
    client.write_wav(output, result.audio, result.sample_rate)
    console.print(
        f"Wrote {output} ({result.audio_seconds:.2f} s of audio, {result.sample_rate} Hz) "
        f"from {address}"
    )
    console.print(
        f"  time to first audio: {result.seconds_to_first_audio * 1000:.0f} ms"
        f" ({result.chunks} chunk{'s' if result.chunks != 1 else ''}), "
        f"total {result.seconds_total * 1000:.0f} ms, RTF {result.real_time_factor:.3f}"
    )


@models_app.command("build")
def models_build(
    precision: Annotated[str, typer.Option(help="fp32, fp16 or int8.")],
    target: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    voice: Annotated[str, typer.Option()] = "en_US-joe-medium",
    out: Annotated[Path | None, typer.Option(help="Directory of variants.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report.")] = None,
) -> None:
    """Build a precision variant, measure it on this CPU, and gate it against FP32."""
    import json

    from ttsfleet.serving import variants

    if precision not in variants.PRECISIONS:
        raise _fail(
            f"unknown --precision {precision!r}: use one of {', '.join(variants.PRECISIONS)}"
        )
    try:
        report = variants.build(voice, precision, target, out)
    except variants.VariantError as err:
        raise _fail(str(err)) from None
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    figures = (
        f"{report.size_mib} MiB, load {report.load_seconds * 1000:.0f} ms, RTF {report.rtf}, "
        f"first chunk {report.first_chunk_ms:.0f} ms; against fp32 ({report.engine} engine): "
        f"{report.speedup}x its speed, mel distance {report.mel_distance_db} dB, duration "
        f"{report.duration_difference:.1%}"
    )
    if not report.passed:
        raise _fail(f"the {precision} variant of {voice} is refused ({report.reason}): {figures}")
    console.print(f"Built {report.path}: {figures}")


@models_app.command("split")
def models_split(
    voice: Annotated[str, typer.Option()] = "en_US-joe-medium",
    out: Annotated[Path | None, typer.Option(help="Directory of variants.")] = None,
) -> None:
    """Split a voice for the chunked engine: text part, frame part and its gain."""
    from ttsfleet.serving import streaming
    from ttsfleet.serving.engine import RequestError

    try:
        paths = streaming.build_split(voice, out)
    except RequestError as err:
        raise _fail(str(err)) from None
    console.print(f"Split {voice}: {paths.text}, {paths.frames}, {paths.meta}")


@app.command()
def plan(
    concurrency: Annotated[int, typer.Option(help="Concurrent streams one replica must hold.")],
    voice: Annotated[str, typer.Option(help="Piper voice.")] = "en_US-joe-medium",
    precision: Annotated[str, typer.Option(help="fp32, fp16 or int8.")] = "fp16",
    gpu: Annotated[
        str | None, typer.Option(help="Only this GPU (catalogue key or GFD product label).")
    ] = None,
    instances: Annotated[int | None, typer.Option(help="Triton instances per replica.")] = None,
    replicas: Annotated[int, typer.Option(help="With a cluster: replicas that must fit.")] = 1,
    cluster: Annotated[
        str | None, typer.Option(help="Plan on what a local cluster's nodes offer.")
    ] = None,
    kubeconfig: Annotated[
        Path | None, typer.Option(help="Plan on what this cluster's nodes offer.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """The cheapest GPU slice for a voice at a concurrency, and the memory figures behind it.

    With --cluster or --kubeconfig: among what that cluster's nodes offer, and whether and
    where `--replicas` of it fit now (exit status 1 when they do not).
    """
    import json

    from ttsfleet import kube
    from ttsfleet.gpu import planner
    from ttsfleet.gpu.catalog import GPUS
    from ttsfleet.resources.placement import GPU_TOLERATION

    if precision not in planner.ELEMENT_BYTES:
        raise _fail(f"--precision {precision!r}: use one of {', '.join(planner.ELEMENT_BYTES)}")
    if concurrency < 1 or replicas < 1:
        raise _fail("--concurrency and --replicas must be at least 1")
    products = list(GPUS.values())
    if gpu is not None:
        product = planner.product_for_label(gpu)
        if product is None:
            raise _fail(f"--gpu {gpu!r} is not in the catalogue: use one of {', '.join(GPUS)}")
        products = [product]
    api = _api_for(kubeconfig, cluster) if cluster or kubeconfig else None
    nodes = planner.eligible_nodes(kube.list_nodes(api), {}, [GPU_TOLERATION]) if api else []
    options = (
        [o for o in planner.options_from_nodes(nodes) if o.product in products]
        if api
        else planner.catalogue_options(products)
    )
    try:
        chosen = planner.plan(voice, precision, concurrency, options, instances)
    except planner.PlanError as err:
        if as_json:
            print(json.dumps({"placement": None, "error": str(err)}))
            raise typer.Exit(1) from err
        raise _fail(str(err)) from err
    out = chosen.as_dict()
    fits = True
    if api is not None:
        have = planner.capacity(chosen.option, nodes, kube.list_bound_pods(api))
        fits = have.free >= replicas
        out["cluster"] = {
            "replicas": replicas, "fits": fits, "allocatable": have.allocatable,
            "in_use": have.in_use, "free": have.free, "free_by_node": have.free_by_node(),
        }  # fmt: skip
    if as_json:
        print(json.dumps(out))
        raise typer.Exit(0 if fits else 1)
    memory = chosen.memory
    console.print(
        f"{concurrency} streams of {voice} in {precision}: [bold]{chosen.option.name}[/bold] on "
        f"{chosen.option.product.key} ({chosen.option.resource}), {chosen.instances} Triton "
        "instance(s)",
        highlight=False,
    )
    table = Table("GiB per replica", "", box=None)
    for key, value in memory.as_dict().items():
        table.add_row(key.replace("_", " "), f"{value:.2f}")
    console.print(table)
    console.print(f"estimate: {out['estimate']}", highlight=False, style="dim")
    if "cluster" in out:
        where = ", ".join(f"{n}: {k}" for n, k in out["cluster"]["free_by_node"].items())
        verdict = "fit" if fits else "do NOT fit"
        console.print(
            f"{replicas} replica(s) {verdict}: {out['cluster']['free']} of "
            f"{out['cluster']['allocatable']} {chosen.option.name} free ({where or 'none'})",
            highlight=False,
        )
        if not fits:
            raise typer.Exit(1)


@app.command()
def bench(
    target: Annotated[
        list[str], typer.Option(help="TtsDeployment name or HOST:PORT (repeat for several).")
    ] = ["joe-local"],  # noqa: B006 - typer reads the default
    namespace: Annotated[str, typer.Option("--namespace", "-n")] = "default",
    concurrency: Annotated[str, typer.Option(help="Closed-loop levels, e.g. 1,4,8.")] = "1,4,8",
    rate: Annotated[
        float | None, typer.Option(help="Open loop instead: mean requests per second.")
    ] = None,
    seconds: Annotated[float, typer.Option(help="Duration of each level.")] = 20.0,
    requests: Annotated[int, typer.Option(help="At most this many requests per level.")] = 10_000,
    stream: Annotated[bool, typer.Option(help="Streaming model, else the batched one.")] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results as JSON.")] = None,
    plot_out: Annotated[Path | None, typer.Option("--plot", help="Write a PNG plot.")] = None,
    cluster: Annotated[str | None, typer.Option(help="A local cluster's name.")] = None,
    kubeconfig: Annotated[Path | None, typer.Option()] = None,
) -> None:
    """Load TTS endpoints: TTFA and latency percentiles, RTF, throughput, errors."""
    from rich.progress import Progress

    from ttsfleet import bench as bench_module
    from ttsfleet import client, harness, kube

    addresses = [t for t in target if ":" in t]
    names = [t for t in target if ":" not in t]

    api: Any = _api_for(kubeconfig, cluster) if names else None
    # Each TtsDeployment's ready endpoints, kept current by a watch (not polled).
    watches = [kube.EndpointWatch(api, namespace, name, "grpc").start() for name in names]
    for endpoints in watches:
        endpoints.wait_listed(10)

    def resolve() -> list[str]:
        return [*addresses, *(a for endpoints in watches for a in endpoints.addresses())]

    balancer = client.Balancer(resolve, refresh_seconds=0)
    for endpoints in watches:
        atexit.register(endpoints.stop)
    call = client.stream if stream else client.synthesize
    levels = [int(c) for c in concurrency.split(",") if c.strip()]
    results = []
    with Progress(console=console, transient=True) as progress:
        for level in [None] if rate is not None else levels:
            label = f"rate {rate}/s" if rate is not None else f"concurrency {level}"
            task = progress.add_task(label, total=None)

            def tick(task: Any = task) -> None:
                progress.advance(task)

            if rate is not None:
                result = bench_module.open_loop(call, balancer, rate, seconds, tick=tick)
            else:
                result = bench_module.closed_loop(
                    call, balancer, level or 1, seconds, requests, tick=tick
                )
            results.append(result)
            progress.remove_task(task)
            ttfa = "/".join(_figure(result.ttfa_ms[k], ".0f") for k in ("p50", "p95", "p99"))
            console.print(
                f"{result.label:>10}: {result.requests} requests, {result.errors} errors, "
                f"TTFA p50/p95/p99 {ttfa} ms, "
                f"latency p95 {_figure(result.latency_ms['p95'], '.0f')} ms, "
                f"RTF {_figure(result.rtf_mean, '.3f')}, {result.requests_per_second:.1f} req/s"
            )
            for example in result.error_examples:
                err_console.print(f"    error: {example}", highlight=False)
    mode = "stream" if stream else "batch"
    if json_out is not None:
        doc = bench_module.as_json(results, target=target, mode=mode, seconds=seconds)
        harness.write_results(json_out, doc)  # with where it ran: commit, machine, command
        console.print(f"Wrote {json_out}")
    if plot_out is not None:
        bench_module.plot(results, plot_out, f"ttsfleet bench: {', '.join(target)} ({mode})")
        console.print(f"Wrote {plot_out}")


def _figure(value: float | None, spec: str) -> str:
    """A measured figure, or "-" where there is none (no request succeeded)."""
    return "-" if value is None else format(value, spec)


@app.command()
def sim(
    trace: Annotated[
        str | None,
        typer.Option(
            help="diurnal, spike, flash-crowd, ramp (each also -noisy), or a CSV file "
            "(t_s,requests_per_s)."
        ),
    ] = None,
    policy: Annotated[
        list[str] | None,
        typer.Option(
            help="ttsfleet, hpa, hpa-queue, keda, kpa, oracle, static-peak (repeat); all if unset."
        ),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of a table.")
    ] = False,
    plot_dir: Annotated[Path | None, typer.Option("--plot", help="Write PNGs here.")] = None,
    validate: Annotated[
        Path | None, typer.Option(help="Replay a recorded run of the real loop (JSON) instead.")
    ] = None,
    cold_start: Annotated[
        float, typer.Option(min=0, help="Seconds until a new replica is Ready.")
    ] = 30.0,
    slo_ms: Annotated[float, typer.Option(min=1, help="TTFA SLO in milliseconds.")] = 300.0,
    balancer: Annotated[
        str | None,
        typer.Option(
            help="In front of the replicas: random (a Kubernetes Service; the default), "
            "round-robin (the benchmarks' client: the default with --validate), p2c (the "
            "ttsfleet gateway), jsq (the bound)."
        ),
    ] = None,
    replay: Annotated[
        bool | None,
        typer.Option(
            "--replay/--fluid",
            help="Request by request (Poisson arrivals on the trace's rate) or the fluid "
            "model; default: replay a CSV file, fluid for the built-in traces.",
        ),
    ] = None,
) -> None:
    """Simulate a fleet under a traffic trace with ttsfleet's autoscaler and its peers."""
    import json

    from ttsfleet.sim import compare, report, traces
    from ttsfleet.sim import validate as validation
    from ttsfleet.sim.engine import SimConfig
    from ttsfleet.sim.service import BALANCERS, DEFAULT_BALANCER, calibrated

    balancer = balancer or (validation.BALANCER if validate is not None else DEFAULT_BALANCER)
    if balancer not in BALANCERS:
        raise _fail(f"unknown --balancer {balancer!r}: use one of {', '.join(BALANCERS)}")
    config = SimConfig(slo_s=slo_ms / 1000, cold_start_s=cold_start, replay=replay)
    service = calibrated(balancer=balancer)
    if validate is not None:
        try:
            checked = validation.validate(validation.load_record(validate, config), service)
        except validation.RecordError as err:
            raise _fail(str(err)) from None
        if json_out:
            typer.echo(json.dumps(checked, indent=2))
            return
        table = Table(
            "t (s)", "req/s", "replicas", "sim", "ready", "sim", "TTFA p95 (ms)", "sim",
            title=f"Recorded run {validate} against the simulator", title_justify="left",
        )  # fmt: skip
        for row in checked["rows"]:
            table.add_row(*(
                "-" if v is None else f"{v * 1000:.0f}" if k.endswith("ttfa_p95_s") else f"{v:g}"
                for k, v in row.items()
            ))  # fmt: skip
        console.print(table)
        console.print(f"error: {checked['error']}", highlight=False)
        return
    if trace is None:
        raise _fail(f"give --trace: one of {', '.join(traces.BUILTIN)} or a CSV file")
    bad = compare.unknown_policies(policy or [])
    if bad:
        raise _fail(f"unknown --policy {bad[0]!r}: use one of {', '.join(compare.POLICIES)}")
    try:
        loaded = traces.load(trace)
    except traces.TraceError as err:
        raise _fail(str(err)) from None
    result = compare.compare(loaded, policy, config, service)
    if json_out:
        goals = report.goals(result, traces.KINDS.get(trace))  # a CSV file: no kind
        typer.echo(json.dumps(report.as_json(result) | {"goals": goals}, indent=2))
    else:
        console.print(report.table(result, config.slo_s))
    if plot_dir is not None:
        for path in report.plot(result, plot_dir):
            (err_console if json_out else console).print(f"Wrote {path}")


@app.command()
def demo(
    name: Annotated[str, typer.Option("--name", help="Cluster name.")] = local.DEFAULT_NAME,
    output: Annotated[Path, typer.Option("--output", "-o")] = Path("out/demo.wav"),
) -> None:
    """The main job, locally: cluster, operator, a TtsDeployment, real speech to a WAV."""
    import openai
    from kubernetes.client.exceptions import ApiException

    from ttsfleet import client
    from ttsfleet import demo as demo_module

    try:
        result = demo_module.run(name, output, say=console.print)
    except (local.ClusterError, toolchain.MissingToolError, client.SynthesisError) as err:
        raise _fail(str(err)) from None
    except openai.OpenAIError as err:
        raise _fail(f"the speech API refused: {err}") from None
    except ApiException as err:
        raise _fail(f"the Kubernetes API refused: {err.status} {err.reason}") from None
    speech = result.speech
    console.print(
        f"[green]Spoke[/green] {speech.audio_seconds:.1f} s of audio into [bold]{output}[/bold] "
        f"from {result.name} at {result.address}"
    )
    console.print(
        f"  time to first audio {speech.seconds_to_first_audio * 1000:.0f} ms, "
        f"RTF {speech.real_time_factor:.3f} ({speech.chunks} chunks); "
        f"demo took {result.seconds:.1f}s"
    )
    console.print(
        f"[green]Spoke[/green] the same through the speech API with the openai client into "
        f"[bold]{result.mp3}[/bold]"
    )
    typer.echo(f"gateway: {result.gateway_url}")
    console.print(f"  listen: aplay {output}   (or open {result.mp3} in any audio player)")
    console.print(f"  token:  ttsfleet token --cluster {name}")
    console.print(
        f'  look:   eval "$(ttsfleet cluster env {name})" && kubectl get ttsd,ttsgw,pods -o wide'
    )


@app.command()
def agent(
    node: Annotated[
        str | None,
        typer.Option(envvar="NODE_NAME", help="The Node to annotate; without it, nothing is."),
    ] = None,
    interval: Annotated[float, typer.Option(min=1, help="Seconds between NVML reads.")] = 30.0,
    metrics_port: Annotated[int, typer.Option(help="Port of the agent's /metrics.")] = 9402,
    once: Annotated[
        bool, typer.Option("--once", help="One pass: print the annotations, then exit.")
    ] = False,
    replay: Annotated[
        Path | None, typer.Option(help="Replay an NVML inventory (JSON) instead of NVML.")
    ] = None,
    kubeconfig: Annotated[
        Path | None, typer.Option(help="Kubeconfig; in-cluster config or the default if unset.")
    ] = None,
) -> None:
    """Run the node agent: read NVML, publish ttsfleet.io/ annotations and metrics (read-only).

    Without a GPU it says so; with --once it then exits 0, else it idles.
    """

    from kubernetes.config import ConfigException

    from ttsfleet import kube
    from ttsfleet.agent import nvml, run
    from ttsfleet.agent import replay as replay_module

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = run.Settings(node=node, interval=interval, metrics_port=metrics_port, once=once)
    source: nvml.Nvml = nvml.default()
    if replay is not None:
        try:
            replayed = replay_module.Replay.from_file(replay)
        except replay_module.ReplayError as err:
            raise _fail(str(err)) from None
        source = replayed
        settings = dataclasses.replace(
            settings, source=f"replay of {replay.name}", synthetic=replayed.synthetic
        )
    try:
        api = kube.api_client(kubeconfig) if node else None
        run.run(source, settings, api, say=typer.echo)
    except run.NoGpu as err:
        console.print(str(err), highlight=False, soft_wrap=True)
        if not once:
            # As a DaemonSet pod: stay up and idle, or Kubernetes restarts it forever
            # (CrashLoopBackOff) on a node that simply has no GPU (or no NVIDIA runtime).
            run.idle(settings.metrics_port)
    except (run.AgentError, ConfigException) as err:
        raise _fail(str(err)) from None
    except OSError as err:
        raise _fail(f"cannot serve metrics on port {metrics_port} ({err.strerror})") from None


@app.command()
def operator(
    kubeconfig: Annotated[
        Path | None, typer.Option(help="Kubeconfig; in-cluster config or the default if unset.")
    ] = None,
    namespace: Annotated[
        list[str] | None, typer.Option("--namespace", "-n", help="Watch only these namespaces.")
    ] = None,
    metrics_port: Annotated[int, typer.Option(help="Port of the operator's /metrics.")] = 8080,
    health_port: Annotated[
        int, typer.Option(help="Port of /healthz (liveness) and /readyz (readiness).")
    ] = 8081,
    prometheus_url: Annotated[
        str | None,
        typer.Option(envvar="PROMETHEUS_URL", help="Prometheus with the Triton metrics."),
    ] = None,
    leader_election: Annotated[
        bool,
        typer.Option(
            help="Take part in leader election (a Lease): only the leader acts, the others "
            "stand by. --no-leader-election for a single process."
        ),
    ] = True,
    leader_election_namespace: Annotated[
        str | None,
        typer.Option(
            help="Namespace of the Lease (by default POD_NAMESPACE, else the in-cluster "
            "namespace, else default)."
        ),
    ] = None,
    leader_election_id: Annotated[
        str, typer.Option(help="Name of the Lease.")
    ] = "ttsfleet-operator",
    leader_election_identity: Annotated[
        str | None,
        typer.Option(help="This replica's name in the Lease (by default host-name_pid)."),
    ] = None,
    lease_duration: Annotated[
        float, typer.Option(help="Seconds a standby waits on an unrenewed Lease.")
    ] = 15.0,
    renew_deadline: Annotated[
        float, typer.Option(help="Seconds the leader keeps acting without a renewal.")
    ] = 10.0,
    retry_period: Annotated[
        float, typer.Option(help="Seconds between tries to acquire or renew the Lease.")
    ] = 2.0,
    gateway_node_reader: Annotated[
        str,
        typer.Option(
            help="The ClusterRole that lets TtsGateways read Nodes (the chart ships one)."
        ),
    ] = "ttsfleet-gateway-node-reader",
) -> None:
    """Run the operator: reconcile TtsDeployments and TtsGateways."""
    from kubernetes.config import ConfigException

    from ttsfleet import leader
    from ttsfleet.manager import Manager, Options, PortError

    _limit_malloc_arenas()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # kopf logs every handler run at INFO; keep its warnings and errors.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    identity = leader_election_identity or leader.default_identity()
    try:
        lease = (
            leader.LeaseConfig(
                name=leader_election_id,
                namespace=leader_election_namespace or leader.default_namespace(),
                identity=identity,
                lease_duration=lease_duration,
                renew_deadline=renew_deadline,
                retry_period=retry_period,
            )
            if leader_election
            else None
        )
        options = Options(
            kubeconfig, namespace or [], metrics_port, health_port, prometheus_url, identity,
            lease, gateway_node_reader,
        )  # fmt: skip
        manager = Manager(options)
    except leader.ConfigError as err:
        raise _fail(str(err)) from None
    except ConfigException as err:
        raise _fail(f"no cluster to talk to: {err}; pass --kubeconfig") from None
    try:
        manager.serve()
    except PortError as err:
        raise _fail(str(err)) from None
    manager.install_signals()
    manager.run()


@app.command()
def gateway(
    config: Annotated[
        Path, typer.Option(help="The gateway's config (JSON; a TtsGateway's ConfigMap).")
    ],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",  # noqa: S104
    port: Annotated[int, typer.Option(help="Port of the speech API.")] = 8080,
    kubeconfig: Annotated[
        Path | None,
        typer.Option(help="Kubeconfig for watching EndpointSlices (in-cluster if unset)."),
    ] = None,
) -> None:
    """Run the speech gateway: OpenAI's /v1/audio/speech in front of TtsDeployments."""
    from kubernetes.config import ConfigException

    from ttsfleet.gateway import config as gateway_config
    from ttsfleet.gateway import server
    from ttsfleet.gateway.auth import ConfigError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        parsed = gateway_config.load(config)
    except ConfigError as err:
        raise _fail(f"--config {config}: {err}") from None
    api = None
    if any(fleet.endpoints is None for fleet in parsed.fleets().values()):
        from ttsfleet import kube

        try:
            api = kube.api_client(kubeconfig)
        except ConfigException as err:
            raise _fail(f"no cluster to watch fleets in: {err}; pass --kubeconfig") from None
    server.serve(config, host, port, api)


@app.command()
def witness(
    region: Annotated[
        list[str], typer.Option(help="A region to watch, NAME=GATEWAY_URL (repeat: every region).")
    ],
    host: Annotated[str, typer.Option(help="Address /status listens on.")] = "0.0.0.0",  # noqa: S104
    port: Annotated[int, typer.Option(help="Port of /status (the regions' witnessUrl).")] = 8090,
    token_file: Annotated[
        Path | None, typer.Option(help="A file holding the bearer token probes send.")
    ] = None,
    interval: Annotated[float, typer.Option(min=0.5, help="Seconds between probes.")] = 2.0,
) -> None:
    """Run the witness that breaks ties between two regions: it probes each region's
    gateway and serves its votes; run it outside both regions (docs/regions.md)."""
    from ttsfleet.api.v1alpha1 import RegionDetection
    from ttsfleet.failover.agent import Agent, Target
    from ttsfleet.failover.health import WITNESS

    pairs = [r.split("=", 1) for r in region]
    if any(len(p) != 2 or not p[1].startswith(("http://", "https://")) for p in pairs):
        raise _fail("--region takes NAME=GATEWAY_URL, for example eu=https://eu.speech.example")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    token = token_file.read_text().strip() if token_file else None
    rules = RegionDetection(probe_interval_seconds=interval)
    agent = Agent(WITNESS, [Target(n, u) for n, u in pairs], rules, token=token)
    _run_agent(agent, host, port)


@app.command()
def region(
    spec: Annotated[Path, typer.Option(help="A TtsRegion manifest (YAML), as kubectl applies it.")],
    gateway_url: Annotated[str, typer.Option(help="This region's own gateway.")],
    host: Annotated[str, typer.Option(help="Address /status listens on.")] = "0.0.0.0",  # noqa: S104
    port: Annotated[int, typer.Option(help="Port of /status (the peers' statusUrl).")] = 8090,
    token_file: Annotated[
        Path | None, typer.Option(help="A file holding the bearer token probes send.")
    ] = None,
    eds: Annotated[
        Path | None, typer.Option(help="The EDS file of this region's Envoy (replaced by rename).")
    ] = None,
    status_to: Annotated[
        str | None,
        typer.Option(help="NAMESPACE/NAME of the TtsRegion whose status.regions to write."),
    ] = None,
    kubeconfig: Annotated[
        Path | None, typer.Option(help="Kubeconfig for --status-to (in-cluster if unset).")
    ] = None,
    source: Annotated[
        str | None, typer.Option(help="The address probes and peer reads leave from.")
    ] = None,
) -> None:
    """Run a region's observer outside Kubernetes: probes, votes, quorum, failback, and
    this region's Envoy (the operator runs the same agent for each TtsRegion)."""
    from ttsfleet.failover.agent import Agent

    try:
        parsed = _region_spec(spec.read_text())
    except (OSError, ValueError) as err:
        raise _fail(f"--spec {spec}: {err}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    token = token_file.read_text().strip() if token_file else None
    agent = Agent.for_region(parsed, gateway_url, token=token, eds=eds, source=source)
    agent.before_tick = _spec_follower(spec, gateway_url)
    if status_to is not None:
        namespace, _, name = status_to.partition("/")
        if not namespace or not name:
            raise _fail("--status-to takes NAMESPACE/NAME of a TtsRegion")
        agent.on_change = _region_status_writer(kubeconfig, namespace, name)
    _run_agent(agent, host, port)


def _region_spec(text: str) -> Any:
    """The TtsRegionSpec of a TtsRegion manifest (YAML or JSON); ValueError naming what
    is wrong otherwise."""
    import yaml
    from pydantic import ValidationError

    from ttsfleet.api.v1alpha1 import TtsRegionSpec

    try:
        return TtsRegionSpec.model_validate(yaml.safe_load(text)["spec"])
    except (KeyError, TypeError, yaml.YAMLError, ValidationError) as err:
        raise ValueError(str(err)) from None


def _spec_follower(path: Path, gateway_url: str) -> Any:
    """Before each round: an edited spec file (the ConfigMap the operator renders, as the
    kubelet refreshes it) is taken up without a restart; one that does not parse is
    logged and the last good one kept."""
    log = logging.getLogger("ttsfleet.region")
    last = [path.read_text()]

    def follow(agent: Any) -> None:
        try:
            text = path.read_text()
        except OSError as err:
            log.warning("cannot read --spec %s (%s): keeping the last one", path, err)
            return
        if text == last[0]:
            return
        last[0] = text
        try:
            parsed = _region_spec(text)
        except ValueError as err:
            log.error("the edited --spec %s is refused, keeping the last one: %s", path, err)
            return
        agent.reconfigure(parsed, gateway_url)

    return follow


def _region_status_writer(kubeconfig: Path | None, namespace: str, name: str) -> Any:
    from ttsfleet import kube
    from ttsfleet.api import v1alpha1 as api
    from ttsfleet.failover.agent import StatusWriter

    client = kube.api_client(kubeconfig)

    def write(view: list[dict[str, Any]]) -> None:
        kube.patch_custom_status(
            client, api.GROUP, api.VERSION, api.REGION_PLURAL, namespace, name, {"regions": view}
        )

    return StatusWriter(write)


def _run_agent(agent: Any, host: str, port: int) -> None:
    import asyncio
    import signal

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await agent.run(stop, host, port)

    asyncio.run(main())


@app.command()
def token(
    cluster: Annotated[str, typer.Option(help="The local cluster whose gateways accept it.")],
    tenant: Annotated[str, typer.Option(help="The tenant claim.")] = "default",
    ttl: Annotated[float, typer.Option(min=1, help="Seconds the token is valid.")] = 3600,
    subject: Annotated[str, typer.Option(help="The sub claim.")] = "local-user",
) -> None:
    """Print a bearer token for a local cluster's gateways (only the token, on stdout)."""
    from ttsfleet.cluster import tokens

    try:
        typer.echo(tokens.token(cluster, tenant=tenant, ttl_seconds=ttl, subject=subject))
    except local.ClusterError as err:
        raise _fail(str(err)) from None
