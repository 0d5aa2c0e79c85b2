"""No input a user can give ends in a traceback: damaged fit folders, grids and model files give a clean
``Error:`` (exit 1, or 2 for usage) naming the file.

Every case corrupts a fresh copy of the session's short fit (``small_fit``) in one way (delete or
truncate a file, edit ``model.toml`` or ``data.csv`` and re-hash them in ``manifest.json`` so the edit
reaches the reader, edit ``manifest.json``, replace ``posterior.nc``, damage the cached
``remission.nc``), then runs commands on it in-process.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import xarray as xr
from typer.testing import CliRunner

from carnk_pkpd.cli import app

FIT_FILES = ("posterior.nc", "model.toml", "data.csv", "summary.csv", "manifest.json")


def _clean(res, allowed=(1,)) -> None:
    """The command ended with an allowed exit code, printed no traceback and raised nothing else."""
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code in allowed, res.output
    assert "Traceback" not in res.output


def _rehash(folder: Path, name: str) -> None:
    """Record ``name``'s new SHA-256 in manifest.json, so the loader reads the edited file itself."""
    m = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    m["files"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(m), encoding="utf-8")


def _edit_text(name: str, edit: Callable[[str], str], rehash: bool = True) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        p = folder / name
        p.write_text(edit(p.read_text(encoding="utf-8")), encoding="utf-8")
        if rehash and name != "manifest.json":
            _rehash(folder, name)

    return apply


def _truncate(name: str, keep: float, rehash: bool = False) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        p = folder / name
        data = p.read_bytes()
        p.write_bytes(data[: int(len(data) * keep)])
        if rehash:
            _rehash(folder, name)

    return apply


