"""make compare's command line: every value checked before anything runs; a bad one is one line, exit 2,
naming the value and what is accepted, and nothing is written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import compare
from bench.cli import SHAPED, parse_ints, parse_list
from loaders import BACKENDS


def test_defaults_and_valid_values() -> None:
    args = compare.parse_args([])
    assert args.loaders == list(BACKENDS) and args.nets == [] and args.rates is None
    assert compare.sweep_rates(args.rates, cuda=False) == list(compare.CPU_SWEEP)
    assert compare.sweep_rates(args.rates, cuda=True) == [None], "auto on a GPU: the real model"
    args = compare.parse_args(
        ["--loaders", " wds, tensor ", "--net", "home,same-region", "--emulate", "2e3,8000"]
    )
    assert args.loaders == ["wds", "tensor"] and args.nets == ["home", "same-region"]
    assert args.rates == [2000.0, 8000.0] and compare.sweep_rates(args.rates, cuda=True) == [2000.0, 8000.0]
    assert (
        compare.parse_args(["--net", "all"]).nets == list(SHAPED) == ["same-region", "cross-region", "home"]
    )
    assert compare.parse_args(["--emulate", "none"]).rates == [None]
    args = compare.parse_args(["--epochs", "3", "--workers", "0", "--max-batches", "5"])
    assert (args.epochs, args.workers, args.max_batches) == (3, 0, 5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--loaders", "ffcv,wds"], "unknown loader ffcv; accepted: torchvision, wds, dali, tensor"),
        (["--loaders", ","], "unknown loader (none); accepted: torchvision, wds, dali, tensor"),
        (["--net", "moon"], "unknown network preset moon; accepted: same-region, cross-region, home"),
        (["--net", "loopback"], "unknown network preset loopback; accepted: same-region, cross-region, home"),
        (["--emulate", "fast"], "--emulate 'fast': expected auto, none or comma-separated img/s rates"),
        (["--emulate", "1000,0"], "--emulate '1000,0': rates must be positive, finite numbers of img/s"),
        (["--emulate", "inf"], "--emulate 'inf': rates must be positive, finite numbers of img/s"),
        (["--emulate", "nan"], "--emulate 'nan': rates must be positive, finite numbers of img/s"),
        (["--emulate", ","], "--emulate ',': rates must be positive, finite numbers of img/s"),
        (["--epochs", "0"], "--epochs 0 must be >= 1"),
        (["--workers", "-1"], "--workers -1 must be >= 0"),
        (["--max-batches", "0"], "--max-batches 0 must be >= 1"),
        (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
        (["--colour", "red"], "unrecognized arguments: --colour red"),
    ],
)
def test_bad_values_are_one_line_exit_2_before_anything_runs(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        compare.main([*argv, "--out", str(out)])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == f"compare: error: {message}\n" and captured.out == ""
    assert not out.exists()


def test_net_needs_a_local_dataset(tmp_path: Path) -> None:
    from feedrate.errors import FeedrateError

    with (
        pytest.raises(FeedrateError, match=r"--net needs a local dataset to copy to S3; .* has no manifest"),
        compare.shaped_s3(str(tmp_path), tmp_path),
    ):
        pass


def test_shared_list_parsers() -> None:
    from feedrate.errors import FeedrateError

    assert parse_list("b,a", ("a", "b", "c"), "letter") == ["b", "a"]
    with pytest.raises(FeedrateError, match=r"^unknown letter d, e; accepted: a, b, c$"):
        parse_list("a,d,e", ("a", "b", "c"), "letter")
    assert parse_ints("0,2", "--workers", 0) == [0, 2]
    with pytest.raises(FeedrateError, match=r"^--workers '2,x': expected comma-separated integers$"):
        parse_ints("2,x", "--workers", 0)
    with pytest.raises(FeedrateError, match=r"^--workers '-1': expected comma-separated integers >= 0$"):
        parse_ints("-1", "--workers", 0)


def test_shaped_s3_copies_the_dataset_behind_the_proxy_then_stops(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The endpoint compare trains through: the dataset on the server, the SDKs pointed at the proxy with
    the rig's placeholder keys (the caller's session token and profile dropped), all stopped at the end."""
    from rig import locals3, pidfile

    monkeypatch.setenv("AWS_SESSION_TOKEN", "caller-token")
    monkeypatch.setenv("AWS_PROFILE", "caller-profile")
    before = dict(os.environ)
    with compare.shaped_s3(str(tiny_dataset), tmp_path) as (url, local):
        assert url == f"s3://{compare.BUCKET}/{tiny_dataset.name}"
        env = local.environ()
        assert (
            local.proxy is not None and env["AWS_ENDPOINT_URL"] == env["COS_ENDPOINT"] == local.proxy.endpoint
        )
        assert env["AWS_ACCESS_KEY_ID"] == locals3.LOCAL_ACCESS_KEY
        assert "AWS_SESSION_TOKEN" not in env and "AWS_PROFILE" not in env
        listed = locals3.client(local.server.endpoint).list_objects_v2(Bucket=compare.BUCKET)
        names = {o["Key"].split("/", 1)[1] for o in listed["Contents"]}
        assert "manifest.json" in names and any(n.endswith(".tar") for n in names)
        pid = local.server.pid
    assert dict(os.environ) == before, "the upload's environment was this block's only"
    assert pidfile.start_ticks(pid) is None or pidfile.command_line(pid) == [], "the server is stopped"
    assert (tmp_path / "moto.log").exists()
