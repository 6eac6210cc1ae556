"""`make s3-up` / `make s3-down`: the local endpoint (rig.endpoint) as processes that outlive the command.

`python -m rig up [--net PRESET] [--bucket NAME]` starts moto's server on 127.0.0.1 (and with a shaped
preset the proxy in front, as its own process) and keeps its state in `.s3-local/`: pid files that name
each process and its start time (rig.pidfile: a stale one never gets an unrelated process signalled),
the endpoint, and two env files. `env` is for a shell (`source .s3-local/env`); `env.mk` is what
`make LOCAL_S3=1 ...` includes. Both set the rig's placeholder keys and unset the caller's session token,
profile and IBM API key: requests to a local test server are never signed with a user's identity, and a
user's real S3 traffic is never sent here unless they ask for it. `python -m rig down` stops what the
pid files still name and removes the state.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from feedrate.errors import CliParser, FeedrateError, run_cli
from rig import locals3, pidfile
from rig.endpoint import CALLER_CREDENTIALS, LocalEndpoint, start_endpoint

STATE_DIR = Path(".s3-local")
DEFAULT_BUCKET = "feedrate"
SERVER_MARKER = "moto_server"  # what the server's and the proxy's command lines name
PROXY_MARKER = "rig.netproxy"
STATE_FILES = ("pid", "proxy_pid", "endpoint", "env", "env.mk")


def write_env_files(state_dir: Path, env: dict[str, str]) -> None:
    """`env` (shell) and `env.mk` (make) in `state_dir`: set `env`, unset the caller's credentials.

    env.mk overrides what the caller set (`override`): it is only read when the caller asked for the
    local endpoint (`make LOCAL_S3=1`), and then the placeholder keys are the ones to use."""
    shell = ["# written by `make s3-up`: the S3/COS SDKs pointed at the local endpoint, placeholder keys"]
    shell += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    shell.append("unset " + " ".join(CALLER_CREDENTIALS))
    mk = ["# written by `make s3-up`; read by `make LOCAL_S3=1 ...` only"]
    for key, value in env.items():
        if any(c in value for c in "$#\n\\"):
            raise FeedrateError(
                f"{key}={value!r} cannot be written to env.mk; accepted: values without $, #, \\ or newline"
            )
        mk += [f"override {key} := {value}", f"export {key}"]
    mk.append("unexport " + " ".join(CALLER_CREDENTIALS))
    mk.append(f"LOCAL_S3_ENDPOINT := {env['AWS_ENDPOINT_URL']}")
    (state_dir / "env").write_text("\n".join(shell) + "\n")
    (state_dir / "env.mk").write_text("\n".join(mk) + "\n")


def _up(bucket: str, net: str = "") -> None:
    if net:
        from feedrate.network import preset

        preset(net)  # before anything starts: an unknown name is a one-line error naming the accepted ones
    running = pidfile.owned(STATE_DIR / "pid", SERVER_MARKER)
    if running is not None:
        endpoint = (STATE_DIR / "endpoint").read_text().strip()
        print(f"local S3 already running (pid {running}) at {endpoint}")
        return
    orphan = pidfile.owned(STATE_DIR / "proxy_pid", PROXY_MARKER)  # a proxy whose server is gone
    if orphan is not None:
        locals3.stop(orphan)
    STATE_DIR.mkdir(exist_ok=True)
    shaped = bool(net) and net != "loopback"
    started = start_endpoint(bucket, STATE_DIR, proxy="process" if shaped else "", net=net or "loopback")
    try:
        _record(started)
    except BaseException:
        started.close()
        _remove_state()
        raise
    server = started.server
    print(f"local S3 (moto) running, pid {server.pid}, endpoint {server.endpoint}, bucket '{bucket}'")
    if started.endpoint != server.endpoint:
        print(f"shaped as '{net}' through the proxy at {started.endpoint} (the env files point there)")
    print("make targets use it when asked:  make LOCAL_S3=1 ...   in a shell:  source .s3-local/env")
    print(f"then e.g.  make shards LOCAL_S3=1 DEST=s3://{bucket}/cifar10   or   DEST=cos://{bucket}/cifar10")


def _record(started: LocalEndpoint) -> None:
    pidfile.write(STATE_DIR / "pid", started.server.pid)
    if started.proxy_pid is not None:
        pidfile.write(STATE_DIR / "proxy_pid", started.proxy_pid)
    (STATE_DIR / "endpoint").write_text(started.endpoint + "\n")
    write_env_files(STATE_DIR, started.env())


def _remove_state() -> None:
    for name in STATE_FILES:
        (STATE_DIR / name).unlink(missing_ok=True)


def _down() -> None:
    proxy = pidfile.owned(STATE_DIR / "proxy_pid", PROXY_MARKER)
    server = pidfile.owned(STATE_DIR / "pid", SERVER_MARKER)
    if proxy is not None:
        locals3.stop(proxy)
    if server is not None:
        locals3.stop(server)
    _remove_state()  # the env files too: a leftover env.mk must not outlive the server it names
    print(f"local S3 stopped (pid {server})" if server is not None else "local S3 is not running")


def main(argv: list[str] | None = None) -> None:
    p = CliParser(prog="s3-local", description="A local S3 endpoint on 127.0.0.1.")
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("--bucket", default=DEFAULT_BUCKET, help="bucket to create (default: %(default)s)")
    p.add_argument("--net", default="", help="a network preset to shape the endpoint as (feedrate.network)")

    def body() -> None:
        args = p.parse_args(argv)
        _up(args.bucket, args.net) if args.action == "up" else _down()

    run_cli("s3-local", body)


if __name__ == "__main__":
    main()