def _delete(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def _manifest(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        m = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        (folder / "manifest.json").write_text(json.dumps(edit(m)), encoding="utf-8")

    return apply


def _set(d: dict, key: str, value: object) -> dict:
    d[key] = value
    return d


def _foreign_posterior(folder: Path) -> None:
    import xarray as xr

    xr.Dataset({"x": ("a", [1.0, 2.0])}).to_netcdf(folder / "posterior.nc", engine="netcdf4")
    _rehash(folder, "posterior.nc")


def _drop_subject(text: str) -> str:
    lines = text.splitlines(keepends=True)
    first_id = next(ln.split(",")[0] for ln in lines if ln[:1].isdigit())
    return "".join(ln for ln in lines if not ln.startswith(f"{first_id},"))


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    **{f"delete {n}": (_delete(n), n) for n in FIT_FILES},
    **{f"truncate {n} to half": (_truncate(n, 0.5), n) for n in FIT_FILES},
    **{f"empty {n}": (_truncate(n, 0.0), n) for n in FIT_FILES},
    "posterior.nc truncated, hash updated": (_truncate("posterior.nc", 0.5, rehash=True), "posterior.nc"),
    "posterior.nc of something else": (_foreign_posterior, "posterior.nc"),
    "model.toml invalid TOML": (_edit_text("model.toml", lambda t: t + "\n[[[ nonsense\n"), "model.toml"),
    "model.toml typical as text": (
        _edit_text("model.toml", lambda t: t.replace("typical = ", 'typical = "x" #', 1)),
        "model.toml",
    ),
    "model.toml without [model]": (
        _edit_text("model.toml", lambda t: t.replace("[model]", "[modell]", 1)),
        "model.toml",
    ),
    "model.toml binary": (_edit_text("model.toml", lambda t: "\x00\x01\x02"), "model.toml"),
    "data.csv garbage": (_edit_text("data.csv", lambda t: "ID,TIME\nx,y\n"), "data.csv"),
    "data.csv one subject fewer": (_edit_text("data.csv", _drop_subject), "posterior.nc"),
    "manifest.json not JSON": (_edit_text("manifest.json", lambda t: t[:-10]), "manifest.json"),
    "manifest.json a list": (_manifest(lambda m: [m]), "manifest.json"),
    "manifest.json files missing": (_manifest(lambda m: _set(m, "files", None)), "manifest.json"),
    "manifest.json files a list": (_manifest(lambda m: _set(m, "files", ["data.csv"])), "manifest.json"),
    "manifest.json path escape": (
        _manifest(lambda m: _set(m, "files", {**m["files"], "../x": "0" * 64})),
        "manifest.json",
    ),
    "manifest.json format_version": (_manifest(lambda m: _set(m, "format_version", "one")), "manifest.json"),
    "manifest.json diagnostics": (_manifest(lambda m: _set(m, "diagnostics", {"bogus": 1})), "manifest.json"),
    "manifest.json diagnostics text": (_manifest(lambda m: _set(m, "diagnostics", "ok")), "manifest.json"),
}


@pytest.fixture(scope="module")
def base(small_fit, tmp_path_factory) -> Path:
    """A private copy of the session's short fit (the commands below never write into it)."""
    dest = tmp_path_factory.mktemp("fuzz") / "fit"
    shutil.copytree(small_fit.path, dest, ignore=shutil.ignore_patterns("export", "doses", "report.html"))
    return dest


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_fit_folder_gives_a_clean_error_naming_the_file(base, tmp_path, case):
    damage, named = CASES[case]
    folder = tmp_path / "fit"
    shutil.copytree(base, folder)
    damage(folder)
    runner = CliRunner()
    res = runner.invoke(
        app, ["export", str(folder), "--format", "json", "--draws", "2", "--out", str(tmp_path / "x")]
    )
    _clean(res)
    assert named in res.output, res.output
    assert not (tmp_path / "x").exists()
    for args in (["report", str(folder), "--draws", "2"], ["predict", str(folder), "--out", str(tmp_path / "p")],
                 ["doses", str(folder), "--workers", "0", "--out", str(tmp_path / "d")]):  # fmt: skip
        res = runner.invoke(app, args)
        _clean(res)
        assert named in res.output, (args, res.output)
    assert not (tmp_path / "p").exists() and not (tmp_path / "d").exists()


def test_deleting_the_marker_keeps_the_fit_usable(base, tmp_path):
    from carnk_pkpd.atomic import MARKER
    from carnk_pkpd.fits import load_fit

    folder = tmp_path / "fit"
    shutil.copytree(base, folder)
    (folder / MARKER).unlink(missing_ok=True)
    assert load_fit(folder).posterior.sizes["chain"] >= 1


@pytest.mark.parametrize("keep", [0.0, 0.3])
def test_truncated_remission_cache_is_refitted_with_a_message(base, tmp_path, keep):
    # remission.nc is the commands' own cache: a damaged one is said so, fitted again and replaced
    folder = tmp_path / "fit"
    shutil.copytree(base, folder)
    (folder / "remission.nc").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 200 if keep else b"")
    res = CliRunner().invoke(app, ["doses", str(folder), "--workers", "0", "--draws", "2", "--patients", "2",
                                   "--grid", "1:3:3", "--out", str(tmp_path / "d")])  # fmt: skip
    _clean(res, allowed=(0,))
    words = re.sub(r"[\s│┃|]+", " ", res.output)  # the warnings table wraps its text over rows
    assert "the cached remission link cannot be read" in words and "fitted again" in words, res.output
    assert (tmp_path / "d" / "ranking.csv").exists()
    with xr.open_dataset(folder / "remission.nc", engine="netcdf4") as f:  # the cache is whole again
        assert "theta1" in f


GRIDS: dict[str, Callable[[Path], str]] = {
    "a folder": lambda d: str(d),
    "missing yaml": lambda d: str(d / "nope.yaml"),
    "invalid yaml": lambda d: _write(d / "g.yaml", "regimens: [ {dose: 1, \n"),
    "empty yaml": lambda d: _write(d / "g.yaml", ""),
    "yaml scalar": lambda d: _write(d / "g.yaml", "42\n"),
    "yaml list of text": lambda d: _write(d / "g.yaml", "- a\n- b\n"),
    "yaml regimens text": lambda d: _write(d / "g.yaml", "regimens: hello\n"),
    "yaml negative dose": lambda d: _write(
        d / "g.yaml", "regimens:\n  - {dose: -1, interval: 3, n_infusions: 3}\n"
    ),
    "yaml missing key": lambda d: _write(d / "g.yaml", "regimens:\n  - {dose: 1}\n"),
    "yaml huge n": lambda d: _write(
        d / "g.yaml", "regimens:\n  - {dose: 1, interval: 3, n_infusions: 1.5}\n"
    ),
    "yaml binary": lambda d: _write_bytes(d / "g.yaml", b"\xff\xfe\x00garbage"),
    "text letters": lambda d: "a:b:c",
    "text too short": lambda d: "1:2",
    "text nan": lambda d: "nan:3:3",
    "text inf interval": lambda d: "1:inf:3",
    "text empty item": lambda d: "1:3:3,,",
}


def _write(p: Path, text: str) -> str:
    p.write_text(text, encoding="utf-8")
    return str(p)


def _write_bytes(p: Path, data: bytes) -> str:
    p.write_bytes(data)
    return str(p)


@pytest.mark.parametrize("case", list(GRIDS))
def test_bad_grids_give_a_clean_error(base, tmp_path, case):
    grid = GRIDS[case](tmp_path)
    res = CliRunner().invoke(app, ["doses", str(base), "--grid", grid, "--workers", "0", "--draws", "2",
                                   "--patients", "2", "--out", str(tmp_path / "d")])  # fmt: skip
    _clean(res, (1, 2))
    assert "Error" in res.output
    assert not (tmp_path / "d").exists()


def _model_variants(d: Path) -> dict[str, str]:
    from carnk_pkpd.spec import resolve_model

    text = resolve_model("reference").read_text(encoding="utf-8")
    out = {"a folder": str(d), "missing": str(d / "none.toml"), "no such name": "no_such_model"}
    for i, frac in enumerate((0.0, 0.1, 0.37, 0.5, 0.81)):
        out[f"truncated {frac}"] = _write(d / f"t{i}.toml", text[: int(len(text) * frac)])
    out["binary"] = _write_bytes(d / "b.toml", b"\x00\xff\xfe garbage")
    out["not utf-8"] = _write_bytes(d / "l.toml", text.encode("utf-8").replace(b"\xc2\xb5", b"\xb5"))
    out["invalid toml"] = _write(d / "i.toml", text + "\n= = =\n")
    out["unknown key"] = _write(d / "u.toml", text.replace("[model]", "[model]\nbogus_key = 1", 1))
    out["negative typical"] = _write(d / "n.toml", text.replace("typical = ", "typical = -", 1))
    out["text typical"] = _write(d / "s.toml", text.replace("typical = ", 'typical = "a" #', 1))
    return out


def test_bad_model_files_give_a_clean_error(tmp_path):
    from carnk_pkpd.data import embedded_cohort_path
    from carnk_pkpd.spec import load_model

    runner = CliRunner()
    for case, model in _model_variants(tmp_path).items():
        try:  # a file cut after its last required table is still a valid model: nothing to refuse then
            load_model(model)
        except (ValueError, OSError):
            pass
        else:
            assert case.startswith("truncated"), f"{case}: a damaged model file was accepted"
            continue
        res = runner.invoke(
            app, ["simulate", "--model", model, "--n-subjects", "1", "--out", str(tmp_path / "c.csv")]
        )
        _clean(res)
        assert "Error" in res.output or Path(model).name in res.output, (case, res.output)
        res = runner.invoke(app, ["fit", str(embedded_cohort_path("example")), "--model", model, "--out",
                                  str(tmp_path / "f"), "--draws", "5", "--tune", "5", "--chains", "1"])  # fmt: skip
        _clean(res)
        assert not (tmp_path / "f").exists() and not (tmp_path / "c.csv").exists(), case
